"""The spec schema: defaults, overrides, and one clear error for every kind of bad input."""
from __future__ import annotations

import pytest

from deformable_detr.config import ExperimentConfig, SpecError, load_spec, spec_from_dict, spec_to_dict
from deformable_detr.config.jsonschema import experiment_schema


def test_defaults_match_tao_tables():
    spec = ExperimentConfig()
    assert spec.model.backbone == "resnet_50"
    assert spec.model.num_queries == 300 and spec.model.num_feature_levels == 4
    assert spec.model.return_interm_indices == [1, 2, 3, 4]
    assert spec.model.dim_feedforward == 1024 and spec.model.dropout_ratio == 0.3
    assert (spec.model.cls_loss_coef, spec.model.bbox_loss_coef, spec.model.giou_loss_coef) == (2.0, 5.0, 2.0)
    assert spec.train.optim.lr == 2e-4 and spec.train.optim.lr_backbone == 2e-5
    assert spec.train.optim.lr_scheduler == "MultiStep" and spec.train.optim.lr_steps == [40]
    assert spec.train.num_epochs == 50 and spec.train.precision == "fp32"
    assert spec.dataset.dataset_type == "serialized" and spec.dataset.augmentation.fixed_padding is True
    assert spec.dataset.augmentation.fixed_random_crop is None
    assert spec.evaluate.conf_threshold == 0.0 and spec.inference.conf_threshold == 0.5
    assert spec.export.input_width == 960 and spec.export.input_height == 544
    assert spec.export.batch_size == -1 and spec.export.opset_version == 17
    assert spec.convert.num_shards == 32 and spec.convert.num_partitions == 1


def test_file_then_overrides(write_spec):
    path = write_spec({"model": {"num_queries": 100}, "train": {"num_epochs": 3, "optim": {"lr": "1e-4"}}})
    spec = load_spec(path, ["train.num_epochs=7", "model.return_interm_indices=[1,2,3]",
                            "model.num_feature_levels=3", "train.precision=BF16"])
    assert spec.model.num_queries == 100
    assert spec.train.num_epochs == 7
    assert spec.train.optim.lr == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as text; accepted as a number
    assert spec.model.return_interm_indices == [1, 2, 3]
    assert spec.train.precision == "bf16"


def test_results_dir_flag_wins(write_spec):
    path = write_spec({"results_dir": "/from/file"})
    assert load_spec(path, [], results_dir="/from/flag").results_dir == "/from/flag"


def test_single_data_source_mapping_is_accepted():
    spec = spec_from_dict({"dataset": {"train_data_sources": {"image_dir": "a", "json_file": "b.json"},
                                       "infer_data_sources": {"image_dir": "imgs", "classmap": "c.txt"}}})
    assert spec.dataset.train_data_sources[0].json_file == "b.json"
    assert spec.dataset.infer_data_sources.image_dir == ["imgs"]


@pytest.mark.parametrize("raw, expected", [
    ({"model": {"num_querys": 10}}, "model.num_querys: unknown field; did you mean 'model.num_queries'"),
    ({"modle": {}}, "modle: unknown field; did you mean 'model'"),
    ({"model": {"num_feature_levels": 7}}, "model.num_feature_levels: 7 is out of range; accepted: 1..4"),
    ({"model": {"num_queries": "many"}}, "model.num_queries: got many; expected an integer"),
    ({"model": {"with_box_refine": "yes"}}, "model.with_box_refine: got 'yes'; expected true or false"),
    ({"model": {"backbone": "resnet50"}}, "model.backbone: 'resnet50' is not accepted; choose one of"),
    ({"model": {"num_feature_levels": 3}}, "model.return_interm_indices: [1, 2, 3, 4] has 4 entries but "
                                           "model.num_feature_levels is 3"),
    ({"train": {"precision": "fp8"}}, "train.precision: 'fp8' is not accepted; choose one of fp32, fp16, bf16"),
    ({"train": {"optim": {"optimizer": "Adam"}}}, "train.optim.optimizer: 'Adam' is not accepted"),
    ({"train": {"distributed_strategy": "fsdp2"}}, "train.distributed_strategy: 'fsdp2' is not accepted"),
    ({"dataset": {"train_sampler": "random"}}, "dataset.train_sampler: 'random' is not accepted"),
    ({"dataset": {"dataset_type": "lmdb"}}, "dataset.dataset_type: 'lmdb' is not accepted"),
    ({"dataset": {"augmentation": {"fixed_random_crop": 100}}},
     "dataset.augmentation.fixed_random_crop: 100 must be divisible by 32"),
    ({"dataset": {"augmentation": {"input_mean": [0.5]}}}, "dataset.augmentation.input_mean: expected 3 values"),
    ({"dataset": {"train_data_sources": [{"image_dir": "a", "json": "b"}]}},
     "dataset.train_data_sources[0].json: unknown field; did you mean 'dataset.train_data_sources[0].json_file'"),
    ({"export": {"input_channel": 1}}, "export.input_channel: 1 is not accepted; choose one of 3"),
    ({"export": {"opset_version": 12}}, "export.opset_version: 12 is out of range; accepted: 16..20"),
    ({"export": {"batch_size": 0}}, "export.batch_size: 0 is not accepted"),
    ({"model": []}, "model: got []; expected a mapping with keys"),
    ({"inference": {"conf_threshold": 1.5}}, "inference.conf_threshold: 1.5 is out of range; accepted: 0.0..1.0"),
    ({"train": {"optim": {"lr_monitor": "val_mAP"}}},
     "train.optim.lr_monitor: 'val_mAP' is not accepted; choose one of val_loss, train_loss"),
    ({"train": {"optim": {"monitor_name": "loss"}}},
     "train.optim.monitor_name: 'loss' is not accepted; choose one of val_loss, train_loss"),
    ({"train": {"optim": {"lr_scheduler": "CosineAnnealing"}}},
     "train.optim.lr_scheduler: 'CosineAnnealing' is not accepted; choose one of MultiStep, StepLR, AutoReduce"),
    ({"train": {"optim": {"lr_scheduler": "AutoReduce", "lr_decay": 1.0}}},
     "train.optim.lr_decay: 1.0 does not reduce the lr; AutoReduce accepts 0.0 <= lr_decay < 1.0"),
    ({"train": {"optim": {"patience": -1}}}, "train.optim.patience: -1 is out of range; accepted: >= 0"),
])
def test_bad_values_name_the_field(raw, expected):
    with pytest.raises(SpecError) as info:
        spec_from_dict(raw)
    assert expected in str(info.value)


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="spec file not found: .*nope.yaml"):
        load_spec(str(tmp_path / "nope.yaml"))


