"""JSON schema (OpenAPI v3 flavour, as CRDs take it) generated from the spec dataclasses."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Dict, List

from .schema import ExperimentConfig

_NONE = type(None)


def _schema_for(tp, meta: dict, default: Any) -> dict:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not _NONE][0]
        out = _schema_for(inner, meta, default)
        out["nullable"] = True
        return out
    if dataclasses.is_dataclass(tp):
        out = dataclass_schema(tp)
    elif origin in (list, List):
        (item,) = typing.get_args(tp)
        out = {"type": "array", "items": _schema_for(item, {}, dataclasses.MISSING)}
    elif origin in (dict, Dict) and typing.get_args(tp)[1] is Any:
        # Free-form arguments for another tool: kept as written.
        out = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    elif origin in (dict, Dict):
        out = {"type": "object", "additionalProperties": _schema_for(typing.get_args(tp)[1], {}, dataclasses.MISSING)}
    elif tp is bool:
        out = {"type": "boolean"}
    elif tp is int:
        out = {"type": "integer"}
    elif tp is float:
        out = {"type": "number"}
    elif tp is str:
        out = {"type": "string"}
    else:
        raise TypeError(f"unsupported schema type {tp}")
    if meta.get("help"):
        out["description"] = meta["help"]
    if "choices" in meta and not meta.get("case_insensitive"):
        out["enum"] = [*meta["choices"], *meta.get("value_aliases", {})]
    if "min" in meta:
        out["minimum"] = meta["min"]
    if "max" in meta:
        out["maximum"] = meta["max"]
    if default is not dataclasses.MISSING and default is not None and not dataclasses.is_dataclass(default):
        out["default"] = default
    return out


def dataclass_schema(cls) -> dict:
    hints = typing.get_type_hints(cls)
    instance = cls()
    props = {}
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata)
        aliases = meta.get("aliases", [])
        # An aliased field carries no default here: the API server would fill it in beside a spec's
        # alias and the loader would see two values. The trainer applies the default itself.
        default = dataclasses.MISSING if aliases else getattr(instance, f.name)
        props[f.name] = _schema_for(hints[f.name], meta, default)
        for alias in aliases:
            props[alias] = _schema_for(hints[f.name], {**meta, "help": f"another name for {f.name}; give one"},
                                       dataclasses.MISSING)
    return {"type": "object", "properties": props}


def experiment_schema() -> dict:
    """Schema of a whole experiment spec, the `spec.experiment` of a DeformableDetrJob."""
    return dataclass_schema(ExperimentConfig)
