"""Dataclasses -> OpenAPI schema, and raw objects -> checked, defaulted dataclasses, from one declaration.

A field is declared once with `prop` (description, default, bounds, enum, pattern, CEL rules of its
class); `object_schema` writes the CRD's structural schema from it and `parse` reads a raw object
with the same facts: the API server's checks in one-line messages naming the field, unknown fields
pruned and defaults filled in, as the API server does. Patterns are left to the API server: the
operator keeps accepting what it accepted before the schema was typed (local results paths in tests).
"""
from __future__ import annotations

import dataclasses
import functools
import re
import types
import typing
from typing import Any, Callable, Mapping

from deformable_detr.errors import UsageError

MISSING = dataclasses.MISSING
_TYPES = {int: "integer", str: "string", bool: "boolean", float: "number"}
_EXPECTED = {"integer": "an integer", "string": "a string", "boolean": "true or false", "number": "a number",
             "object": "a mapping", "array": "a list"}


class JobSpecError(UsageError):
    """A DeformableDetrJob that cannot run; the message names the field."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """A CEL rule of an object: the API server evaluates `cel`; `holds` is the same rule in Python,
    `detail` (optional) its message with the values in it, below the object's path."""

    cel: str
    message: str
    holds: Callable[[Any], bool]
    detail: Callable[[Any], str] | None = None


def prop(description: str = "", *, default: Any = MISSING, factory: Any = MISSING, required: bool = False,
         schema: Callable[[], dict] | None = None, opaque: bool = False, **constraints: Any) -> Any:
    """A field: its schema facts. `schema` gives a hand-written schema (core/v1 types passed through);
    `opaque` fields are checked elsewhere (the experiment: by the trainer's own loader)."""
    return dataclasses.field(default=default, default_factory=factory, metadata={
        "description": description, "required": required, "schema": schema, "opaque": opaque,
        "constraints": constraints})


