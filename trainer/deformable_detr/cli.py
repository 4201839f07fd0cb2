"""`deformable-detr <task> -e spec.yaml [-r dir] [-k key] [--gpus N] [--num_nodes N] [section.field=value ...]`.

TAO's calling convention. Each task lives in `deformable_detr.tasks.<task>` and has
`run(spec) -> int`; the CLI loads and validates the spec, writes the effective spec
into the task's results directory, and dispatches. When the task then refuses its input
(a usage error, exit 2 or 3) before writing anything else, that record is taken back, so a
run that did nothing leaves the folder as it was.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from typing import Optional, Sequence

from . import __version__, exit_codes
from .config.defaults import default_spec_text
from .config.loader import SpecError, dump_spec, load_spec
from .config.schema import ExperimentConfig
from .errors import UsageError
from .tasks import TASKS




def _add_spec_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-e", "--experiment_spec_file", "--experiment_spec", dest="spec", required=True,
                        help="the experiment spec (YAML)")
    parser.add_argument("-r", "--results_dir", default=None, help="results folder (wins over results_dir in the spec)")
    parser.add_argument("-k", "--key", default=None, help="encryption key for checkpoints")
    parser.add_argument("--gpus", type=int, default=None, help="processes (GPUs) per node")
    parser.add_argument("--num_nodes", type=int, default=None, help="nodes in the gang (train)")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="dotted overrides that win over the spec file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deformable-detr", description="Deformable DETR: TAO's tasks, open.")
    parser.add_argument("--version", action="version", version=f"deformable-detr {__version__}")
    sub = parser.add_subparsers(dest="task", metavar="task", required=True)
    for task in TASKS.values():
        _add_spec_args(sub.add_parser(task.name, help=task.help, description=task.help))
    p = sub.add_parser("default-spec", help="print a complete, commented spec with every default")
    p.add_argument("for_task", nargs="?", metavar="task",
                   help=f"only the sections this task reads: {', '.join(TASKS)}")
    p = sub.add_parser("make-example-data", help="generate the seeded example dataset (COCO and KITTI)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num-train", type=int, default=2000, help="training images")
    p.add_argument("--num-val", type=int, default=200, help="validation images")
    p.add_argument("--image-size", type=int, default=128, help="side of the square images")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    return parser


def _task_overrides(args: argparse.Namespace) -> list[str]:
    extra = []
    if args.gpus is not None:
        # The flag sets `num_gpus` of the task's own section, where it has one.
        if not hasattr(getattr(ExperimentConfig(), args.task), "num_gpus"):
            raise SpecError(f"--gpus: the {args.task} task runs on one device; drop the flag")
        extra.append(f"{args.task}.num_gpus={args.gpus}")
    if args.num_nodes is not None:
        if args.task != "train":
            raise SpecError(f"--num_nodes: only the train task runs on several nodes, not {args.task}")
        extra.append(f"train.num_nodes={args.num_nodes}")
    return list(args.overrides) + extra


EFFECTIVE_SPEC = "experiment.yaml"


@dataclasses.dataclass
class _FolderBefore:
    """A local results folder as it was before the effective spec was written into it."""

    folder: str
    created: list[str]            # folders that did not exist yet, innermost first
    names: set[str]               # what the folder held
    previous_spec: Optional[bytes]  # the experiment.yaml it held


def write_effective_spec(spec, task: str) -> Optional[_FolderBefore]:
    """Record the spec a run used, in its results folder (without the key); returns what to undo."""
    from .runtime import storage
    from .runtime.paths import task_results_dir

    recorded = dataclasses.replace(spec, encryption_key=None)
    text = dump_spec(recorded)
    if spec.encryption_key:
        text = "# encryption_key was set (not recorded)\n" + text
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    folder = task_results_dir(spec, task).rstrip("/")
    before = None
    if storage.is_remote(folder):
        # An object store has no folders to take back; what it held is listed and kept instead.
        path = f"{folder}/{EFFECTIVE_SPEC}"
        previous = storage.read_bytes(path) if storage.exists(path) else None
        before = _FolderBefore(folder, [], set(storage.list_files(folder)), previous)
    else:
        created, parent = [], os.path.abspath(folder)
        while parent and not os.path.exists(parent):
            created.append(parent)
            parent = os.path.dirname(parent)
        names = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        path = os.path.join(folder, EFFECTIVE_SPEC)
        previous = open(path, "rb").read() if os.path.isfile(path) else None
        before = _FolderBefore(folder, created, names, previous)
    storage.write_text(f"{folder}/{EFFECTIVE_SPEC}", text)
    return before


def undo_effective_spec(before: Optional[_FolderBefore]) -> None:
    """Put the folder back as it was, unless the task has written something else there."""
    from .runtime import storage

    if before is not None and storage.is_remote(before.folder):
        from .runtime.training_log import LOG_NAME

        path = f"{before.folder}/{EFFECTIVE_SPEC}"
        # The training log records the refused attempt itself; anything else new means the task ran.
        ignored = {path, f"{before.folder}/{LOG_NAME}"}
        if set(storage.list_files(before.folder)) - ignored != before.names - ignored:
            return
        if before.previous_spec is not None:
            storage.write_bytes(path, before.previous_spec)
        else:
            storage.delete(path)
        return
    if before is None or not os.path.isdir(before.folder):
        return
    if set(os.listdir(before.folder)) - {EFFECTIVE_SPEC} != before.names - {EFFECTIVE_SPEC}:
        return
    path = os.path.join(before.folder, EFFECTIVE_SPEC)
    if before.previous_spec is not None:
        from .runtime.storage import write_bytes

        write_bytes(path, before.previous_spec)
        return
    if os.path.isfile(path):
        os.remove(path)
    for folder in before.created:
        try:
            os.rmdir(folder)
        except OSError:
            break


def load_task(task: str):
    try:
        return importlib.import_module(f"deformable_detr.tasks.{task}")
    except ModuleNotFoundError as err:
        if err.name == f"deformable_detr.tasks.{task}":
            raise UsageError(f"the {task} task is not built yet in this version of deformable-detr") from None
        raise


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .runtime.logging import setup_logging

    try:
        if args.task == "default-spec":
            if args.for_task is not None and args.for_task not in TASKS:
                raise UsageError(f"{args.for_task!r} is not a task; accepted: {', '.join(TASKS)}")
            sys.stdout.write(default_spec_text(args.for_task))
            return 0
        if args.task == "make-example-data":
            setup_logging()
            from .data.example import make_example_data
            make_example_data(args.out, num_train=args.num_train, num_val=args.num_val,
                              image_size=args.image_size, seed=args.seed)
            return 0
        spec = load_spec(args.spec, _task_overrides(args), results_dir=args.results_dir, key=args.key)
        setup_logging(verbose=spec.train.verbose)
        from .runtime.paths import task_results_dir
        task_results_dir(spec, args.task)  # fails early, naming the field, when no results folder is set
        module = load_task(args.task)
        before = write_effective_spec(spec, args.task)
        try:
            return int(module.run(spec) or 0)
        except UsageError:
            undo_effective_spec(before)
            raise
    except UsageError as err:
        print(f"deformable-detr {args.task}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"deformable-detr {args.task}: interrupted", file=sys.stderr)
        return exit_codes.INTERRUPTED.code


def entrypoint() -> None:
    sys.exit(main())
