"""Backbones: GC-ViT through timm, pretrained backbone weights from torchvision/timm state dicts."""
from __future__ import annotations

import logging

import pytest
import torch
from torchvision.models import resnet18

from deformable_detr.config.schema import ExperimentConfig
from deformable_detr.errors import UsageError
from deformable_detr.model import build_model


@pytest.fixture(autouse=True)
def _reference_attention(monkeypatch):
    monkeypatch.setenv("DDETR_MSDA_IMPL", "reference")


def small_spec(backbone: str, **model_fields) -> ExperimentConfig:
    spec = ExperimentConfig()
    spec.dataset.num_classes = 3
    fields = dict(backbone=backbone, num_queries=5, enc_layers=1, dec_layers=2, hidden_dim=32, nheads=4,
                  dim_feedforward=32)
    fields.update(model_fields)
    for key, value in fields.items():
        setattr(spec.model, key, value)
    spec.train.activation_checkpoint = False
    return spec


def test_gc_vit_backbone_forward_at_any_size():
    # Three stage levels: on a 64-pixel input an extra stride-64 level would be a single pixel.
    spec = small_spec("gc_vit_xxtiny", num_feature_levels=3, return_interm_indices=[1, 2, 3])
    spec.dataset.augmentation.fixed_random_crop = 64
    model, _, _ = build_model(spec)
    assert model.backbone[0].num_channels == [128, 256, 512] and model.backbone[0].strides == [8, 16, 32]
    assert "backbone.0.body.stem.conv1.weight" in model.state_dict()  # timm's own names under backbone.0.body
    out = model(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    assert out["pred_logits"].shape == (1, 5, 3)
    # Any size, as TAO's GC-ViT (windows padded, global queries resized): also TAO's default 1333 cap.
    assert model(torch.randn(1, 3, 70, 100), torch.zeros(1, 70, 100, dtype=torch.bool))["pred_boxes"].shape == (1, 5, 4)
    spec.dataset.augmentation.fixed_random_crop = None
    spec.dataset.augmentation.random_resize_max_size = 1333
    build_model(spec)


def test_pretrained_torchvision_backbone_is_loaded_and_reported(tmp_path, caplog):
    torch.manual_seed(0)
    reference = resnet18()  # torchvision naming, with the classifier the detector does not use
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    spec = small_spec("resnet_18", pretrained_backbone_path=str(path))
    with caplog.at_level(logging.INFO):
        model, _, _ = build_model(spec)
    body = model.backbone[0].body
    torch.testing.assert_close(body.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    torch.testing.assert_close(body.bn1.running_var, reference.bn1.running_var)
    assert "unexpected" in caplog.text and "fc.weight" in caplog.text

    torch.save({"state_dict": {"foo.bar": torch.zeros(1)}}, path)
    with pytest.raises(UsageError, match="pretrained_backbone_path"):
        build_model(spec)


def test_pretrained_timm_backbone_is_loaded(tmp_path):
    import timm

    spec = small_spec("gc_vit_xxtiny")
    spec.dataset.augmentation.fixed_random_crop = 64
    reference = timm.create_model("gcvit_xxtiny", pretrained=False, img_size=64)
    path = tmp_path / "gcvit.pth"
    torch.save(reference.state_dict(), path)
    spec.model.pretrained_backbone_path = str(path)
    model, _, _ = build_model(spec)
    torch.testing.assert_close(model.backbone[0].body.stem.conv1.weight, reference.stem.conv1.weight)


@pytest.mark.parametrize("name", ["resnet_18", "resnet_50"])
def test_frozen_batchnorm_folded_into_convolutions_keeps_outputs_gradients_and_names(name):
    from torchvision.models._utils import IntermediateLayerGetter

    from deformable_detr.model.backbone import ConvFrozenBatchNorm2d, ResNetBackbone, resnet_network

    torch.manual_seed(0)
    plain = resnet_network(name)  # torchvision's modules: convolution, then FrozenBatchNorm2d
    backbone = ResNetBackbone(resnet_network(name), [1, 2, 3], train_backbone=True)
    folded = [m for m in backbone.modules() if isinstance(m, ConvFrozenBatchNorm2d)]
    assert len(folded) == sum(isinstance(m, torch.nn.Conv2d) for m in plain.modules())  # every one

    def randomise(seed):
        generator = torch.Generator().manual_seed(seed)
        state = {k: (v.abs() + 0.5 if k.endswith("running_var") else v + torch.randn(v.shape, generator=generator) * 0.1)
                 for k, v in plain.state_dict().items() if v.is_floating_point()}
        plain.load_state_dict(state, strict=False)
        missing, unexpected = backbone.body.load_state_dict(
            {k: v for k, v in state.items() if not k.startswith("fc.")}, strict=False)
        assert not missing and not unexpected  # the same names: checkpoints load either way

    reference = IntermediateLayerGetter(plain, {"layer2": "1", "layer3": "2", "layer4": "3"})
    images = torch.randn(2, 3, 64, 64)
    for seed in (1, 2):  # new weights after a first (cached) forward: the fold follows them
        randomise(seed)
        with torch.no_grad():
            for ours, theirs in zip(backbone.stage_features(images), reference(images).values()):
                torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())
    # Trainable stages (layer2-4): the same gradients through the folded weights.
    ours = dict(backbone.body.named_parameters())
    for key, parameter in plain.named_parameters():
        parameter.requires_grad_(key in ours and ours[key].requires_grad)
    sum(f.square().mean() for f in backbone.stage_features(images)).backward()
    sum(f.square().mean() for f in reference(images).values()).backward()
    for key, parameter in plain.named_parameters():
        if parameter.grad is not None and key in ours:
            grad = ours[key].grad
            torch.testing.assert_close(grad, parameter.grad, rtol=1e-3, atol=1e-3 * parameter.grad.abs().max().item())
    assert ours["layer1.0.conv1.weight"].grad is None and ours["layer2.0.conv1.weight"].grad is not None
