"""gen_trt_engine's builder settings (TAO 6: INT8, tensorrt.layers_precision, timing_cache), checked against
a stand-in for the tensorrt module: `configure_builder` takes the module as an argument, so what it asks
of TensorRT is visible here without TensorRT or a GPU. The real builder runs in test_trt_engine.py
(GPU + tensorrt)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import yaml

from deformable_detr.cli import main
from deformable_detr.config import spec_from_dict
from deformable_detr.errors import UsageError
from deformable_detr.export.trt import (apply_layer_precisions, configure_builder, parse_layers_precision,
                                        save_timing_cache)


class _Calibrator:
    def __init__(self) -> None:
        pass


TRT = SimpleNamespace(
    MemoryPoolType=SimpleNamespace(WORKSPACE="workspace"),
    BuilderFlag=SimpleNamespace(FP16="FP16", INT8="INT8", OBEY_PRECISION_CONSTRAINTS="OBEY"),
    LayerType=SimpleNamespace(CONSTANT="constant", CONVOLUTION="convolution"),
    float32="float32", float16="float16", int8="int8", int32="int32", bool="bool",
    IInt8EntropyCalibrator2=_Calibrator)


class Cache:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def combine(self, other: "Cache", ignore_mismatch: bool) -> None:
        assert ignore_mismatch is False
        self.data += other.data

    def serialize(self) -> bytes:
        return self.data + b"+measured"


class Config:
    def __init__(self) -> None:
        self.flags, self.calls, self.int8_calibrator, self.cache = [], [], None, None

    def set_memory_pool_limit(self, pool, size):
        self.calls.append(("pool", pool, size))

    def set_flag(self, flag):
        self.flags.append(flag)

    def create_timing_cache(self, data: bytes) -> Cache:
        return Cache(bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch):
        self.cache = cache

    def get_timing_cache(self):
        return self.cache


class Tensor(SimpleNamespace):
    pass


class Layer:
    def __init__(self, name, precision="float32", kind="convolution", dtype="float32", shape=False):
        self.name, self.precision, self.type = name, precision, kind
        self.num_inputs = self.num_outputs = 1
        self._io = Tensor(dtype=dtype, is_shape_tensor=shape)

    def get_input(self, _index):
        return self._io

    def get_output(self, _index):
        return self._io


class Network:
    def __init__(self, layers):
        self.layers = layers
        self.num_layers = len(layers)

    def get_layer(self, index):
        return self.layers[index]


def network():
    return Network([Layer("/backbone/conv1/Conv"), Layer("/backbone/conv2/Conv"),
                    Layer("/shape/Gather", precision="int32", dtype="int32"),
                    Layer("/const", kind="constant"), Layer("/shape/Shape", shape=True)])


def section(**tensorrt):
    return spec_from_dict({"gen_trt_engine": {"tensorrt": tensorrt}}).gen_trt_engine


def test_fp32_sets_the_workspace_only():
    config = Config()
    assert configure_builder(TRT, None, network(), config, section(workspace_size=2048)) is None
    assert config.calls == [("pool", "workspace", 2048 << 20)] and config.flags == []


def test_layers_precision_with_a_default_for_the_other_layers():
    net = network()
    config = Config()
    configure_builder(TRT, None, net, config,
                      section(data_type="fp16", layers_precision=["*:fp32", "/backbone/conv2/Conv:fp16"]))
    assert config.flags == ["FP16", "OBEY"]
    assert [layer.precision for layer in net.layers] == ["float32", "float16", "int32", "float32", "float32"]
    # `*` leaves integer, constant and shape layers as they are; a named layer is set whatever it is.
    net = network()
    changed = apply_layer_precisions(TRT, net, {"*": "fp16", "/const": "fp32"})
    assert changed == ["/backbone/conv1/Conv", "/backbone/conv2/Conv", "/const"]
    assert [layer.precision for layer in net.layers] == ["float16", "float16", "int32", "float32", "float32"]


@pytest.mark.parametrize("entries, message", [
    (["/backbone/conv1/Conv"], r"^gen_trt_engine.tensorrt.layers_precision\[0\]: '/backbone/conv1/Conv'; accepted: "
                               r"layer_name:precision with precision one of fp32, fp16, int8, int32"),
    (["a:fp64"], r"^gen_trt_engine.tensorrt.layers_precision\[0\]: 'a:fp64'; accepted: "),
])
def test_bad_layers_precision_entries_are_one_line(entries, message):
    with pytest.raises(UsageError, match=message):
        parse_layers_precision(entries)


def test_a_layer_name_the_network_lacks_is_named():
    with pytest.raises(UsageError, match=r"^gen_trt_engine.tensorrt.layers_precision: no layer named '/nope' in "):
        apply_layer_precisions(TRT, network(), {"/nope": "fp16"})


def test_int8_calibrates_from_the_cache_and_writes_it(tmp_path):
    cache_file = tmp_path / "cal.bin"
    cache_file.write_bytes(b"TRT-8601-EntropyCalibration2\n")
    config = Config()
    configure_builder(TRT, None, network(), config,
                      section(data_type="INT8", calibration={"cal_cache_file": str(cache_file)}))
    assert config.flags == ["INT8"]
    calibrator = config.int8_calibrator
    assert isinstance(calibrator, _Calibrator)
    assert calibrator.read_calibration_cache() == b"TRT-8601-EntropyCalibration2\n"
    assert calibrator.get_batch_size() == 1 and calibrator.get_batch(["inputs"]) is None  # no images: the cache
    calibrator.write_calibration_cache(b"new scales")
    assert cache_file.read_bytes() == b"new scales"


def test_int8_calibration_batches_come_from_cal_image_dir(tmp_path, tiny_coco):
    from deformable_detr.export.trt import make_calibrator

    gen = spec_from_dict({"gen_trt_engine": {"input_height": 48, "input_width": 64, "tensorrt": {
        "data_type": "int8", "calibration": {"cal_image_dir": [tiny_coco["val"]["image_dir"]], "cal_batch_size": 2,
                                             "cal_batches": 2, "cal_cache_file": str(tmp_path / "cal.bin")}}}})
    config = Config()
    configure_builder(TRT, None, network(), config, gen.gen_trt_engine)
    assert config.flags == ["INT8"] and config.int8_calibrator.get_batch_size() == 2
    calibrator = make_calibrator(TRT, gen.gen_trt_engine, gen.dataset.augmentation, device="cpu")
    assert calibrator.read_calibration_cache() is None          # no cache yet: calibrate on the images
    for _ in range(2):                                         # cal_batches batches of cal_batch_size images
        (pointer,) = calibrator.get_batch(["inputs"])
        assert calibrator.current.shape == (2, 3, 48, 64) and pointer == calibrator.current.data_ptr()
        assert calibrator.current.min() < 0 < calibrator.current.max()  # normalised with the dataset's mean/std
    assert calibrator.get_batch(["inputs"]) is None


def test_the_timing_cache_is_read_combined_and_written_back(tmp_path):
    path = tmp_path / "timing.cache"
    config = Config()
    configure_builder(TRT, None, network(), config, spec_from_dict(
        {"gen_trt_engine": {"timing_cache": str(path)}}).gen_trt_engine)
    assert config.cache.data == b""          # none yet: an empty cache
    save_timing_cache(config, str(path))
    assert path.read_bytes() == b"+measured"
    config = Config()
    configure_builder(TRT, None, network(), config, spec_from_dict(
        {"gen_trt_engine": {"timing_cache": str(path)}}).gen_trt_engine)
    assert config.cache.data == b"+measured"  # read back, and the build adds to it
    save_timing_cache(config, str(path))
    assert path.read_bytes() == b"+measured+measured"


def test_int8_without_calibration_input_is_refused_before_tensorrt_is_needed(tmp_path, capsys):
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"not read: the spec is refused first")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"results_dir": str(tmp_path / "r"), "gen_trt_engine": {
        "onnx_file": str(onnx_file), "tensorrt": {"data_type": "INT8"}}}))
    assert main(["gen_trt_engine", "-e", str(spec)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "deformable-detr gen_trt_engine: error: gen_trt_engine.tensorrt.calibration.cal_image_dir: not set, and "
        "no cal_cache_file to read; an INT8 engine needs calibration images (or the cache of an earlier "
        "calibration)")
