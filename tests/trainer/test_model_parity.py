"""Numerical parity with an independent implementation: HuggingFace transformers' Deformable DETR.

Both models are built with the same tiny configuration (ResNet-18 layout, no pretrained weights),
our weights are copied into transformers' model through a key mapping, and logits, boxes and
the loss on a fixed batch must agree within 1e-4 (float32).
"""
from __future__ import annotations

import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from deformable_detr.config.schema import ExperimentConfig  # noqa: E402
from deformable_detr.model import build_model  # noqa: E402

HIDDEN, HEADS, QUERIES, CLASSES = 32, 4, 8, 4


@pytest.fixture(autouse=True)
def _reference_attention(monkeypatch):
    monkeypatch.setenv("DDETR_MSDA_IMPL", "reference")


def our_model(with_box_refine: bool, two_stage: bool, num_feature_levels: int, attention_padding: str = "masked"):
    spec = ExperimentConfig()
    spec.model.attention_padding = attention_padding  # transformers masks padding, as the original
    spec.dataset.num_classes = CLASSES
    m = spec.model
    m.backbone, m.hidden_dim, m.nheads, m.num_queries = "resnet_18", HIDDEN, HEADS, QUERIES
    m.enc_layers, m.dec_layers, m.dim_feedforward, m.dropout_ratio = 2, 2, 48, 0.0
    m.with_box_refine, m.two_stage = with_box_refine, two_stage
    m.cls_loss_coef, m.bbox_loss_coef, m.giou_loss_coef = 1.0, 5.0, 2.0  # transformers' fixed ce weight is 1
    m.num_feature_levels = num_feature_levels
    m.return_interm_indices = [1, 2, 3, 4] if num_feature_levels == 4 else [3]
    spec.train.activation_checkpoint = False
    model, criterion, _ = build_model(spec)
    # Move every weight off its structured initialisation (zero offsets, zero box deltas, unit BN).
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                noise = torch.randn(tensor.shape, generator=generator) * 0.1
                tensor.copy_(tensor.abs() + 0.5 if name.endswith("running_var") else tensor + noise)
    return model.eval(), criterion


def hf_model(with_box_refine: bool, two_stage: bool, num_feature_levels: int):
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    stages = ["stage2", "stage3", "stage4"] if num_feature_levels == 4 else ["stage4"]
    backbone = ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
                            layer_type="basic", out_features=stages)
    config = DeformableDetrConfig(
        backbone_config=backbone, d_model=HIDDEN, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=48, decoder_ffn_dim=48,
        num_queries=QUERIES, two_stage_num_proposals=QUERIES, num_labels=CLASSES, dropout=0.0,
        num_feature_levels=num_feature_levels, with_box_refine=with_box_refine, two_stage=two_stage,
        auxiliary_loss=True, disable_custom_kernels=True,
        # Separate heads per layer with refinement (as the original); shared heads otherwise.
        tie_word_embeddings=not with_box_refine)
    return DeformableDetrForObjectDetection(config).eval()


def _stage(match: re.Match) -> str:
    """torchvision layer{i}.{block} -> transformers' stages.{i-1}.layers.{block}."""
    return f"model.backbone.model.encoder.stages.{int(match[1]) - 1}.layers.{match[2]}"


