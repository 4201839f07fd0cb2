"""`build_model(spec) -> (model, criterion, postprocessor)` from the spec's `model` section."""
from __future__ import annotations

from typing import Iterable, List, Sequence, Tuple

import torch
from torch import nn

from ..config.schema import ExperimentConfig
from ..errors import UsageError
from ..runtime.logging import get_logger
from .backbone import EXTRA_LEVEL, GC_VITS, RESNETS, GcVitBackbone, Joiner, ResNetBackbone, resnet_network
from .checkpoint_compat import resolve_attention_padding
from .criterion import SetCriterion, weight_dict_for
from .detector import DeformableDETR
from .matcher import HungarianMatcher
from .position_encoding import PositionEmbeddingSine
from .postprocess import PostProcess
from .transformer import DeformableTransformer

log = get_logger("model")


def backbone_stage_indices(return_interm_indices: Sequence[int]) -> Tuple[List[int], int]:
    """(stages the backbone must return, how many of them are feature levels).

    Values 0..3 pick ResNet layer1..layer4 (GC-ViT stage 0..3); 4 is the extra level made by a
    stride-2 conv on the last stage, so that stage is computed even when not a level itself.
    """
    stages = sorted(i for i in return_interm_indices if i != EXTRA_LEVEL)
    num_levels = len(stages)
    if EXTRA_LEVEL in return_interm_indices and 3 not in stages:
        stages.append(3)
    return stages, num_levels


