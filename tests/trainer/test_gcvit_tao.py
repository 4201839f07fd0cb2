"""GC-ViT in TAO's naming: structure, layouts, the same function, full checkpoints and backbone weights.

TAO's code is not available to these tests. What they hold against it are facts read from TAO's
deformable_detr GC-ViT (nvidia_tao_pytorch/cv/deformable_detr/model/gc_vit.py and
cv/backbone/gc_vit.py): the variant table, the parameter names and shapes, and the forward
semantics, written below as a small functional reference over a TAO-named state dict.
"""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

from deformable_detr.config.schema import ExperimentConfig
from deformable_detr.errors import UsageError
from deformable_detr.model import build_model
from deformable_detr.model.backbone import GC_VITS
from deformable_detr.model.checkpoint_compat import load_model_state
from deformable_detr.model.gcvit import (GcVitNetwork, gcvit_state_from_tao, tao_state_from_gcvit)

# TAO's gc_vit_model_dict for deformable_detr: depths, heads, dim, mlp ratio, layer scale.
TAO_VARIANTS = {
    "gc_vit_xxtiny": ((2, 2, 6, 2), (2, 4, 8, 16), 64, 3, None),
    "gc_vit_xtiny": ((3, 4, 6, 5), (2, 4, 8, 16), 64, 3, None),
    "gc_vit_tiny": ((3, 4, 19, 5), (2, 4, 8, 16), 64, 3, None),
    "gc_vit_small": ((3, 4, 19, 5), (3, 6, 12, 24), 96, 2, 1e-5),
    "gc_vit_base": ((3, 4, 19, 5), (4, 8, 16, 32), 128, 2, 1e-5),
}
# Every variant is built for resolution 224: windows per level, and the global-query generator's
# FeatExtract blocks (count, whether each max-pools) from input_resolution vs image_resolution.
TAO_WINDOWS = (7, 7, 14, 7)
TAO_GLOBAL_QUERY = ((3, True), (2, True), (1, False), (1, False))


@pytest.fixture(autouse=True)
def _reference_attention(monkeypatch):
    monkeypatch.setenv("DDETR_MSDA_IMPL", "reference")


def test_the_schema_offers_exactly_the_variants_checked_here():
    from deformable_detr.config.schema import BACKBONES

    offered = {name for name in BACKBONES if name.startswith("gc_vit")}
    # TAO's large variants (issue 29) are checked in test_tao_gcvit_sizes.py (200M parameters each).
    large = {"gc_vit_large", "gc_vit_large_384"}
    assert offered == set(GC_VITS) == set(TAO_VARIANTS) | large


# --- structure ------------------------------------------------------------------------------------

