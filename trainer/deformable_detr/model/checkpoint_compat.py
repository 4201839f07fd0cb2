"""Load model weights from our checkpoints, original Deformable-DETR files and TAO Lightning files.

Our checkpoints and the original's are `{"model": state_dict, ...}`; TAO's are Lightning
checkpoints whose `state_dict` keys carry a `model.model.` prefix before the original names, and
name a GC-ViT backbone in TAO's own way (converted by model/gcvit.py).
DistributedDataParallel's `module.` prefix is stripped as well.

A checkpoint also decides whether deformable attention masks padded pixels (TAO's models were
trained without the mask, the original's with it): `model.attention_padding: auto` follows it.

Our checkpoints also store the spec they were trained with. Some architecture fields change
no tensor shape (nheads 8 x 4 points and nheads 4 x 8 points give the same sampling_offsets),
so their weights would load into the wrong model silently; those fields are compared and a
difference is refused, naming each field.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, NamedTuple

import torch
from torch import nn

from ..errors import UsageError
from ..runtime.logging import get_logger
from .gcvit import convert_tao_gcvit_keys

log = get_logger("model.checkpoint")

_PREFIXES = ("model.model.", "module.", "model.")
# model fields that define the network (not the losses, the post-processing or the training).
ARCHITECTURE_FIELDS = ("backbone", "num_feature_levels", "return_interm_indices", "hidden_dim", "nheads",
                       "enc_layers", "dec_layers", "dim_feedforward", "enc_n_points", "dec_n_points",
                       "num_queries", "with_box_refine", "two_stage", "dilation")
# Heads whose width is the number of classes: re-initialised when fine-tuning to other classes.
_CLASS_HEADS = ("class_embed.", "transformer.decoder.class_embed.")


def trained_attention_padding(checkpoint: Any) -> str:
    """How the checkpoint's model was trained to treat padded pixels in deformable attention.

    Ours record it in their spec (`model.attention_padding`); ours from before that field, and
    the original's `{"model": ...}` files, mask; TAO's Lightning files (`state_dict`) do not.
    """
    if isinstance(checkpoint, Mapping):
        stored = checkpoint.get("spec")
        if isinstance(stored, Mapping):
            recorded = (stored.get("model") or {}).get("attention_padding")
            return recorded if recorded in ("masked", "unmasked") else "masked"
        if isinstance(checkpoint.get("state_dict"), Mapping):
            return "unmasked"
    return "masked"


def resolve_attention_padding(choice: str, checkpoint: Any = None) -> str:
    """`model.attention_padding` made concrete: an explicit choice wins; `auto` follows the
    checkpoint, and TAO's training (unmasked) for a fresh model."""
    if choice != "auto":
        return choice
    return "unmasked" if checkpoint is None else trained_attention_padding(checkpoint)


def apply_attention_padding(model: nn.Module, checkpoint: Any) -> None:
    """Give `model` (built by build_model) the attention padding that `checkpoint`'s weights need."""
    choice = getattr(getattr(model, "spec_model", None), "attention_padding", "auto")
    padding = resolve_attention_padding(choice, checkpoint)
    trained = trained_attention_padding(checkpoint)
    if padding != trained:
        log.info("model.attention_padding: %s, as set, though the checkpoint was trained %s", padding, trained)
    model.attention_padding = padding


class LoadReport(NamedTuple):
    missing_keys: List[str]
    unexpected_keys: List[str]
    reinitialised_keys: List[str]


def extract_state_dict(checkpoint: Any) -> Dict[str, torch.Tensor]:
    """The model's state dict inside any accepted checkpoint object, with original key names."""
    state = checkpoint
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    elif isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError("checkpoint holds no model weights; accepted: {'model': state_dict} "
                         "(ours, original Deformable-DETR), a TAO Lightning {'state_dict': ...} or a state dict")
    return dict(zip(_without_shared_prefixes(list(state)), state.values()))