def build_backbone(spec: ExperimentConfig, stage_indices: Sequence[int]) -> nn.Module:
    model = spec.model
    train_backbone = model.train_backbone
    if model.dilation and model.backbone not in ("resnet_50", "resnet_101"):
        raise UsageError(f"model.dilation: true does not apply to {model.backbone}; accepted with "
                         "resnet_50 or resnet_101 (torchvision's basic blocks cannot dilate)")
    if model.backbone in RESNETS:
        network = resnet_network(model.backbone, model.dilation)
        body = ResNetBackbone(network, stage_indices, train_backbone, dilation=model.dilation)
    elif model.backbone in GC_VITS:
        from .gcvit import GcVitNetwork

        network = GcVitNetwork(GC_VITS[model.backbone], stage_indices)
        body = GcVitBackbone(network, stage_indices, train_backbone)
    else:
        raise UsageError(f"model.backbone: {model.backbone!r} is not supported; accepted: "
                         f"{', '.join(list(RESNETS) + list(GC_VITS))}")
    if model.pretrained_backbone_path:
        load_backbone_weights(body.body, model.pretrained_backbone_path)
    return Joiner(body, PositionEmbeddingSine(model.hidden_dim // 2, normalize=True))


_BACKBONE_PREFIXES = ("module.", "model.", "backbone.0.body.", "backbone.", "body.")


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _BACKBONE_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def load_backbone_weights(body: nn.Module, path: str) -> None:
    """Load a torchvision/timm backbone state dict (or a checkpoint holding one), reporting mismatches.

    GC-ViT weights may also be in TAO's naming, and load strictly (model/gcvit.py).
    """
    from ..runtime.checkpoint_io import load_object

    state = load_object(path)
    if isinstance(state, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"model.pretrained_backbone_path: {path} holds no state dict of tensors")
    from .gcvit import GcVitNetwork, load_gcvit_backbone_weights

    if isinstance(body, GcVitNetwork):
        # GC-ViT loads strictly, in timm's or TAO's naming: wrapper prefixes go, however nested.
        load_gcvit_backbone_weights(body, {_strip_prefixes(key): value for key, value in state.items()}, path)
        return
    own = set(body.state_dict())
    cleaned = {}
    for key, value in state.items():
        name = key
        for prefix in _BACKBONE_PREFIXES:
            if name not in own and name.startswith(prefix):
                name = name[len(prefix):]
        cleaned[name] = value
    result = body.load_state_dict(cleaned, strict=False)
    matched = len(own) - len(result.missing_keys)
    if matched == 0:
        raise UsageError(f"model.pretrained_backbone_path: no parameter of {path} matches the backbone; "
                         "accepted: a torchvision/timm state dict of the configured model.backbone")
    log.info("backbone weights from %s: %d tensors loaded, %d missing %s, %d unexpected %s", path, matched,
             len(result.missing_keys), result.missing_keys[:8], len(result.unexpected_keys),
             result.unexpected_keys[:8])


def apply_freeze(model: nn.Module, prefixes: Iterable[str]) -> List[str]:
    """Stop gradients of every parameter under the given module-name prefixes (`train.freeze`)."""
    frozen: List[str] = []
    names = [name for name, _ in model.named_parameters()]
    for prefix in prefixes:
        prefix = prefix.rstrip(".")
        hits = [n for n in names if n == prefix or n.startswith(prefix + ".")]
        if not hits:
            tops = sorted({n.split(".")[0] for n in names})
            raise UsageError(f"train.freeze: {prefix!r} names no parameters; accepted: module-name prefixes "
                             f"such as {', '.join(tops)}")
        frozen.extend(hits)
    for name, parameter in model.named_parameters():
        if name in frozen:
            parameter.requires_grad_(False)
    return frozen


def build_model(spec: ExperimentConfig) -> Tuple[DeformableDETR, SetCriterion, PostProcess]:
    m = spec.model
    if m.hidden_dim % 32:
        raise UsageError(f"model.hidden_dim: {m.hidden_dim}; accepted: a multiple of 32 (GroupNorm(32) projections)")
    if m.hidden_dim % m.nheads:
        raise UsageError(f"model.nheads: {m.nheads} does not divide model.hidden_dim {m.hidden_dim}")
    if m.two_stage and not m.with_box_refine:
        # The original scores proposals with the refinement heads; it has no two-stage without them.
        raise UsageError("model.two_stage: true needs model.with_box_refine: true (as in the original)")
    stage_indices, num_backbone_levels = backbone_stage_indices(m.return_interm_indices)
    backbone = build_backbone(spec, stage_indices)
    transformer = DeformableTransformer(
        d_model=m.hidden_dim, nhead=m.nheads, num_encoder_layers=m.enc_layers, num_decoder_layers=m.dec_layers,
        dim_feedforward=m.dim_feedforward, dropout=m.dropout_ratio, num_feature_levels=m.num_feature_levels,
        dec_n_points=m.dec_n_points, enc_n_points=m.enc_n_points, two_stage=m.two_stage,
        two_stage_num_proposals=m.num_queries)
    model = DeformableDETR(backbone, transformer, num_classes=spec.dataset.num_classes, num_queries=m.num_queries,
                           num_feature_levels=m.num_feature_levels, num_backbone_levels=num_backbone_levels,
                           aux_loss=m.aux_loss, with_box_refine=m.with_box_refine, two_stage=m.two_stage)
    model.attention_padding = resolve_attention_padding(m.attention_padding)  # a loaded checkpoint may change it
    model.set_activation_checkpoint(spec.train.activation_checkpoint)
    if spec.train.freeze:
        apply_freeze(model, spec.train.freeze)
    matcher = HungarianMatcher(m.cls_loss_coef, m.bbox_loss_coef, m.giou_loss_coef, focal_alpha=m.focal_alpha)
    weights = weight_dict_for(m.cls_loss_coef, m.bbox_loss_coef, m.giou_loss_coef, m.dec_layers, m.aux_loss,
                              m.two_stage)
    unknown = set(m.loss_types) - {"labels", "boxes"}
    if unknown:
        raise UsageError(f"model.loss_types: {sorted(unknown)} unknown; accepted: labels, boxes")
    criterion = SetCriterion(spec.dataset.num_classes, matcher, weights, m.loss_types, focal_alpha=m.focal_alpha)
    model.spec_model = m  # what checkpoint_compat compares a checkpoint's stored spec against
    return model, criterion, PostProcess(m.num_select)