def json_name(attribute: str) -> str:
    head, *rest = attribute.rstrip("_").split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _unwrap(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


@functools.cache
def fields(cls: type) -> tuple[tuple[dataclasses.Field, str, Any], ...]:
    """(field, JSON name, type without Optional) of a declared class (resolved once: every pass parses)."""
    hints = typing.get_type_hints(cls)
    return tuple((f, json_name(f.name), _unwrap(hints[f.name])) for f in dataclasses.fields(cls))


def field_schema(f: dataclasses.Field, hint: Any) -> dict:
    meta, description = f.metadata, f.metadata.get("description", "")
    if meta.get("schema") is not None:
        out = dict(meta["schema"]())
        if description:
            out["description"] = description
        return out
    if dataclasses.is_dataclass(hint):
        return object_schema(hint, description)
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        out = {"type": "array", "items": object_schema(item) if dataclasses.is_dataclass(item)
               else {"type": _TYPES[item]}, **meta["constraints"]}
    elif origin is dict:
        out = {"type": "object", "additionalProperties": {"type": _TYPES[typing.get_args(hint)[1]]}}
    else:
        out = {"type": _TYPES[hint], "description": description, **meta["constraints"]}
        if f.default is not MISSING and f.default is not None:
            out["default"] = f.default
        return out
    if description:
        out["description"] = description
    return out


def object_schema(cls: type, description: str = "") -> dict:
    description = description or getattr(cls, "DESCRIPTION", "")
    out: dict[str, Any] = {"type": "object", "properties": {}}
    required = []
    for f, name, hint in fields(cls):
        out["properties"][name] = field_schema(f, hint)
        if f.metadata.get("required"):
            required.append(name)
    if required:
        out["required"] = required
    if description:
        out["description"] = description
    rules = getattr(cls, "RULES", ())
    if rules:
        out["x-kubernetes-validations"] = [{"rule": r.cel, "message": r.message} for r in rules]
    if getattr(cls, "PRESERVE_UNKNOWN", False):
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


# --- reading a raw object ----------------------------------------------------------------

def kind(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"[:80]


def _refuse(path: str, value: Any, expected: str) -> JobSpecError:
    return JobSpecError(f"{path}: {kind(value)} is not accepted; {expected}")


def check(value: Any, schema: Mapping[str, Any], path: str) -> Any:
    """`value` checked against an OpenAPI schema; returns it pruned of undeclared fields and nulls."""
    if schema.get("x-kubernetes-int-or-string"):
        if not isinstance(value, (int, str)) or isinstance(value, bool):
            raise _refuse(path, value, "a quantity such as 8, 500m or 64Gi")
        return value
    expected = schema.get("type")
    if expected == "object":
        if not isinstance(value, Mapping):
            raise _refuse(path, value, "a mapping")
        for name in schema.get("required") or ():
            if value.get(name) is None:
                raise JobSpecError(f"{path}.{name}: required")
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return dict(value)
        if "additionalProperties" in schema:
            return {k: check(v, schema["additionalProperties"], f"{path}.{k}") for k, v in value.items()}
        return {k: check(v, schema["properties"][k], f"{path}.{k}") for k, v in value.items()
                if k in schema.get("properties", {}) and v is not None}
    if expected == "array":
        if not isinstance(value, list):
            raise _refuse(path, value, "a list")
        if len(value) > schema.get("maxItems", len(value)):
            raise JobSpecError(f"{path}: {len(value)} items are not accepted; at most {schema['maxItems']}")
        return [check(item, schema["items"], f"{path}[{i}]") for i, item in enumerate(value)]
    return _scalar(value, schema, path)


def _scalar(value: Any, schema: Mapping[str, Any], path: str) -> Any:
    expected = schema["type"]
    python = {"integer": int, "string": str, "boolean": bool, "number": (int, float)}[expected]
    if not isinstance(value, python) or (isinstance(value, bool) and expected != "boolean"):
        what = "a non-empty string" if expected == "string" and schema.get("minLength") else _EXPECTED[expected]
        raise _refuse(path, value, what)
    if "enum" in schema and value not in schema["enum"]:
        raise _refuse(path, value, "one of " + ", ".join(str(v) for v in schema["enum"]))
    if expected == "string" and len(value) < schema.get("minLength", 0):
        raise JobSpecError(f"{path}: required; a non-empty string")
    if expected == "string" and "pattern" in schema and not re.search(schema["pattern"], value):
        raise _refuse(path, value, f"a string matching {schema['pattern']}")  # as the API server would
    low, high = schema.get("minimum"), schema.get("maximum")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"{low if low is not None else ''}..{high if high is not None else ''}"
        raise JobSpecError(f"{path}: {value} is out of range; accepted: {bounds}")
    return value


def parse(cls: type, raw: Any, path: str) -> Any:
    """`raw` as a `cls`: checked, pruned, defaults filled in; JobSpecError names the first bad field."""
    if not isinstance(raw, Mapping):
        raise _refuse(path, raw, "a mapping")
    values = {}
    for f, name, hint in fields(cls):
        where, value = f"{path}.{name}", raw.get(name)
        if value is None:
            if name in raw and f.default is not MISSING and f.default is not None:
                raise _refuse(where, None, _EXPECTED[field_schema(f, hint)["type"]])
            if f.metadata.get("required") and f.default is MISSING and f.default_factory is MISSING:
                raise JobSpecError(f"{where}: required; {f.metadata['description']}")
            continue  # the default
        values[f.name] = _read(f, hint, value, where)
    obj = cls(**values)
    for rule in getattr(cls, "RULES", ()):
        if not rule.holds(obj):
            raise JobSpecError(f"{path}.{rule.detail(obj)}" if rule.detail else f"{path}: {rule.message}")
    return obj


def _read(f: dataclasses.Field, hint: Any, value: Any, path: str) -> Any:
    if f.metadata.get("opaque"):
        if not isinstance(value, Mapping):
            raise _refuse(path, value, f"a mapping ({f.metadata['description']})")
        return value
    if dataclasses.is_dataclass(hint):
        return parse(hint, value, path)
    if typing.get_origin(hint) is list and dataclasses.is_dataclass(typing.get_args(hint)[0]):
        check(value, {"type": "array", "items": {"type": "object"}, **f.metadata["constraints"]}, path)
        return tuple(parse(typing.get_args(hint)[0], item, f"{path}[{i}]") for i, item in enumerate(value))
    return check(value, field_schema(f, hint), path)
