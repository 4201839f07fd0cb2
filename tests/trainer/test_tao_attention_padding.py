"""Padding in multi-scale deformable attention (issue 29 item 4).

TAO's transformer never hands the padding mask to deformable attention (values at padded
pixels are sampled as computed); the original Deformable-DETR, and transformers' port of it,
zero them. Each behaviour is checked against transformers' independent implementation: as it
is for `masked`, and with the mask withheld from its attention modules (a pre-hook; valid
ratios and position embeddings still see the mask, as in TAO) for `unmasked`.
A checkpoint runs as it was trained: `model.attention_padding: auto` follows it.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from test_model_parity import fixed_batch, hf_model, our_model, to_hf_state  # noqa: E402

from deformable_detr.config.loader import spec_from_dict  # noqa: E402
from deformable_detr.model import build_model  # noqa: E402
from deformable_detr.model.checkpoint_compat import load_model_state, resolve_attention_padding  # noqa: E402

SMALL = {"backbone": "resnet_18", "hidden_dim": 32, "nheads": 4, "num_queries": 8, "enc_layers": 1,
         "dec_layers": 1, "dim_feedforward": 48}


@pytest.fixture(autouse=True)
def _reference_attention(monkeypatch):
    monkeypatch.setenv("DDETR_MSDA_IMPL", "reference")


def withhold_mask_from_attention(hf) -> None:
    """transformers' model run as TAO runs: its deformable attention gets no padding mask."""
    from transformers.models.deformable_detr.modeling_deformable_detr import (
        DeformableDetrMultiscaleDeformableAttention)

    def no_mask(_module, args, kwargs):
        return args, {**kwargs, "attention_mask": None}

    modules = [m for m in hf.modules() if isinstance(m, DeformableDetrMultiscaleDeformableAttention)]
    assert modules
    for module in modules:
        module.register_forward_pre_hook(no_mask, with_kwargs=True)


@pytest.mark.parametrize("padding", ["masked", "unmasked"])
@pytest.mark.parametrize("with_box_refine,two_stage", [(False, False), (True, False), (True, True)])
def test_each_padding_matches_an_independent_implementation(padding, with_box_refine, two_stage):
    ours, _ = our_model(with_box_refine, two_stage, 4, attention_padding=padding)
    assert ours.attention_padding == padding
    theirs = hf_model(with_box_refine, two_stage, 4)
    theirs.load_state_dict(to_hf_state(ours.state_dict()), strict=True)
    if padding == "unmasked":
        withhold_mask_from_attention(theirs)
    images, masks, _ = fixed_batch()
    with torch.no_grad():
        out = ours(images, masks)
        ref = theirs(pixel_values=images, pixel_mask=(~masks).long())
    assert (out["pred_logits"] - ref.logits).abs().max() < 1e-4
    assert (out["pred_boxes"] - ref.pred_boxes).abs().max() < 1e-4


def test_the_two_paddings_differ_only_on_padded_images():
    model, _ = our_model(True, False, 4, attention_padding="masked")
    images, masks, _ = fixed_batch()  # image 0 unpadded, image 1 padded
    with torch.no_grad():
        masked = model(images, masks)
        model.attention_padding = "unmasked"
        unmasked = model(images, masks)
    assert torch.allclose(masked["pred_logits"][0], unmasked["pred_logits"][0], atol=1e-6)
    assert (masked["pred_logits"][1] - unmasked["pred_logits"][1]).abs().max() > 1e-3


def _model(padding: str = "auto"):
    spec = spec_from_dict({"dataset": {"num_classes": 4}, "model": {**SMALL, "attention_padding": padding},
                           "train": {"activation_checkpoint": False}})
    return build_model(spec)[0]


def _checkpoints(weights: dict) -> dict:
    ours_spec = {"model": {**SMALL, "attention_padding": "unmasked"}}
    return {
        "tao_lightning": ({"state_dict": {f"model.model.{k}": v for k, v in weights.items()},
                           "pytorch-lightning_version": "2.4.0"}, "unmasked"),
        "original": ({"model": weights, "args": {}}, "masked"),
        "bare_state_dict": (dict(weights), "masked"),
        "ours_recorded_unmasked": ({"model": weights, "spec": ours_spec}, "unmasked"),
        "ours_recorded_masked": ({"model": weights, "spec": {"model": {**SMALL, "attention_padding": "masked"}}},
                                 "masked"),
        "ours_before_the_field": ({"model": weights, "spec": {"model": dict(SMALL)}}, "masked"),
    }


def test_auto_follows_the_checkpoint_and_an_explicit_choice_wins():
    weights = _model().state_dict()
    for name, (checkpoint, trained) in _checkpoints(weights).items():
        model = _model("auto")
        load_model_state(model, checkpoint)
        assert model.attention_padding == trained, name
        for explicit in ("masked", "unmasked"):
            model = _model(explicit)
            load_model_state(model, checkpoint)
            assert model.attention_padding == explicit, (name, explicit)


def test_a_fresh_model_trains_as_tao_unless_told_otherwise():
    assert resolve_attention_padding("auto") == "unmasked"
    assert _model().attention_padding == "unmasked" and _model("masked").attention_padding == "masked"


def test_training_checkpoints_record_the_padding_they_were_trained_with():
    from deformable_detr.runtime import distributed
    from deformable_detr.runtime.batch_plan import plan_batches
    from deformable_detr.tasks.train.state import Position, gather_checkpoint

    spec = spec_from_dict({"dataset": {"num_classes": 4}, "model": SMALL})
    model = build_model(spec)[0]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    info = distributed.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
    for padding in ("unmasked", "masked"):
        model.attention_padding = padding
        state = gather_checkpoint(spec, model, optimizer, scheduler, scaler, Position(), True, info,
                                  plan_batches(spec.dataset.batch_size, 1, spec.dataset.batch_size))
        assert state["spec"]["model"]["attention_padding"] == padding
        reloaded = _model("auto")
        load_model_state(reloaded, state)
        assert reloaded.attention_padding == padding
    assert spec.model.attention_padding == "auto"  # the run's own spec is left as given


def test_spec_refuses_other_values():
    from deformable_detr.errors import UsageError

    with pytest.raises(UsageError, match="model.attention_padding"):
        spec_from_dict({"model": {"attention_padding": "tao"}})
