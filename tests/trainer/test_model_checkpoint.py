"""Original Deformable-DETR and TAO checkpoints load by name; class heads re-initialise for fine-tuning."""
from __future__ import annotations

import functools

import pytest
import torch
from torchvision.models import resnet50

from deformable_detr.config.schema import ExperimentConfig
from deformable_detr.errors import UsageError
from deformable_detr.model import build_model
from deformable_detr.model.checkpoint_compat import load_model_state
from deformable_detr.runtime.checkpoint_io import load_object, save_object

D, HEADS, LEVELS, POINTS, FFN, LAYERS, QUERIES = 256, 8, 4, 4, 1024, 6, 300


def _linear(prefix: str, out_f: int, in_f: int) -> dict:
    return {f"{prefix}.weight": (out_f, in_f), f"{prefix}.bias": (out_f,)}


def _norm(prefix: str, width: int) -> dict:
    return {f"{prefix}.weight": (width,), f"{prefix}.bias": (width,)}


def _msda(prefix: str) -> dict:
    return {**_linear(f"{prefix}.sampling_offsets", HEADS * LEVELS * POINTS * 2, D),
            **_linear(f"{prefix}.attention_weights", HEADS * LEVELS * POINTS, D),
            **_linear(f"{prefix}.value_proj", D, D), **_linear(f"{prefix}.output_proj", D, D)}


def _box_head(prefix: str) -> dict:
    return {**_linear(f"{prefix}.layers.0", D, D), **_linear(f"{prefix}.layers.1", D, D),
            **_linear(f"{prefix}.layers.2", 4, D)}


@functools.lru_cache(maxsize=1)
def _resnet50_shapes() -> dict:
    return {f"backbone.0.body.{k}": tuple(v.shape) for k, v in resnet50().state_dict().items()
            if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}


def original_shapes(num_classes: int = 91, box_refine: bool = True, two_stage: bool = False) -> dict:
    """Key -> shape of an original r50 Deformable-DETR checkpoint, written from its module layout."""
    shapes = dict(_resnet50_shapes())
    shapes["transformer.level_embed"] = (LEVELS, D)
    for i in range(LAYERS):
        p = f"transformer.encoder.layers.{i}"
        shapes.update({**_msda(f"{p}.self_attn"), **_norm(f"{p}.norm1", D), **_linear(f"{p}.linear1", FFN, D),
                       **_linear(f"{p}.linear2", D, FFN), **_norm(f"{p}.norm2", D)})
        p = f"transformer.decoder.layers.{i}"
        shapes.update({**_msda(f"{p}.cross_attn"), **_norm(f"{p}.norm1", D),
                       f"{p}.self_attn.in_proj_weight": (3 * D, D), f"{p}.self_attn.in_proj_bias": (3 * D,),
                       **_linear(f"{p}.self_attn.out_proj", D, D), **_norm(f"{p}.norm2", D),
                       **_linear(f"{p}.linear1", FFN, D), **_linear(f"{p}.linear2", D, FFN), **_norm(f"{p}.norm3", D)})
    num_pred = LAYERS + (1 if two_stage else 0)
    for i in range(num_pred):
        shapes.update({**_linear(f"class_embed.{i}", num_classes, D), **_box_head(f"bbox_embed.{i}")})
        if box_refine:
            shapes.update(_box_head(f"transformer.decoder.bbox_embed.{i}"))
        if two_stage:
            shapes.update(_linear(f"transformer.decoder.class_embed.{i}", num_classes, D))
    if two_stage:
        shapes.update({**_linear("transformer.enc_output", D, D), **_norm("transformer.enc_output_norm", D),
                       **_linear("transformer.pos_trans", 2 * D, 2 * D), **_norm("transformer.pos_trans_norm", 2 * D)})
    else:
        shapes.update({**_linear("transformer.reference_points", 2, D), "query_embed.weight": (QUERIES, 2 * D)})
    for level, channels in enumerate((512, 1024, 2048)):
        shapes.update({f"input_proj.{level}.0.weight": (D, channels, 1, 1), f"input_proj.{level}.0.bias": (D,),
                       **_norm(f"input_proj.{level}.1", D)})
    shapes.update({"input_proj.3.0.weight": (D, 2048, 3, 3), "input_proj.3.0.bias": (D,), **_norm("input_proj.3.1", D)})
    return shapes


