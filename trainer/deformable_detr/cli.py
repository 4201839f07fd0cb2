"""`deformable-detr <task> -e spec.yaml [-r dir] [-k key] [--gpus N] [--num_nodes N] [section.field=value ...]`.

TAO's calling convention: load and validate the spec, hold the task's results folder
(tasks/results_folder.py), and run `deformable_detr.tasks.<task>.run(spec) -> int`. SIGTERM and
SIGINT end any task in one line with their own exit code (runtime/signals.py).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

from . import __version__, exit_codes
from .config.defaults import default_spec_text
from .config.loader import SpecError, load_spec
from .config.schema import ExperimentConfig
from .errors import UsageError
from .runtime import termination
from .runtime.signals import Stopped, stop_signals_raise
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
    from .tasks import NOT_PROVIDED
    for name in NOT_PROVIDED:  # unlisted; whatever follows is taken as is, so the answer is main's one line
        sub.add_parser(name, prefix_chars="\0", add_help=False).add_argument("ignored", nargs="*")
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


def load_task(task: str):
    try:
        return importlib.import_module(f"deformable_detr.tasks.{task}")
    except ModuleNotFoundError as err:
        if err.name == f"deformable_detr.tasks.{task}":
            raise UsageError(f"the {task} task is not built yet in this version of deformable-detr") from None
        raise


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    with stop_signals_raise():
        return _main(args)


def _main(args: argparse.Namespace) -> int:
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
        if args.task not in TASKS:
            from .tasks import NOT_PROVIDED
            raise UsageError(NOT_PROVIDED[args.task])
        spec = load_spec(args.spec, _task_overrides(args), results_dir=args.results_dir, key=args.key)
        setup_logging(verbose=spec.train.verbose)
        if TASKS[args.task].torch_threads:
            from .runtime.cpu_budget import apply_cpu_budget
            apply_cpu_budget()  # thread pools sized from the container's CPU quota, not the host's cores
        from .runtime.paths import task_results_dir
        from .tasks.results_folder import check_writable, effective_spec_recorded, one_writer, results_dir_field

        # Fails early, naming the field, when no results folder is set or it cannot be written.
        check_writable(task_results_dir(spec, args.task), results_dir_field(spec, args.task))
        module = load_task(args.task)

        with one_writer(spec, args.task), effective_spec_recorded(spec, args.task):
            return int(module.run(spec) or 0)
    except UsageError as err:
        print(f"deformable-detr {args.task}: error: {err}", file=sys.stderr)
        termination.write(err.exit_code, termination.classify(err.exit_code, err), str(err))
        return err.exit_code
    except KeyboardInterrupt:
        print(f"deformable-detr {args.task}: interrupted", file=sys.stderr)
        return exit_codes.INTERRUPTED.code
    except Stopped as stop:
        print(f"deformable-detr {args.task}: stopped by {stop.signal_name} before it finished; experiment.yaml "
              "in its results folder describes the results there", file=sys.stderr)
        return stop.exit_code


def entrypoint() -> None:
    # A failing exit leaves its class, step and reason in /dev/termination-log for the operator.
    with termination.recorded(launcher="RANK" not in os.environ):
        sys.exit(main())
