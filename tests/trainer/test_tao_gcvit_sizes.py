"""GC-ViT as TAO runs it (issue 29 item 2): any input size, the two large variants, and TAO
checkpoints with or without their relative position index buffers.

The reference is test_gcvit_tao.py's functional TAO forward over a TAO-named state dict (written
from TAO's semantics: windows padded right and bottom, global queries resized bicubically to the
window); for the large variants its variant and window tables get TAO's large entries."""
from __future__ import annotations

import pytest
import torch

import test_gcvit_tao as tao_reference
from deformable_detr.model import build_model
from deformable_detr.model.backbone import GC_VITS
from deformable_detr.model.checkpoint_compat import load_model_state
from deformable_detr.model.gcvit import GcVitNetwork, gcvit_state_from_tao, tao_state_from_gcvit

# TAO's gc_vit_large / gc_vit_large_384: (depths, heads, dim, mlp ratio, layer scale), windows per level.
TAO_LARGE = {"gc_vit_large": (((3, 4, 19, 5), (6, 12, 24, 48), 192, 2, 1e-5), (7, 7, 14, 7)),
             "gc_vit_large_384": (((3, 4, 19, 5), (6, 12, 24, 48), 192, 2, 1e-5), (12, 12, 24, 12))}


@pytest.fixture(autouse=True)
def _reference_attention(monkeypatch):
    monkeypatch.setenv("DDETR_MSDA_IMPL", "reference")


def with_tao_layout(monkeypatch, variant: str) -> None:
    layout, windows = TAO_LARGE[variant]
    monkeypatch.setitem(tao_reference.TAO_VARIANTS, variant, layout)
    monkeypatch.setattr(tao_reference, "TAO_WINDOWS", windows)


def features_match_tao(variant: str, out_indices: list, height: int, width: int) -> None:
    torch.manual_seed(0)
    source = tao_reference.randomised(GcVitNetwork(GC_VITS[variant], out_indices), seed=5)
    tao = tao_state_from_gcvit(source)
    del source
    network = GcVitNetwork(GC_VITS[variant], out_indices).eval()
    network.load_state_dict(gcvit_state_from_tao(network, tao, "test"), strict=True)
    images = torch.randn(2, 3, height, width)
    with torch.no_grad():
        ours = network(images)
        reference = tao_reference.tao_reference_features(images, tao, variant, out_indices)
    assert [tuple(f.shape) for f in ours] == [tuple(f.shape) for f in reference]
    for level, (mine, theirs) in enumerate(zip(ours, reference)):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=5e-5, msg=f"level {level}")


@pytest.mark.parametrize("height, width", [(70, 100), (45, 61)])  # none a multiple of 32
def test_any_input_size_gives_taos_features(height, width):
    features_match_tao("gc_vit_xxtiny", [0, 1, 2, 3], height, width)


@pytest.mark.parametrize("variant", sorted(TAO_LARGE))
def test_large_variants_name_every_tensor_with_taos_shapes(variant, monkeypatch):
    with_tao_layout(monkeypatch, variant)
    out_indices = [1, 2, 3]
    with torch.device("meta"):
        network = GcVitNetwork(GC_VITS[variant], out_indices)
    exported = tao_state_from_gcvit(network)
    expected = tao_reference.tao_shapes(variant, out_indices)
    assert {key: tuple(value.shape) for key, value in exported.items()} == expected


def test_the_384_layout_gives_taos_features_at_an_odd_size(monkeypatch):
    """gc_vit_large_384's layout (timm's at 384 pixels: windows 12, 12, 24, 12) at a narrow width:
    the layout, not the width, decides padding and query resizing; the 200M-parameter network's
    names and shapes are checked above."""
    from deformable_detr.model import gcvit

    narrow = dict(depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16), embed_dim=32, mlp_ratio=2, layer_scale=1e-5)
    monkeypatch.setitem(gcvit._UNREGISTERED, "gcvit_large_384", (narrow, 384))
    monkeypatch.setitem(tao_reference.TAO_VARIANTS, "gc_vit_large_384", ((2, 2, 2, 2), (2, 4, 8, 16), 32, 2, 1e-5))
    monkeypatch.setattr(tao_reference, "TAO_WINDOWS", TAO_LARGE["gc_vit_large_384"][1])
    features_match_tao("gc_vit_large_384", [0, 1, 2, 3], 50, 75)  # windows of 12 and 24: all pad and resize


def test_detector_builds_for_taos_default_sizes_and_runs_padded_batches():
    spec = tao_reference.small_spec()
    spec.dataset.augmentation.fixed_random_crop = None  # TAO's defaults: shorter side 800, cap 1333
    model, _, _ = build_model(spec)
    masks = torch.zeros(2, 70, 100, dtype=torch.bool)
    masks[1, 50:, :] = True
    masks[1, :, 80:] = True
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 3, 70, 100), masks)
    assert out["pred_boxes"].shape == (2, 5, 4) and torch.isfinite(out["pred_logits"]).all()


def test_tao_checkpoint_loads_with_or_without_relative_position_indices():
    torch.manual_seed(0)
    source, _, _ = build_model(tao_reference.small_spec())
    tao_reference.randomised(source.backbone[0].body, seed=6)
    with_indices = tao_reference.tao_lightning_checkpoint(source.eval())
    indices = [key for key in with_indices["state_dict"] if key.endswith("relative_position_index")]
    assert indices
    without = {"state_dict": {k: v for k, v in with_indices["state_dict"].items() if k not in indices}}
    images, masks = torch.randn(1, 3, 70, 100), torch.zeros(1, 70, 100, dtype=torch.bool)
    with torch.no_grad():
        expected = source(images, masks)
    for checkpoint in (with_indices, without):
        target, _, _ = build_model(tao_reference.small_spec())
        assert load_model_state(target, checkpoint) == ([], [], [])
        with torch.no_grad():
            got = target.eval()(images, masks)
        assert torch.equal(got["pred_logits"], expected["pred_logits"])
        assert torch.equal(got["pred_boxes"], expected["pred_boxes"])