def default_spec(**model_fields) -> ExperimentConfig:
    spec = ExperimentConfig()  # TAO defaults: resnet_50, 300 queries, 6+6 layers, 4 levels, box refinement
    spec.model.hidden_dim, spec.model.dim_feedforward = D, FFN
    for key, value in model_fields.items():
        setattr(spec.model, key, value)
    return spec


def meta_state(shapes: dict) -> dict:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def meta_model(**model_fields):
    # Full-size models on the meta device: names and shapes without 40M parameters to initialise.
    with torch.device("meta"):
        return build_model(default_spec(**model_fields))[0]


@pytest.mark.parametrize("box_refine,two_stage", [(True, False), (False, False), (True, True)])
def test_original_names_and_shapes_load_strictly(box_refine, two_stage):
    model = meta_model(with_box_refine=box_refine, two_stage=two_stage)
    shapes = original_shapes(box_refine=box_refine, two_stage=two_stage)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    report = load_model_state(model, {"model": meta_state(shapes)})
    assert report == ([], [], [])
    tao = {"state_dict": {f"model.model.{k}": v for k, v in meta_state(shapes).items()}, "epoch": 3}
    assert load_model_state(model, tao) == ([], [], [])
    assert load_model_state(model, {f"module.{k}": v for k, v in meta_state(shapes).items()}) == ([], [], [])


def tiny_model(num_classes: int = 4):
    spec = ExperimentConfig()
    spec.dataset.num_classes = num_classes
    for key, value in dict(backbone="resnet_18", num_queries=6, enc_layers=1, dec_layers=2, hidden_dim=32,
                           nheads=4, dim_feedforward=32).items():
        setattr(spec.model, key, value)
    return build_model(spec)[0]


def distinct_values(model) -> dict:
    """A distinct value per tensor, so that a key landing in the wrong place shows.

    Keys naming one shared tensor (`transformer.decoder.bbox_embed.N` is `bbox_embed.N`) get one value.
    """
    values, by_tensor = {}, {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        fill = by_tensor.setdefault(id(tensor), 0.5 + len(by_tensor) * 1e-3)
        values[key] = torch.full(tensor.shape, fill)
    return values


def test_values_land_under_their_names_from_each_format(tmp_path):
    model = tiny_model()
    state = distinct_values(model)
    for wrapped in ({"model": state}, {"state_dict": {f"model.model.{k}": v for k, v in state.items()}},
                    {f"module.{k}": v for k, v in state.items()}):
        with torch.no_grad():
            for tensor in model.state_dict().values():
                tensor.zero_()
        load_model_state(model, wrapped)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, state[key], msg=key)

    path = str(tmp_path / "ours.pth")
    save_object({"model": model.state_dict(), "epoch": 1, "optimizer": {}}, path, key="secret")
    again = tiny_model()
    load_model_state(again, load_object(path, "secret"))
    torch.testing.assert_close(again.state_dict()["query_embed.weight"], state["query_embed.weight"])


def test_mismatches_are_usage_errors_and_class_heads_reinitialise():
    model = tiny_model(num_classes=4)
    other = distinct_values(tiny_model(num_classes=7))
    with pytest.raises(UsageError, match="num_classes"):
        load_model_state(model, {"model": other})
    before = model.state_dict()["class_embed.0.weight"].clone()
    report = load_model_state(model, {"model": other}, allow_num_classes_change=True)
    assert "class_embed.0.weight" in report.reinitialised_keys
    torch.testing.assert_close(model.state_dict()["class_embed.0.weight"], before)
    torch.testing.assert_close(model.state_dict()["transformer.level_embed"], other["transformer.level_embed"])

    partial = distinct_values(model)
    del partial["transformer.level_embed"]
    partial["extra.weight"] = torch.zeros(1)
    with pytest.raises(UsageError, match="1 missing.*1 unexpected"):
        load_model_state(model, {"model": partial})
    report = load_model_state(model, {"model": partial}, strict=False)
    assert report.missing_keys == ["transformer.level_embed"] and report.unexpected_keys == ["extra.weight"]
    with pytest.raises(UsageError, match="no model weights"):
        load_model_state(model, {"epoch": 1})