def _tao_reduce_size(prefix, dim, dim_out):
    return {f"{prefix}.conv.0.weight": (dim, 1, 3, 3), f"{prefix}.conv.2.fc.0.weight": (dim // 4, dim),
            f"{prefix}.conv.2.fc.2.weight": (dim, dim // 4), f"{prefix}.conv.3.weight": (dim, dim, 1, 1),
            f"{prefix}.reduction.weight": (dim_out, dim, 3, 3), f"{prefix}.norm1.weight": (dim,),
            f"{prefix}.norm1.bias": (dim,), f"{prefix}.norm2.weight": (dim_out,), f"{prefix}.norm2.bias": (dim_out,)}


def tao_shapes(variant, out_indices):
    """Every key of TAO's GC-ViT state dict with its shape, from TAO's module structure."""
    depths, heads, dim, mlp_ratio, layer_scale = TAO_VARIANTS[variant]
    shapes = {"patch_embed.proj.weight": (dim, 3, 3, 3), "patch_embed.proj.bias": (dim,)}
    shapes.update(_tao_reduce_size("patch_embed.conv_down", dim, dim))
    for level in range(4):
        width, window = dim * 2 ** level, TAO_WINDOWS[level]
        hidden = int(width * mlp_ratio)
        for j in range(depths[level]):
            block = f"levels.{level}.blocks.{j}"
            qkv = 2 if j % 2 else 3  # odd blocks take the global query and compute only k, v
            shapes.update({
                f"{block}.norm1.weight": (width,), f"{block}.norm1.bias": (width,),
                f"{block}.attn.relative_position_bias_table": ((2 * window - 1) ** 2, heads[level]),
                f"{block}.attn.relative_position_index": (window * window, window * window),
                f"{block}.attn.qkv.weight": (qkv * width, width), f"{block}.attn.qkv.bias": (qkv * width,),
                f"{block}.attn.proj.weight": (width, width), f"{block}.attn.proj.bias": (width,),
                f"{block}.norm2.weight": (width,), f"{block}.norm2.bias": (width,),
                f"{block}.mlp.fc1.weight": (hidden, width), f"{block}.mlp.fc1.bias": (hidden,),
                f"{block}.mlp.fc2.weight": (width, hidden), f"{block}.mlp.fc2.bias": (width,)})
            if layer_scale is not None:
                shapes.update({f"{block}.gamma1": (width,), f"{block}.gamma2": (width,)})
        if level < 3:
            shapes.update(_tao_reduce_size(f"levels.{level}.downsample", width, 2 * width))
        for k in range(TAO_GLOBAL_QUERY[level][0]):
            name = f"levels.{level}.q_global_gen.to_q_global.{k}.conv"
            shapes.update({f"{name}.0.weight": (width, 1, 3, 3), f"{name}.2.fc.0.weight": (width // 4, width),
                           f"{name}.2.fc.2.weight": (width, width // 4), f"{name}.3.weight": (width, width, 1, 1)})
    for level in out_indices:
        shapes.update({f"norm{level}.weight": (dim * 2 ** level,), f"norm{level}.bias": (dim * 2 ** level,)})
    return shapes


@pytest.mark.parametrize("variant", sorted(TAO_VARIANTS))
def test_tao_naming_covers_every_tensor_one_to_one_with_tao_shapes(variant):
    out_indices = [1, 2, 3]
    with torch.device("meta"):
        network = GcVitNetwork(GC_VITS[variant], out_indices)
    exported = tao_state_from_gcvit(network)
    expected = tao_shapes(variant, out_indices)
    assert sorted(set(exported) - set(expected)) == [] and sorted(set(expected) - set(exported)) == []
    assert {key: tuple(value.shape) for key, value in exported.items()} == expected
    # One TAO tensor per tensor here, apart from the relative position indices TAO also stores.
    indices = [key for key in expected if key.endswith("relative_position_index")]
    assert len(exported) == len(network.state_dict()) + len(indices)


# --- layouts --------------------------------------------------------------------------------------

def hand_relative_index(window):
    """Swin's relative position index, as TAO stores it: (dy + w - 1) * (2w - 1) + (dx + w - 1)."""
    index = torch.empty(window * window, window * window, dtype=torch.long)
    for p in range(window * window):
        for q in range(window * window):
            dy, dx = p // window - q // window, p % window - q % window
            index[p, q] = (dy + window - 1) * (2 * window - 1) + (dx + window - 1)
    return index


def test_relative_position_tables_and_indices_match_taos_layout():
    torch.manual_seed(0)
    network = GcVitNetwork("gcvit_xxtiny", [3])
    exported = tao_state_from_gcvit(network)
    for level, window in enumerate(TAO_WINDOWS):
        index = hand_relative_index(window)
        assert torch.equal(exported[f"levels.{level}.blocks.1.attn.relative_position_index"], index)
        attn = network.stages[level].blocks[1].attn
        table = exported[f"levels.{level}.blocks.1.attn.relative_position_bias_table"]
        # TAO adds table[index] (heads first) to the attention logits; timm's RelPosBias must add the same.
        n = window * window
        reference = table[index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        added = attn.rel_pos(torch.zeros(1, attn.num_heads, n, n))
        assert torch.equal(added[0], reference)


def test_squeeze_excitation_linear_weights_become_1x1_convs():
    torch.manual_seed(0)
    network = GcVitNetwork("gcvit_xxtiny", [3])
    exported = tao_state_from_gcvit(network)
    fc1, fc2 = exported["levels.1.downsample.conv.2.fc.0.weight"], exported["levels.1.downsample.conv.2.fc.2.weight"]
    assert fc1.dim() == 2 and fc2.dim() == 2
    x = torch.randn(2, 128, 5, 5)
    # TAO's SE: average over space, Linear (no bias), GELU, Linear (no bias), sigmoid, rescale.
    gate = torch.sigmoid(F.gelu(x.mean((2, 3)) @ fc1.t()) @ fc2.t())
    reference = x * gate[:, :, None, None]
    se = network.stages[2].downsample.conv_block.se  # TAO's levels.1.downsample is timm's stages.2.downsample
    torch.testing.assert_close(se(x), reference, rtol=1e-6, atol=1e-6)


# --- the same function ----------------------------------------------------------------------------

def _ln(x, state, name):
    return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], 1e-5)


def _conv_branch(x, state, name):
    """TAO's `conv` Sequential: depthwise 3x3, GELU, squeeze-excitation, pointwise 1x1 (NCHW)."""
    y = F.gelu(F.conv2d(x, state[f"{name}.0.weight"], padding=1, groups=x.shape[1]))
    squeeze, excite = state[f"{name}.2.fc.0.weight"], state[f"{name}.2.fc.2.weight"]
    gate = torch.sigmoid(F.gelu(y.mean((2, 3)) @ squeeze.t()) @ excite.t())
    return F.conv2d(y * gate[:, :, None, None], state[f"{name}.3.weight"])


def _reduce(x, state, name):
    """TAO's ReduceSize on channels-last input: norm, residual conv branch, stride-2 conv, norm."""
    x = _ln(x, state, f"{name}.norm1").permute(0, 3, 1, 2)
    x = x + _conv_branch(x, state, f"{name}.conv")
    x = F.conv2d(x, state[f"{name}.reduction.weight"], stride=2, padding=1).permute(0, 2, 3, 1)
    return _ln(x, state, f"{name}.norm2")


def _global_query(x, state, name, count, pooled, window):
    for k in range(count):
        x = x + _conv_branch(x, state, f"{name}.{k}.conv")
        if pooled:
            x = F.max_pool2d(x, 3, 2, 1)
    if tuple(x.shape[-2:]) != (window, window):
        x = F.interpolate(x, size=(window, window), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1)


def _attention(x, query, state, name, heads, window):
    windows, n, c = x.shape
    head_dim = c // heads
    projected = x @ state[f"{name}.qkv.weight"].t() + state[f"{name}.qkv.bias"]
    if query is None:
        q, k, v = projected.view(windows, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    else:  # every window of an image attends with that image's global query
        k, v = projected.view(windows, n, 2, heads, head_dim).permute(2, 0, 3, 1, 4)
        q = query.reshape(query.shape[0], n, heads, head_dim).permute(0, 2, 1, 3)
        q = q.repeat_interleave(windows // query.shape[0], dim=0)
    table = state[f"{name}.relative_position_bias_table"]
    bias = table[hand_relative_index(window).view(-1)].view(n, n, heads).permute(2, 0, 1)
    logits = (q * head_dim ** -0.5) @ k.transpose(-2, -1) + bias
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(windows, n, c)
    return out @ state[f"{name}.proj.weight"].t() + state[f"{name}.proj.bias"]


def _block(x, query, state, name, heads, window):
    b, h, w, c = x.shape
    y = F.pad(_ln(x, state, f"{name}.norm1"), (0, 0, 0, -w % window, 0, -h % window))
    hp, wp = y.shape[1:3]
    y = y.view(b, hp // window, window, wp // window, window, c).permute(0, 1, 3, 2, 4, 5)
    y = _attention(y.reshape(-1, window * window, c), query, state, f"{name}.attn", heads, window)
    y = y.view(b, hp // window, wp // window, window, window, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
    x = x + state.get(f"{name}.gamma1", 1.0) * y[:, :h, :w]
    hidden = _ln(x, state, f"{name}.norm2") @ state[f"{name}.mlp.fc1.weight"].t() + state[f"{name}.mlp.fc1.bias"]
    hidden = F.gelu(hidden)
    mlp = hidden @ state[f"{name}.mlp.fc2.weight"].t() + state[f"{name}.mlp.fc2.bias"]
    return x + state.get(f"{name}.gamma2", 1.0) * mlp


def tao_reference_features(images, state, variant, out_indices):
    """TAO's deformable_detr GC-ViT forward, written from its semantics over a TAO-named state dict."""
    depths, heads = TAO_VARIANTS[variant][:2]
    x = F.conv2d(images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=2, padding=1)
    x = _reduce(x.permute(0, 2, 3, 1), state, "patch_embed.conv_down")
    outputs = []
    for level in range(4):
        count, pooled = TAO_GLOBAL_QUERY[level]
        window = TAO_WINDOWS[level]
        query = _global_query(x.permute(0, 3, 1, 2), state, f"levels.{level}.q_global_gen.to_q_global", count,
                              pooled, window)
        for j in range(depths[level]):
            x = _block(x, query if j % 2 else None, state, f"levels.{level}.blocks.{j}", heads[level], window)
        if level in out_indices:
            outputs.append(_ln(x, state, f"norm{level}").permute(0, 3, 1, 2))
        if level < 3:
            x = _reduce(x, state, f"levels.{level}.downsample")
    return outputs


def randomised(network, seed):
    """Weights far from their initial values, so that norms, layer scales and tables all matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith("gamma") or re.search(r"norm\d*\.weight$", name):
                parameter.copy_(1 + 0.2 * noise)
            elif name.endswith(("bias", "relative_position_bias_table")):
                parameter.copy_(0.2 * noise)
            else:
                parameter.copy_(noise / math.sqrt(parameter[0].numel()))
    return network.eval()


@pytest.mark.parametrize("variant,size", [("gc_vit_xxtiny", 64), ("gc_vit_xxtiny", 224), ("gc_vit_small", 96)])
def test_loaded_tao_weights_compute_taos_features(variant, size):
    # 64 and 96 pixels exercise the window padding and the bicubic resize of global queries; 224 neither.
    torch.manual_seed(0)
    out_indices = [0, 1, 2, 3]
    tao = tao_state_from_gcvit(randomised(GcVitNetwork(GC_VITS[variant], out_indices), seed=1))
    network = GcVitNetwork(GC_VITS[variant], out_indices).eval()
    network.load_state_dict(gcvit_state_from_tao(network, tao, "test"), strict=True)
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ours = network(images)
        reference = tao_reference_features(images, tao, variant, out_indices)
    assert [tuple(f.shape) for f in ours] == [tuple(f.shape) for f in reference]
    for level, (mine, theirs) in enumerate(zip(ours, reference)):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=3e-5, msg=f"level {level}")


@pytest.mark.parametrize("variant", sorted(TAO_VARIANTS))
def test_tao_export_and_import_round_trip_is_bit_exact(variant):
    torch.manual_seed(0)
    source = randomised(GcVitNetwork(GC_VITS[variant], [1, 2, 3]), seed=2)
    target = GcVitNetwork(GC_VITS[variant], [1, 2, 3]).eval()
    target.load_state_dict(gcvit_state_from_tao(target, tao_state_from_gcvit(source), "test"), strict=True)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for mine, theirs in zip(target(images), source(images)):
            assert torch.equal(mine, theirs)


# --- full checkpoints and backbone weights ---------------------------------------------------------

def small_spec(backbone="gc_vit_xxtiny", **model_fields):
    spec = ExperimentConfig()
    spec.dataset.num_classes = 3
    spec.dataset.augmentation.fixed_random_crop = 64
    fields = dict(backbone=backbone, num_queries=5, enc_layers=1, dec_layers=2, hidden_dim=32, nheads=4,
                  dim_feedforward=32, num_feature_levels=3, return_interm_indices=[1, 2, 3])
    fields.update(model_fields)
    for key, value in fields.items():
        setattr(spec.model, key, value)
    spec.train.activation_checkpoint = False
    return spec


def tao_lightning_checkpoint(model):
    """The detector's weights as TAO writes them: `model.model.` prefix, GC-ViT in TAO's naming."""
    body = model.backbone[0].body
    state = {key: value for key, value in model.state_dict().items() if not key.startswith("backbone.0.body.")}
    state.update({f"backbone.0.body.{key}": value for key, value in tao_state_from_gcvit(body).items()})
    return {"state_dict": {f"model.model.{key}": value for key, value in state.items()},
            "pytorch-lightning_version": "2.0"}


def test_tao_lightning_checkpoint_with_gc_vit_loads_strictly_and_gives_the_same_detections():
    torch.manual_seed(0)
    source, _, _ = build_model(small_spec())
    randomised(source.backbone[0].body, seed=3)
    checkpoint = tao_lightning_checkpoint(source.eval())
    assert "model.model.backbone.0.body.levels.2.blocks.1.attn.relative_position_index" in checkpoint["state_dict"]
    target, _, _ = build_model(small_spec())
    assert load_model_state(target, checkpoint) == ([], [], [])
    images, masks = torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool)
    with torch.no_grad():
        expected, got = source(images, masks), target.eval()(images, masks)
    assert torch.equal(got["pred_logits"], expected["pred_logits"])
    assert torch.equal(got["pred_boxes"], expected["pred_boxes"])


def test_wrong_or_partial_tao_gc_vit_mapping_is_an_error_naming_the_keys():
    torch.manual_seed(0)
    source, _, _ = build_model(small_spec())
    checkpoint = tao_lightning_checkpoint(source)
    other, _, _ = build_model(small_spec("gc_vit_xtiny"))  # deeper levels: TAO keys left without a tensor
    with pytest.raises(UsageError, match=r"TAO GC-ViT.*backbone tensors \(TAO names\) are not in the file") as info:
        load_model_state(other, checkpoint)
    assert "levels.0.blocks.2" in str(info.value)

    partial = dict(checkpoint["state_dict"])
    del partial["model.model.backbone.0.body.levels.3.blocks.1.attn.qkv.weight"]
    partial["model.model.backbone.0.body.levels.3.blocks.9.attn.qkv.weight"] = torch.zeros(1)
    target, _, _ = build_model(small_spec())
    with pytest.raises(UsageError) as info:
        load_model_state(target, {"state_dict": partial})
    message = str(info.value)
    assert "1 (levels.3.blocks.9.attn.qkv.weight) TAO keys match no tensor" in message
    assert "1 (levels.3.blocks.1.attn.qkv.weight) backbone tensors" in message

    shuffled = dict(checkpoint["state_dict"])
    shuffled["model.model.backbone.0.body.levels.0.blocks.0.attn.relative_position_index"] = torch.zeros(
        49, 49, dtype=torch.long)
    with pytest.raises(UsageError, match="relative position indices differ"):
        load_model_state(target, {"state_dict": shuffled})


@pytest.mark.parametrize("prefix", ["", "model.backbone.", "module."])
def test_tao_pretrained_backbone_loads_strictly(tmp_path, prefix):
    torch.manual_seed(0)
    reference = randomised(GcVitNetwork("gcvit_xxtiny", [1, 2, 3]), seed=4)
    # A TAO classification GC-ViT: no detection output norms, a final norm and a head instead.
    tao = {key: value for key, value in tao_state_from_gcvit(reference).items() if not re.match(r"norm\d", key)}
    tao.update({"norm.weight": torch.ones(512), "norm.bias": torch.zeros(512), "head.weight": torch.zeros(10, 512),
                "head.bias": torch.zeros(10)})
    path = tmp_path / "gcvit_tao.pth"
    torch.save({"state_dict": {prefix + key: value for key, value in tao.items()}}, path)
    model, _, _ = build_model(small_spec(pretrained_backbone_path=str(path)))
    body = model.backbone[0].body
    for key, value in reference.state_dict().items():
        if not re.match(r"norm\d", key):
            assert torch.equal(body.state_dict()[key], value), key

    tao["levels.1.blocks.7.norm1.weight"] = torch.ones(128)
    torch.save(tao, path)
    with pytest.raises(UsageError, match=r"pretrained_backbone_path.*1 \(levels.1.blocks.7.norm1.weight\) TAO keys"):
        build_model(small_spec(pretrained_backbone_path=str(path)))


def test_timm_pretrained_backbone_still_loads_and_a_foreign_key_is_an_error(tmp_path):
    import timm

    torch.manual_seed(0)
    reference = timm.create_model("gcvit_xxtiny", pretrained=False, img_size=224)
    path = tmp_path / "gcvit_timm.pth"
    torch.save(reference.state_dict(), path)
    model, _, _ = build_model(small_spec(pretrained_backbone_path=str(path)))
    body = model.backbone[0].body
    for key, value in body.state_dict().items():
        if not re.match(r"norm\d", key):
            assert torch.equal(value, reference.state_dict()[key]), key
    state = reference.state_dict()
    state["stages.0.blocks.0.attn.extra"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(UsageError, match=r"1 \(stages.0.blocks.0.attn.extra\) keys match no tensor"):
        build_model(small_spec(pretrained_backbone_path=str(path)))


def test_gc_vit_detector_exports_to_onnx_with_padding_and_resized_queries():
    # 64 pixels: padded windows and bicubic global queries must trace into plain ONNX ops.
    ort = pytest.importorskip("onnxruntime")
    from deformable_detr.export.onnx_export import export_to_bytes

    torch.manual_seed(0)
    model, _, _ = build_model(small_spec())
    model.eval()
    data = export_to_bytes(model, batch_size=-1, channels=3, height=64, width=64, opset=17, plugin=False,
                           verbose=False)
    session = ort.InferenceSession(data)
    images = torch.randn(2, 3, 64, 64)
    logits, boxes = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    with torch.no_grad():
        expected = model(images, torch.zeros(2, 64, 64, dtype=torch.bool))
    torch.testing.assert_close(torch.from_numpy(logits), expected["pred_logits"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(boxes), expected["pred_boxes"], rtol=1e-4, atol=1e-4)