def test_malformed_yaml_reports_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  num_queries: 10\n  backbone: [resnet_50\ntrain:\n  num_epochs: 2\n")
    with pytest.raises(SpecError) as info:
        load_spec(str(path))
    assert f"{path}:4:" in str(info.value) and "malformed YAML" in str(info.value)


def test_bad_override_syntax():
    with pytest.raises(SpecError, match="expected section.field=value"):
        load_spec(None, ["train.num_epochs"])


def test_round_trip_through_dict():
    spec = spec_from_dict({"model": {"num_queries": 7}})
    assert spec_from_dict(spec_to_dict(spec)) == spec


def test_json_schema_covers_every_field():
    schema = experiment_schema()
    model = schema["properties"]["model"]["properties"]
    assert model["num_feature_levels"] == {"type": "integer", "description": model["num_feature_levels"]["description"],
                                           "minimum": 1, "maximum": 4, "default": 4}
    assert model["backbone"]["enum"][0] == "resnet_18"
    sources = schema["properties"]["dataset"]["properties"]["train_data_sources"]
    assert sources["items"]["properties"]["json_file"]["type"] == "string"
    assert set(schema["properties"]) == {f for f in ExperimentConfig.__dataclass_fields__}


def test_lr_monitor_is_also_spelled_monitor_name(write_spec):
    # TAO's table says lr_monitor, TAO's code monitor_name: one field, either spelling, in a file or an override.
    assert ExperimentConfig().train.optim.lr_monitor == "val_loss"
    assert spec_from_dict({"train": {"optim": {"lr_monitor": "train_loss"}}}).train.optim.lr_monitor == "train_loss"
    assert spec_from_dict({"train": {"optim": {"monitor_name": "train_loss"}}}).train.optim.lr_monitor == "train_loss"
    path = write_spec({"train": {"optim": {"monitor_name": "train_loss"}}})
    assert load_spec(path).train.optim.lr_monitor == "train_loss"
    assert load_spec(None, ["train.optim.monitor_name=train_loss"]).train.optim.lr_monitor == "train_loss"
    same = {"lr_monitor": "train_loss", "monitor_name": "train_loss"}
    assert spec_from_dict({"train": {"optim": same}}).train.optim.lr_monitor == "train_loss"
    with pytest.raises(SpecError) as info:
        spec_from_dict({"train": {"optim": {"lr_monitor": "val_loss", "monitor_name": "train_loss"}}})
    assert str(info.value).startswith("train.optim.monitor_name: train_loss conflicts with train.optim.lr_monitor: "
                                      "val_loss; they are one field")
    # What a spec is written back as: the documented name only.
    assert "monitor_name" not in spec_to_dict(ExperimentConfig())["train"]["optim"]


def test_alias_in_the_json_schema_has_no_default():
    # The API server fills defaults in: a default beside a spec's monitor_name would make two values.
    optim = experiment_schema()["properties"]["train"]["properties"]["optim"]["properties"]
    assert optim["lr_monitor"]["enum"] == optim["monitor_name"]["enum"] == ["val_loss", "train_loss"]
    assert "default" not in optim["lr_monitor"] and "default" not in optim["monitor_name"]
    assert optim["lr_scheduler"]["enum"] == ["MultiStep", "StepLR", "AutoReduce"]
