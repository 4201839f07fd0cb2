"""The detector built from a spec: shapes, original parameter names, freezing, activation checkpointing."""
from __future__ import annotations

import pytest
import torch

from deformable_detr.config.schema import ExperimentConfig
from deformable_detr.errors import UsageError
from deformable_detr.model import apply_freeze, build_model


@pytest.fixture(autouse=True)
def _reference_attention(monkeypatch):
    # The PyTorch reference: no kernel build in these tests (the kernels have their own tests).
    monkeypatch.setenv("DDETR_MSDA_IMPL", "reference")


def tiny_spec(**model_fields) -> ExperimentConfig:
    spec = ExperimentConfig()
    spec.dataset.num_classes = 4
    fields = dict(backbone="resnet_18", num_queries=8, enc_layers=1, dec_layers=2, hidden_dim=32, nheads=4,
                  dim_feedforward=32, dropout_ratio=0.0, num_select=5)
    fields.update(model_fields)
    for key, value in fields.items():
        setattr(spec.model, key, value)
    spec.train.activation_checkpoint = False
    return spec


def batch(b: int = 2, h: int = 64, w: int = 96):
    torch.manual_seed(0)
    images = torch.randn(b, 3, h, w)
    masks = torch.zeros(b, h, w, dtype=torch.bool)
    masks[-1, :, w * 3 // 4:] = True
    masks[-1, h // 2:, :] = True
    return images, masks


TARGETS = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1]])},
           {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.5, 0.2, 0.3]])}]


@pytest.mark.parametrize("fields", [
    {},
    {"with_box_refine": False},
    {"two_stage": True},
    {"num_feature_levels": 1, "return_interm_indices": [3]},
    {"num_feature_levels": 2, "return_interm_indices": [2, 4]},
    {"num_feature_levels": 3, "return_interm_indices": [0, 1, 4], "aux_loss": False},
])
def test_forward_loss_backward_postprocess(fields):
    spec = tiny_spec(**fields)
    model, criterion, post = build_model(spec)
    images, masks = batch()
    out = model(images, masks)
    assert out["pred_logits"].shape == (2, 8, 4)
    assert out["pred_boxes"].shape == (2, 8, 4)
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    assert len(out.get("aux_outputs", [])) == (1 if spec.model.aux_loss else 0)
    assert ("enc_outputs" in out) == spec.model.two_stage
    losses = criterion(out, TARGETS)
    assert set(losses) == set(criterion.weight_dict)
    total = sum(losses.values())
    total.backward()
    assert model.input_proj[0][0].weight.grad is not None
    detections = post(out, torch.tensor([[480, 640], [300, 200]]))
    assert [d["scores"].shape[0] for d in detections] == [5, 5]
    # Boxes are the image's predicted boxes scaled to its size (w 200, h 300); not clipped, as in the
    # original, so a box may reach past the border.
    xyxy = detections[1]["boxes"] / torch.tensor([200.0, 300.0, 200.0, 300.0])
    cxcywh = torch.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2,
                          xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]], dim=-1)
    assert (torch.cdist(cxcywh, out["pred_boxes"][1].detach()).min(dim=1).values < 1e-4).all()


def test_activation_checkpoint_gives_the_same_gradients():
    spec = tiny_spec(dropout_ratio=0.1)  # recomputation must replay the same dropout masks
    model, criterion, _ = build_model(spec)
    model.train()
    images, masks = batch(h=48, w=64)
    grads = []
    for enabled in (False, True):
        model.zero_grad()
        model.set_activation_checkpoint(enabled)
        torch.manual_seed(1)
        sum(criterion(model(images, masks), TARGETS).values()).backward()
        grads.append(model.transformer.encoder.layers[0].self_attn.value_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_freeze_and_train_backbone():
    model, _, _ = build_model(tiny_spec())
    frozen = apply_freeze(model, ["input_proj", "transformer.encoder"])
    assert frozen and all(not p.requires_grad for n, p in model.named_parameters()
                          if n.startswith(("input_proj.", "transformer.encoder.")))
    assert model.transformer.decoder.layers[0].linear1.weight.requires_grad
    # As the original: the ResNet stem and layer1 never train, layer2..4 do unless train_backbone is false.
    assert not model.backbone[0].body.layer1[0].conv1.weight.requires_grad
    assert model.backbone[0].body.layer2[0].conv1.weight.requires_grad
    with pytest.raises(UsageError, match="model.two_stage"):
        build_model(tiny_spec(two_stage=True, with_box_refine=False))
    with pytest.raises(UsageError, match="train.freeze"):
        apply_freeze(model, ["no_such_module"])
    spec = tiny_spec(train_backbone=False)
    model, _, _ = build_model(spec)
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("backbone."))


@pytest.mark.parametrize("backbone,channels", [
    ("resnet_18", [128, 256, 512]), ("resnet_34", [128, 256, 512]), ("resnet_50", [512, 1024, 2048]),
    ("resnet_101", [512, 1024, 2048]), ("gc_vit_xxtiny", [128, 256, 512]), ("gc_vit_xtiny", [128, 256, 512]),
    ("gc_vit_tiny", [128, 256, 512]), ("gc_vit_small", [192, 384, 768]), ("gc_vit_base", [256, 512, 1024])])
def test_every_backbone_of_the_schema_builds(backbone, channels):
    spec = tiny_spec(backbone=backbone)
    spec.dataset.augmentation.fixed_random_crop = 224
    with torch.device("meta"):  # structure only: no weights to initialise
        model, _, _ = build_model(spec)
    assert model.backbone[0].num_channels == channels
    assert [p[0].in_channels for p in model.input_proj] == channels + [channels[-1]]
    assert model.input_proj[3][0].stride == (2, 2)


def test_dilation_keeps_the_last_stage_at_stride_16():
    with torch.device("meta"):
        model, _, _ = build_model(tiny_spec(backbone="resnet_50", dilation=True))
        features, _ = model.backbone(*batch(b=1, h=64, w=96))
    assert model.backbone[0].strides == [8, 16, 16]
    assert [f.shape[-1] for f, _ in features] == [12, 6, 6]
    with pytest.raises(UsageError, match="model.dilation"):
        build_model(tiny_spec(backbone="resnet_18", dilation=True))