_RULES = [
    (r"^backbone\.0\.body\.conv1\.", "model.backbone.model.embedder.embedder.convolution."),
    (r"^backbone\.0\.body\.bn1\.", "model.backbone.model.embedder.embedder.normalization."),
    (r"^backbone\.0\.body\.layer(\d)\.(\d+)\.conv(\d)\.",
     lambda m: f"{_stage(m)}.layer.{int(m[3]) - 1}.convolution."),
    (r"^backbone\.0\.body\.layer(\d)\.(\d+)\.bn(\d)\.",
     lambda m: f"{_stage(m)}.layer.{int(m[3]) - 1}.normalization."),
    (r"^backbone\.0\.body\.layer(\d)\.(\d+)\.downsample\.0\.", lambda m: f"{_stage(m)}.shortcut.convolution."),
    (r"^backbone\.0\.body\.layer(\d)\.(\d+)\.downsample\.1\.", lambda m: f"{_stage(m)}.shortcut.normalization."),
    (r"^transformer\.encoder\.layers\.(\d+)\.norm1\.", r"model.encoder.layers.\1.self_attn_layer_norm."),
    (r"^transformer\.encoder\.layers\.(\d+)\.norm2\.", r"model.encoder.layers.\1.final_layer_norm."),
    (r"^transformer\.(en|de)coder\.layers\.(\d+)\.linear(\d)\.", r"model.\1coder.layers.\2.mlp.fc\3."),
    (r"^transformer\.decoder\.layers\.(\d+)\.cross_attn\.", r"model.decoder.layers.\1.encoder_attn."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norm1\.", r"model.decoder.layers.\1.encoder_attn_layer_norm."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norm2\.", r"model.decoder.layers.\1.self_attn_layer_norm."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norm3\.", r"model.decoder.layers.\1.final_layer_norm."),
    (r"^transformer\.decoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"model.decoder.layers.\1.self_attn.o_proj."),
    (r"^query_embed\.", "model.query_position_embeddings."),
    (r"^transformer\.", "model."),
    (r"^input_proj\.", "model.input_proj."),
]


def to_hf_state(state: dict) -> dict:
    """Our (original) key names -> transformers' names; nn.MultiheadAttention's packed q/k/v split."""
    converted = {}
    for key, value in state.items():
        packed = re.match(r"^transformer\.decoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)$", key)
        if packed:
            for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                converted[f"model.decoder.layers.{packed[1]}.self_attn.{part}_proj.{packed[2]}"] = chunk
            continue
        for pattern, replacement in _RULES:
            new_key, count = re.subn(pattern, replacement, key)
            if count:
                key = new_key
                break
        converted[key] = value
    return converted


def fixed_batch():
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 64, 96, generator=generator)
    masks = torch.zeros(2, 64, 96, dtype=torch.bool)
    masks[1, :, 72:] = True
    masks[1, 40:, :] = True
    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1]])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.5, 0.2, 0.3]])}]
    return images, masks, targets


@pytest.mark.parametrize("with_box_refine,two_stage,levels", [
    (False, False, 4), (True, False, 4), (True, True, 4), (False, False, 1)])
def test_same_outputs_and_loss_as_transformers(with_box_refine, two_stage, levels):
    ours, criterion = our_model(with_box_refine, two_stage, levels)
    theirs = hf_model(with_box_refine, two_stage, levels)
    theirs.load_state_dict(to_hf_state(ours.state_dict()), strict=True)

    images, masks, targets = fixed_batch()
    hf_labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
    with torch.no_grad():
        out = ours(images, masks)
        ref = theirs(pixel_values=images, pixel_mask=(~masks).long(), labels=hf_labels)
    assert (out["pred_logits"] - ref.logits).abs().max() < 1e-4
    assert (out["pred_boxes"] - ref.pred_boxes).abs().max() < 1e-4
    for aux, ref_aux in zip(out["aux_outputs"], ref.auxiliary_outputs):
        assert (aux["pred_logits"] - ref_aux["logits"]).abs().max() < 1e-4
        assert (aux["pred_boxes"] - ref_aux["pred_boxes"]).abs().max() < 1e-4
    if two_stage:
        assert (out["enc_outputs"]["pred_logits"] - ref.enc_outputs_class).abs().max() < 1e-4
        assert (out["enc_outputs"]["pred_boxes"] - ref.enc_outputs_coord_logits.sigmoid()).abs().max() < 1e-4

    # transformers' loss has no encoder (two-stage) term: compare the decoder terms.
    losses = {k: v for k, v in criterion(out, targets).items() if not k.endswith("_enc")}
    assert abs(sum(losses.values()).item() - ref.loss.item()) < 1e-4
    for name in ("loss_ce", "loss_bbox", "loss_giou"):
        assert abs(losses[name].item() / criterion.weight_dict[name] - ref.loss_dict[name].item()) < 1e-4
