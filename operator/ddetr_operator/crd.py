"""The DeformableDetrJob CustomResourceDefinition, generated from api.py's types.

`python -m ddetr_operator.crd` prints it; `--write PATH` writes it (atomically). The
committed `crds/deformabledetrjobs.yaml` and the chart's copy are this output; a test fails
when they differ.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from deformable_detr.runtime.storage import write_text

from . import GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION, api


def _cel_literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _unchanged(path: str, default: Any = None) -> str:
    """CEL: the field at `path` (below self/oldSelf) is the same in the old and the new object.

    Absent and present differ, except for a field with a default (the API server fills it in
    whenever its parent exists): there absent reads as the default.
    """
    parts = path.split(".")
    def present(root: str) -> str:
        return " && ".join(f"has({root}.{'.'.join(parts[:i + 1])})" for i in range(len(parts)))
    new, old = f"self.{path}", f"oldSelf.{path}"
    if default is not None:
        literal = _cel_literal(default)
        return f"({present('self')} ? {new} : {literal}) == ({present('oldSelf')} ? {old} : {literal})"
    return f"({present('self')}) == ({present('oldSelf')}) && (!({present('self')}) || {new} == {old})"


def _immutable_spec_rule(spec_schema: dict) -> dict:
    """One transition rule: every spec field but runPolicy.suspend (and the TTL) keeps its value."""
    terms = []
    for name, prop in spec_schema["properties"].items():
        if name in api.RESIZABLE_WHILE_SUSPENDED:
            continue  # _resize_rule
        if name == "runPolicy":
            for field, sub in prop["properties"].items():
                if field not in api.MUTABLE_RUN_POLICY:
                    terms.append(_unchanged(f"runPolicy.{field}", sub.get("default")))
        else:
            terms.append(_unchanged(name))
    return {"rule": " && ".join(terms),
            "message": "spec is immutable once the job exists, except runPolicy.suspend, "
                       "runPolicy.ttlSecondsAfterFinished, and nodes and gpusPerNode while suspended: create a new "
                       "job (suspend this one to stop it)"}


def _resize_rule(spec_schema: dict) -> dict:
    """nodes and gpusPerNode change only while the job is suspended (before or with the change)."""
    def suspended(root: str) -> str:
        return f"(has({root}.runPolicy) && has({root}.runPolicy.suspend) && {root}.runPolicy.suspend)"
    unchanged = " && ".join(_unchanged(name, spec_schema["properties"][name].get("default"))
                            for name in api.RESIZABLE_WHILE_SUSPENDED)
    # A gang-scheduled job's PodGroup keeps the size it was created with: not resizable.
    return {"rule": f"({unchanged}) || (!has(self.gangScheduling) && ({suspended('oldSelf')} || {suspended('self')}))",
            "message": f"{' and '.join('spec.' + n for n in api.RESIZABLE_WHILE_SUSPENDED)} may change only while "
                       "the job is suspended (runPolicy.suspend: true before or in the same change) and has no "
                       "gangScheduling; unsuspending resumes from the newest checkpoint at the new size"}


def job_spec_schema() -> dict:
    """OpenAPI schema of `spec`: the experiment plus how to run it on the cluster."""
    spec = api.spec_schema()
    spec["x-kubernetes-validations"] = [_immutable_spec_rule(spec), _resize_rule(spec),
                                        *spec["x-kubernetes-validations"]]
    return spec


def _column_type(schema: dict, path: str) -> str:
    if path == ".metadata.creationTimestamp":
        return "date"
    node = schema
    for part in path.lstrip(".").split("."):
        node = node["properties"][part]
    return node["type"]


def build_crd() -> dict:
    spec, status = job_spec_schema(), api.status_schema()
    root = {"type": "object", "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                             "metadata": {"type": "object"}, "spec": spec, "status": status},
            "required": ["spec"],
            "x-kubernetes-validations": [{"rule": api.NAME_RULE.cel, "message": api.NAME_RULE.message}]}
    columns = [{"name": name, "type": _column_type(root, path), "jsonPath": path} for name, path in api.PRINTER_COLUMNS]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "plural": PLURAL, "singular": SINGULAR, "shortNames": SHORT_NAMES,
                      "listKind": f"{KIND}List", "categories": ["all"]},
            "versions": [{
                "name": VERSION, "served": True, "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": columns,
                "schema": {"openAPIV3Schema": root},
            }],
        },
    }


def render_crd_yaml() -> str:
    header = "# Generated by `python -m ddetr_operator.crd --write crds/deformabledetrjobs.yaml`; do not edit.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="PATH", help="write the CRD here instead of printing it")
    args = parser.parse_args(argv)
    text = render_crd_yaml()
    if args.write:
        write_text(args.write, text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
