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