def _without_shared_prefixes(keys: List[str]) -> List[str]:
    """Strip wrapper prefixes (`model.model.`, `module.`, `model.`) that every key carries.

    Only prefixes shared by all keys go, so a model whose own names started with one stays intact.
    """
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if keys and all(key.startswith(prefix) for key in keys):
                keys = [key[len(prefix):] for key in keys]
                stripped = True
                break
    return keys


def architecture_differences(stored_spec: Any, model_section: Any) -> List[str]:
    """`model.field: checkpoint X, spec Y` for each architecture field the stored spec sets otherwise."""
    stored = stored_spec.get("model") if isinstance(stored_spec, Mapping) else None
    if not isinstance(stored, Mapping) or model_section is None:
        return []
    differences = []
    for name in ARCHITECTURE_FIELDS:
        if name not in stored or not hasattr(model_section, name):
            continue
        ours, theirs = getattr(model_section, name), stored[name]
        if (list(ours) if isinstance(ours, (list, tuple)) else ours) != (
                list(theirs) if isinstance(theirs, (list, tuple)) else theirs):
            differences.append(f"model.{name}: checkpoint {theirs!r}, spec {ours!r}")
    return differences


def check_architecture(checkpoint: Any, model_section: Any) -> None:
    """Refuse a checkpoint whose stored spec describes another network than `model_section` (spec.model)."""
    if not isinstance(checkpoint, Mapping):
        return
    differences = architecture_differences(checkpoint.get("spec"), model_section)
    if differences:
        raise UsageError(f"checkpoint was trained with another architecture ({'; '.join(differences)}); "
                         "set these fields as the checkpoint has them")


def load_model_state(model: nn.Module, checkpoint: Any, strict: bool = True,
                     allow_num_classes_change: bool = False) -> LoadReport:
    """Copy the checkpoint's weights into `model`.

    strict: every model key must be present and no checkpoint key left over (UsageError otherwise).
    allow_num_classes_change: class heads of a different width keep their fresh initialisation
    (fine-tuning to another `dataset.num_classes`); any other shape mismatch is an error.
    A stored spec (our checkpoints) must agree with the spec the model was built from
    (`model.spec_model`, set by build_model) in every ARCHITECTURE_FIELDS field.
    """
    check_architecture(checkpoint, getattr(model, "spec_model", None))
    apply_attention_padding(model, checkpoint)
    state = convert_tao_gcvit_keys(model, extract_state_dict(checkpoint))
    own = model.state_dict()
    reinitialised: List[str] = []
    mismatched: List[str] = []
    for key, value in list(state.items()):
        if key in own and own[key].shape != value.shape:
            if allow_num_classes_change and key.startswith(_CLASS_HEADS):
                reinitialised.append(key)
                state[key] = own[key]
            else:
                mismatched.append(f"{key} {tuple(value.shape)} vs model {tuple(own[key].shape)}")
    if mismatched:
        raise UsageError(f"checkpoint does not fit the model built from the spec ({len(mismatched)} shape "
                         f"mismatches, e.g. {'; '.join(mismatched[:3])}); check dataset.num_classes and the "
                         "model section against the checkpoint's")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("num_batches_tracked")]
    if strict and (missing or unexpected):
        raise UsageError(f"checkpoint does not match the model built from the spec: {len(missing)} missing "
                         f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); "
                         "check model.backbone, the layer counts and the other model fields")
    if reinitialised:
        log.info("class heads re-initialised for %d classes (checkpoint has another num_classes): %s",
                 _num_classes(model), ", ".join(reinitialised[:4]) + (" ..." if len(reinitialised) > 4 else ""))
    if missing or unexpected:
        log.info("checkpoint loaded non-strictly: %d missing, %d unexpected keys", len(missing), len(unexpected))
    return LoadReport(missing, unexpected, reinitialised)


def _num_classes(model: nn.Module) -> int:
    head = model.class_embed[0] if isinstance(model.class_embed, nn.ModuleList) else model.class_embed
    return int(head.out_features)
