"""Load a spec file, apply dotted overrides, and validate it against the schema.

Every error a user can cause ends in one `SpecError` whose message names the dotted
field (or the file) and what is accepted.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
import os
import re
import secrets
import types
import typing
from typing import Any, Dict, List, Optional, Sequence

import yaml

from ..errors import UsageError, relative_to_cwd
from .schema import ConvertConfig, ExperimentConfig


class SpecError(UsageError):
    """A spec the user wrote (or a value they passed) cannot be used."""


_NONE = type(None)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not _NONE]
        return f"{_type_name(args[0])} or null"
    if origin in (list, List):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (dict, Dict):
        return f"a mapping of {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    if tp is Any:
        return "any value"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _show(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _convert(value: Any, tp, path: str, meta: dict):
    """Check `value` against type `tp` and return it in canonical form."""
    if tp is Any:  # free-form arguments passed through to another tool (TAO's quantize backends)
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not _NONE][0]
        return _convert(value, inner, path, meta)
    if value is None:
        raise SpecError(f"{path}: must not be null; expected {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, path)
    if origin in (list, List):
        (item_tp,) = typing.get_args(tp)
        # A single item where a list is expected is a common shorthand (TAO accepts it too).
        if not isinstance(value, list):
            if isinstance(value, (str, dict)) and (item_tp is str or dataclasses.is_dataclass(item_tp)):
                value = [value]
            else:
                raise SpecError(f"{path}: got {_show(value)}; expected {_type_name(tp)}")
        return [_convert(v, item_tp, f"{path}[{i}]", meta) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise SpecError(f"{path}: got {_show(value)}; expected {_type_name(tp)}")
        key_tp, val_tp = typing.get_args(tp)
        return {str(k): _convert(v, val_tp, f"{path}.{k}", meta) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise SpecError(f"{path}: got {_show(value)}; expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"{path}: got {_show(value)}; expected an integer")
        return _check_range(value, path, meta)
    if tp is float:
        # YAML 1.1 reads `2e-4` (no dot) as a string; accept any string Python reads as a number.
        given = value
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise SpecError(f"{path}: got {_show(value)}; expected a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{path}: got {_show(value)}; expected a number")
        try:
            number = float(value)
        except OverflowError:  # an integer too large for a float
            number = math.inf
        if not math.isfinite(number):  # nan, inf: every later use of the number would be undefined
            raise SpecError(f"{path}: {given} is not a finite number; accepted: a finite number")
        return _check_range(number, path, meta)
    if tp is str:
        if not isinstance(value, str):
            raise SpecError(f"{path}: got {_show(value)}; expected a string")
        return _check_choice(value, path, meta)
    raise TypeError(f"unsupported schema type {tp} at {path}")


def _check_range(value, path, meta):
    lo, hi = meta.get("min"), meta.get("max")
    if "choices" in meta:
        return _check_choice(value, path, meta)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        if lo is not None and hi is not None:
            accepted = f"{lo}..{hi}"
        elif lo is not None:
            accepted = f">= {lo}"
        else:
            accepted = f"<= {hi}"
        raise SpecError(f"{path}: {value} is out of range; accepted: {accepted}")
    return value


def _check_choice(value, path, meta):
    choices = meta.get("choices")
    if choices is None:
        return value
    value = meta.get("value_aliases", {}).get(value, value)
    if meta.get("case_insensitive") and isinstance(value, str):
        for c in choices:
            if c.lower() == value.lower():
                return c
    if value in choices:
        return value
    hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
    accepted = [*map(str, choices), *(f"{alias} (= {name})" for alias, name in meta.get("value_aliases", {}).items())]
    raise SpecError(f"{path}: {value!r} is not accepted; choose one of {', '.join(accepted)}{suggestion}")


def build_dataclass(cls, raw: Any, path: str = ""):
    """Build dataclass `cls` from a mapping, validating every field."""
    where = path or "spec"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: got {_show(raw)}; expected {_type_name(cls)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    raw, spelled = _resolve_aliases(fields, raw, path)
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            suggestion = f"; did you mean {(path + '.' if path else '') + close[0]!r}?" if close else ""
            raise SpecError(f"{(path + '.' if path else '') + str(key)}: unknown field{suggestion} "
                            f"(valid fields of {where}: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        # Errors name the field as the spec spelled it (an alias where it used one).
        dotted = f"{path}.{spelled.get(name, name)}" if path else spelled.get(name, name)
        if name in raw:
            kwargs[name] = _convert(raw[name], hints[name], dotted, dict(f.metadata))
    return cls(**kwargs)


def _resolve_aliases(fields: dict, raw: dict, path: str) -> tuple[dict, dict]:
    """`raw` with aliases renamed to their field, and {field: alias} for those the spec used."""
    aliases = {alias: name for name, f in fields.items() for alias in f.metadata.get("aliases", ())}
    if not any(key in aliases for key in raw):
        return raw, {}
    prefix = path + "." if path else ""
    resolved, spelled = {}, {}
    for key, value in raw.items():
        name = aliases.get(key, key)
        if name in resolved and resolved[name] != value:
            other = spelled.get(name, name) if key == name else name
            raise SpecError(f"{prefix}{key}: {_show(value)} conflicts with {prefix}{other}: {_show(resolved[name])}; "
                            f"they are one field ({', '.join(fields[name].metadata['aliases'])} is another name "
                            f"for {name}): give one")
        resolved[name] = value
        if key != name:
            spelled[name] = key
    return resolved, spelled


def spec_to_dict(spec) -> dict:
    return dataclasses.asdict(spec)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.field=value` -> (['section', 'field'], parsed value)."""
    if "=" not in text:
        raise SpecError(f"override {text!r}: expected section.field=value")
    key, _, raw_value = text.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise SpecError(f"override {text!r}: expected section.field=value")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else None
    except yaml.YAMLError:
        value = raw_value  # not YAML: take the text as it is
    return key.split("."), value


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for i, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            elif not isinstance(child, dict):
                raise SpecError(f"override {text!r}: {'.'.join(keys[:i + 1])} is not a section")
            node = child
        node[keys[-1]] = value
    return raw


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int, first_line: int) -> None:
        super().__init__(key)
        self.key, self.line, self.first_line = key, line, first_line


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _value in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *anchor` merges; keys written beside it override, as YAML intends
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line)
                except TypeError:  # an unhashable key: let PyYAML report it
                    continue
                if first != key_node.start_mark.line:
                    raise _DuplicateKey(key, key_node.start_mark.line + 1, first + 1)
        return super().construct_mapping(node, deep=deep)


def read_spec_file(path: str) -> dict:
    if not os.path.exists(path):
        raise SpecError(f"spec file not found: {path}" + relative_to_cwd(path))
    if os.path.isdir(path):
        raise SpecError(f"spec file {path} is a folder, expected a file (YAML)")
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.load(fh, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as dup:
        raise SpecError(f"{path}:{dup.line}: duplicate key {dup.key!r} (first given on line {dup.first_line}); "
                        "each key may appear once in a section") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecError(f"{where}: malformed YAML: {problem}") from None
    except UnicodeDecodeError:
        raise SpecError(f"spec file {path} is not UTF-8 text") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: the spec must be a mapping of sections, got {_show(raw)}")
    return raw


def check_consistency(spec: ExperimentConfig) -> None:
    """Rules that span several fields."""
    model = spec.model
    indices = model.return_interm_indices
    if len(indices) != model.num_feature_levels:
        raise SpecError(
            f"model.return_interm_indices: {indices} has {len(indices)} entries but "
            f"model.num_feature_levels is {model.num_feature_levels}; give one index per level")
    if any(i < 0 or i > 4 for i in indices) or sorted(set(indices)) != list(indices):
        raise SpecError(f"model.return_interm_indices: {indices}; accepted: increasing, distinct values in 0..4 "
                        "(0..3 = backbone stage, 4 = extra stride-2 conv level)")
    if model.hidden_dim % model.nheads:
        raise SpecError(f"model.hidden_dim: {model.hidden_dim} must be divisible by model.nheads ({model.nheads})")
    if model.hidden_dim % 32:
        raise SpecError(f"model.hidden_dim: {model.hidden_dim} must be a multiple of 32 (GroupNorm(32) projections)")
    aug = spec.dataset.augmentation
    for name in ("input_mean", "input_std"):
        if len(getattr(aug, name)) != 3:
            raise SpecError(f"dataset.augmentation.{name}: expected 3 values (R, G, B), got {getattr(aug, name)}")
    if any(s <= 0 for s in aug.input_std):
        raise SpecError(f"dataset.augmentation.input_std: values must be > 0, got {aug.input_std}")
    for name in ("scales", "train_random_resize"):
        values = getattr(aug, name)
        if not values or any(v <= 0 for v in values):
            raise SpecError(f"dataset.augmentation.{name}: expected a non-empty list of positive sizes, got {values}")
    if aug.train_random_crop_min > aug.train_random_crop_max:
        raise SpecError(f"dataset.augmentation.train_random_crop_min: {aug.train_random_crop_min} is larger than "
                        f"train_random_crop_max ({aug.train_random_crop_max})")
    if aug.fixed_random_crop is not None and aug.fixed_random_crop % 32:
        raise SpecError(f"dataset.augmentation.fixed_random_crop: {aug.fixed_random_crop} must be divisible by 32")
    optim = spec.train.optim
    if any(s <= 0 for s in optim.lr_steps):
        raise SpecError(f"train.optim.lr_steps: epochs must be positive, got {optim.lr_steps}")
    if optim.lr_scheduler == "AutoReduce" and optim.lr_decay >= 1.0:
        raise SpecError(f"train.optim.lr_decay: {optim.lr_decay} does not reduce the lr; "
                        "AutoReduce accepts 0.0 <= lr_decay < 1.0")
    if spec.export.batch_size == 0:
        raise SpecError("export.batch_size: 0 is not accepted; use -1 (dynamic) or a positive batch")
    if spec.model.dld_model_dir_path:
        raise SpecError(f"model.dld_model_dir_path: {spec.model.dld_model_dir_path!r}; models edited by TAO's "
                        "DLD tool are not supported; accepted: null")
    for section in dataclasses.fields(spec):  # the sections with gpu_ids: train, evaluate, inference
        ids = getattr(getattr(spec, section.name), "gpu_ids", None)
        if ids is not None and (any(i < 0 for i in ids) or len(set(ids)) != len(ids)):
            raise SpecError(f"{section.name}.gpu_ids: {ids}; accepted: distinct GPU indices >= 0")
    if not re.fullmatch(r"cuda|cpu|trt|cuda:[0-9]+", spec.quantize.device):
        raise SpecError(f"quantize.device: {spec.quantize.device!r} is not accepted; "
                        "choose one of cuda, cpu, trt, cuda:N")
    convert = spec.convert
    if convert.partition_mode == "random" and convert.num_partitions != 2:
        raise SpecError(f"convert.num_partitions: {convert.num_partitions} with partition_mode random; "
                        "accepted: 2 (fold 0 validation, fold 1 training)")
    if convert.partition_mode is None and convert.num_partitions != 1:
        raise SpecError(f"convert.num_partitions: {convert.num_partitions} needs convert.partition_mode; "
                        "accepted: random (2 partitions) or sequence")
    trt = spec.gen_trt_engine.tensorrt
    if not trt.min_batch_size <= trt.opt_batch_size <= trt.max_batch_size:
        raise SpecError("gen_trt_engine.tensorrt: need min_batch_size <= opt_batch_size <= max_batch_size, got "
                        f"{trt.min_batch_size}, {trt.opt_batch_size}, {trt.max_batch_size}")


def lift_flat_convert(raw: dict) -> dict:
    """TAO's convert spec is flat: `input_source`, `data_root`, ... at the top level, written into
    `results_dir` itself. Those keys move into the `convert` section (and `results_dir` becomes
    `convert.results_dir`, so the shards land where TAO puts them)."""
    convert_fields = {f.name for f in dataclasses.fields(ConvertConfig)} - {"results_dir"}
    flat = [key for key in raw if key in convert_fields]
    if not flat:
        return raw
    raw = dict(raw)
    section = raw.get("convert")
    if section is None:
        section = {}
    elif not isinstance(section, dict):
        raise SpecError(f"convert: got {_show(section)}; expected a mapping (or TAO's flat convert keys alone)")
    section = dict(section)
    for key in flat:
        value = raw.pop(key)
        if key in section and section[key] != value:
            raise SpecError(f"{key}: {_show(value)} conflicts with convert.{key}: {_show(section[key])}; "
                            "they are one field (TAO's flat convert spec and the convert section): give one")
        section[key] = value
    if raw.get("results_dir") is not None and section.get("results_dir") is None:
        section["results_dir"] = raw["results_dir"]
    raw["convert"] = section
    return raw


def spec_from_dict(raw: dict) -> ExperimentConfig:
    spec = build_dataclass(ExperimentConfig, lift_flat_convert(raw))
    check_consistency(spec)
    return spec


def pick_seed(spec: ExperimentConfig, environ=os.environ) -> ExperimentConfig:
    """`train.seed: -1` is TAO's "no fixed seed": one is picked here, so the effective spec records it.

    Workers this process starts read that effective spec. Ranks started on their own (torchrun on
    several nodes) must agree without talking: they derive it from what they share, the rendezvous.
    """
    if spec.train.seed != -1:
        return spec
    if int(environ.get("WORLD_SIZE", "1")) > 1:
        shared = "|".join(environ.get(name, "") for name in (
            "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT", "DDETR_JOB_NAME", "WORLD_SIZE"))
        seed = int.from_bytes(hashlib.sha256(shared.encode()).digest()[:4], "little") & 0x7FFFFFFF
    else:
        seed = secrets.randbelow(2 ** 31)
    return dataclasses.replace(spec, train=dataclasses.replace(spec.train, seed=seed))


def load_spec(path: Optional[str], overrides: Sequence[str] = (), results_dir: Optional[str] = None,
              key: Optional[str] = None) -> ExperimentConfig:
    """The effective spec: file, then dotted overrides, then -r / -k (which win)."""
    raw = read_spec_file(path) if path else {}
    raw = apply_overrides(raw, overrides)
    if results_dir is not None:
        raw["results_dir"] = results_dir
    if key is not None:
        raw["encryption_key"] = key
    return pick_seed(spec_from_dict(raw))


def dump_spec(spec: ExperimentConfig) -> str:
    return yaml.safe_dump(spec_to_dict(spec), sort_keys=False)
