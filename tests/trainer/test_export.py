"""`deformable-detr export` end to end: onnxruntime parity (plain ops), the TensorRT plugin node, atomic writes."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from deformable_detr.cli import main
from deformable_detr.export.onnx_export import PLUGIN_DOMAIN, PLUGIN_OP, ExportedDetector
from deformable_detr.runtime.checkpoint_io import save_object

MODEL = {"backbone": "resnet_18", "num_queries": 6, "num_feature_levels": 2, "return_interm_indices": [3, 4],
         "enc_layers": 1, "dec_layers": 2, "hidden_dim": 32, "nheads": 4, "dim_feedforward": 32}
HEIGHT, WIDTH = 64, 96


@pytest.fixture(autouse=True)
def _reference_attention(monkeypatch):
    monkeypatch.setenv("DDETR_MSDA_IMPL", "reference")


@pytest.fixture(scope="module")
def trained(perturbed_checkpoint):
    return perturbed_checkpoint({"model": MODEL, "dataset": {"num_classes": 3}})


def export(write_spec, results_dir, checkpoint: str, onnx_file: str, **fields) -> int:
    section = {"checkpoint": checkpoint, "onnx_file": onnx_file, "input_height": HEIGHT, "input_width": WIDTH}
    section.update(fields)
    spec = write_spec({"model": MODEL, "dataset": {"num_classes": 3}, "export": section})
    return main(["export", "-e", spec, "-r", str(results_dir)])


def test_plain_ops_match_pytorch_at_two_batch_sizes(trained, write_spec, results_dir):
    model, checkpoint = trained
    onnx_file = results_dir / "plain.onnx"
    assert export(write_spec, results_dir, checkpoint, str(onnx_file), on_cpu=True) == 0
    graph = onnx.load(str(onnx_file))
    onnx.checker.check_model(graph, full_check=True)
    assert [i.name for i in graph.graph.input] == ["inputs"]
    assert [o.name for o in graph.graph.output] == ["pred_logits", "pred_boxes"]
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert any(n.op_type == "GridSample" for n in graph.graph.node)
    assert not any(n.domain == PLUGIN_DOMAIN for n in graph.graph.node)
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    wrapper = ExportedDetector(model).eval()
    for batch in (1, 3):
        images = torch.randn(batch, 3, HEIGHT, WIDTH)
        with torch.no_grad():
            expected = wrapper(images)
        logits, boxes = session.run(["pred_logits", "pred_boxes"], {"inputs": images.numpy()})
        assert logits.shape == (batch, 6, 3) and boxes.shape == (batch, 6, 4)
        assert np.abs(logits - expected[0].numpy()).max() < 1e-4
        assert np.abs(boxes - expected[1].numpy()).max() < 1e-4


def test_plugin_nodes_as_tao_writes_them_and_fixed_batch(trained, write_spec, results_dir):
    _, checkpoint = trained
    onnx_file = results_dir / "trt.onnx"
    assert export(write_spec, results_dir, checkpoint, str(onnx_file), on_cpu=False, batch_size=2,
                  opset_version=16) == 0
    graph = onnx.load(str(onnx_file))
    onnx.checker.check_model(graph, full_check=True)
    assert {o.domain: o.version for o in graph.opset_import}[""] == 16
    assert PLUGIN_DOMAIN in {o.domain for o in graph.opset_import}
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    plugins = [n for n in graph.graph.node if n.op_type == PLUGIN_OP]
    assert len(plugins) == 1 + 2  # one per attention layer: 1 encoder + 2 decoder layers
    assert not any(n.op_type == "GridSample" for n in graph.graph.node)
    constants = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t)
                 for n in graph.graph.node if n.op_type == "Constant"}
    constants.update({i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer})
    for node in plugins:
        assert node.domain == PLUGIN_DOMAIN
        assert {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute} == {
            "name": PLUGIN_OP.encode(), "version": b"1", "namespace": b""}
        assert len(node.input) == 5 and len(node.output) == 1
        shapes, starts = constants[node.input[1]], constants[node.input[2]]
        assert shapes.dtype == np.int32 and starts.dtype == np.int32
        # Levels: layer4 (stride 32) and the extra stride-64 conv level.
        assert shapes.tolist() == [[2, 3], [1, 2]] and starts.tolist() == [0, 6]


def test_bad_values_and_failed_exports_leave_the_old_file(trained, write_spec, results_dir, tmp_path, capsys):
    _, checkpoint = trained
    onnx_file = results_dir / "model.onnx"
    onnx_file.write_bytes(b"previous export")
    assert export(write_spec, results_dir, checkpoint, str(onnx_file), opset_version=15) == 2
    assert "export.opset_version" in capsys.readouterr().err
    wrong = str(tmp_path / "wrong.pth")
    save_object({"model": {"class_embed.0.weight": torch.zeros(3, 32)}}, wrong)
    assert export(write_spec, results_dir, wrong, str(onnx_file)) == 2
    assert "checkpoint" in capsys.readouterr().err
    assert export(write_spec, results_dir, str(tmp_path / "missing.pth"), str(onnx_file)) == 2
    assert onnx_file.read_bytes() == b"previous export"
    assert not [p for p in results_dir.iterdir() if p.name.startswith(".model.onnx")]


def test_gen_trt_engine_without_tensorrt_or_gpu_says_so(write_spec, results_dir, capsys):
    from deformable_detr.tasks.gen_trt_engine import missing_requirements

    if not missing_requirements():
        pytest.skip("tensorrt and a GPU are present: the engine build is exercised instead (bench/export.py)")
    onnx_file = results_dir / "m.onnx"
    onnx_file.write_bytes(b"not used")
    spec = write_spec({"gen_trt_engine": {"onnx_file": str(onnx_file)}})
    assert main(["gen_trt_engine", "-e", spec, "-r", str(results_dir)]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deformable-detr gen_trt_engine: error:") and "tensorrt" in err[0]


def test_serialize_nvdsinfer_writes_deepstreams_config_and_labels_beside_the_onnx(trained, write_spec,
                                                                                 results_dir, tmp_path):
    import json

    import yaml

    _model, checkpoint = trained
    val = tmp_path / "val.json"  # ids 1 and 3 named: 0 is the background, 2 no category names
    val.write_text(json.dumps({"images": [], "annotations": [],
                               "categories": [{"id": 3, "name": "truck"}, {"id": 1, "name": "car"}]}))
    onnx_file = results_dir / "deploy" / "model.onnx"
    spec = write_spec({"model": MODEL, "dataset": {"num_classes": 3, "val_data_sources": [
        {"image_dir": str(tmp_path), "json_file": str(val)}]}, "export": {
        "checkpoint": checkpoint, "onnx_file": str(onnx_file), "input_height": HEIGHT, "input_width": WIDTH,
        "serialize_nvdsinfer": True, "format": "onnx"}})
    assert main(["export", "-e", spec, "-r", str(results_dir)]) == 0
    folder = onnx_file.parent
    assert sorted(p.name for p in folder.iterdir()) == ["labels.txt", "model.onnx", "nvdsinfer_config.yaml"]
    assert (folder / "labels.txt").read_text() == "background\ncar\nunknown\ntruck\n"
    config = yaml.safe_load((folder / "nvdsinfer_config.yaml").read_text())
    assert config["class-attrs-all"] == {"pre-cluster-threshold": 0.5, "topk": 20}
    prop = config["property"]
    # TAO's values for its default mean and std, and the file's own names and sizes.
    assert prop["net-scale-factor"] == pytest.approx(0.0173520735728, abs=1e-12)
    assert prop["offsets"] == "123.675;116.28;103.53"
    assert prop["infer-dims"] == f"3;{HEIGHT};{WIDTH}"
    assert (prop["onnx-file"], prop["labelfile-path"], prop["num-detected-classes"]) == ("model.onnx", "labels.txt", 4)
    assert prop["output-blob-names"] == "pred_logits;pred_boxes"
    assert (prop["network-type"], prop["cluster-mode"], prop["model-color-format"]) == (0, 4, 0)
    assert prop["parse-bbox-func-name"] == "NvDsInferParseCustomDDETRTAO"


def test_serialize_nvdsinfer_takes_the_classmap_without_val_sources(tmp_path):
    from deformable_detr.config import spec_from_dict
    from deformable_detr.export.nvdsinfer import export_class_names

    classmap = tmp_path / "classmap.txt"
    classmap.write_text("car\nperson group\n")
    spec = spec_from_dict({"dataset": {"infer_data_sources": {"image_dir": [str(tmp_path)],
                                                              "classmap": str(classmap)}}})
    assert export_class_names(spec) == ["background", "car", "person group"]
    from deformable_detr.errors import UsageError

    with pytest.raises(UsageError, match=r"^export.serialize_nvdsinfer: the DeepStream labels file needs the "):
        export_class_names(spec_from_dict({}))


def test_a_format_other_than_onnx_is_one_clear_line(trained, write_spec, results_dir, capsys):
    _model, checkpoint = trained
    assert export(write_spec, results_dir, checkpoint, str(results_dir / "m.onnx"), format="xdl") == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "deformable-detr export: error: export.format: xdl is not written by deformable-detr; accepted: onnx")
    assert not (results_dir / "m.onnx").exists()
