"""One fact, one home: exit codes and task names are defined in their tables and nowhere else."""
from __future__ import annotations

import ast
import os
from pathlib import Path

from deformable_detr import exit_codes
from deformable_detr.tasks import DEFAULT_TASK, TASKS

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = [ROOT / "trainer" / "deformable_detr", ROOT / "operator" / "ddetr_operator"]
HOMES = {ROOT / "trainer" / "deformable_detr" / "exit_codes.py", ROOT / "trainer" / "deformable_detr" / "tasks" / "__init__.py"}
SPECIAL_CODES = {entry.code for entry in exit_codes.ALL if entry.code > 1}


def _product_files():
    for folder in PRODUCT:
        for path in sorted(folder.rglob("*.py")):
            if path not in HOMES:
                yield path


def _literal_ints(node: ast.AST) -> set[int]:
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and type(n.value) is int}


def test_exit_codes_have_one_home():
    """No product file spells a special exit code as a number where it returns, exits or names one."""
    found = []
    for path in _product_files():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            target = None
            if isinstance(node, ast.Return) and isinstance(node.value, ast.Constant):
                target = node.value
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("exit", "_exit"):
                target = node
            elif isinstance(node, ast.Assign) and any("EXIT" in ast.unparse(t).upper() or "exit_code" in ast.unparse(t)
                                                      for t in node.targets):
                target = node.value
            if target is not None and _literal_ints(target) & SPECIAL_CODES:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)[:80]}")
    assert not found, "exit codes written outside deformable_detr/exit_codes.py:\n" + "\n".join(found)


def test_exit_code_table_is_consistent():
    codes = [entry.code for entry in exit_codes.ALL]
    assert len(codes) == len(set(codes)), "two meanings for one exit code"
    assert [entry.code for entry in exit_codes.ALL if entry.retryable] == [130, 143, 200, 201, 202, 203]
    assert exit_codes.describe(200).startswith("exit code 200 (PeerLost")
    assert exit_codes.describe(137) == "exit code 137 (killed by signal 9)"


def test_task_names_have_one_home():
    """No product file lists the task names again: a list or set holding two or more of them is a second home."""
    names = set(TASKS)
    found = []
    for path in _product_files():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.List, ast.Tuple, ast.Set, ast.Dict)):
                items = node.keys if isinstance(node, ast.Dict) else node.elts
                strings = {n.value for n in items if isinstance(n, ast.Constant) and isinstance(n.value, str)}
                if len(strings & names) >= 2:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)[:80]}")
    assert not found, "task names listed outside deformable_detr/tasks/__init__.py:\n" + "\n".join(found)
    assert DEFAULT_TASK in TASKS
    for name in TASKS:
        module = ROOT / "trainer" / "deformable_detr" / "tasks" / name
        assert module.with_suffix(".py").exists() or (module / "__init__.py").exists(), name


# --- the operator's API: every default of a DeformableDetrJob is written in api.py only ----------------

OPERATOR = ROOT / "operator" / "ddetr_operator"
API_HOME = OPERATOR / "api.py"


def _spec_defaults() -> dict[str, object]:
    """JSON name -> default of every spec field (nested ones too) that has one, from api.py's types."""
    import dataclasses

    from ddetr_operator import api
    from ddetr_operator.apischema import fields

    out: dict[str, object] = {}
    todo = [api.JobSpec]
    while todo:
        cls = todo.pop()
        for field, name, hint in fields(cls):
            if dataclasses.is_dataclass(hint):
                todo.append(hint)
            elif field.default is not dataclasses.MISSING and field.default is not None:
                out[name] = field.default
    return out


def _operator_files():
    return [path for path in sorted(OPERATOR.rglob("*.py")) if path != API_HOME]


def test_operator_spec_defaults_have_one_home():
    """No operator module reads a defaulted spec field with a default of its own (`.get("masterPort", 29500)`)
    nor spells a distinctive default (29500, 9090, the grace period, the shm size, the default task) again."""
    from ddetr_operator import api

    defaults = _spec_defaults()
    assert {"masterPort": 29500, "metricsPort": 9090, "backoffLimit": 3, "task": DEFAULT_TASK,
            "terminationGracePeriodSeconds": api.DEFAULT_TERMINATION_GRACE_SECONDS}.items() <= defaults.items()
    distinctive = {defaults[name] for name in ("masterPort", "metricsPort", "terminationGracePeriodSeconds",
                                               "shmSize", "task")}
    found = []
    for path in _operator_files():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("get", "setdefault") \
                    and len(node.args) == 2 and isinstance(node.args[0], ast.Constant) \
                    and node.args[0].value in defaults and node.args[0].value != "key":
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)[:80]}")
            elif isinstance(node, ast.Constant) and type(node.value) in (int, str) and node.value in distinctive:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not found, "spec defaults written outside operator/ddetr_operator/api.py:\n" + "\n".join(found)


def test_the_crd_and_the_operators_checks_read_the_same_bounds():
    """terminationGracePeriodSeconds once drifted (minimum 30 in the CRD, 0 in validate.py): both are api.py's now."""
    import copy

    import pytest

    from ddetr_operator import api
    from ddetr_operator.crd import build_crd
    from ddetr_operator.validate import JobSpecError, validate_job

    spec_schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    grace = spec_schema["properties"]["terminationGracePeriodSeconds"]
    assert grace["minimum"] == api.MIN_TERMINATION_GRACE_SECONDS and grace["default"] == api.DEFAULT_TERMINATION_GRACE_SECONDS
    spec = {"image": "trainer", "artifacts": {"uri": "s3://bucket/x"}, "experiment": {}}
    for name, node in spec_schema["properties"].items():
        if node.get("type") == "integer" and "minimum" in node:
            validate_job("demo", {**copy.deepcopy(spec), name: node["minimum"]})
            with pytest.raises(JobSpecError, match=f"^spec.{name}: .* out of range"):
                validate_job("demo", {**copy.deepcopy(spec), name: node["minimum"] - 1})
