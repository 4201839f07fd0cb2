"""Process-group setup, the few collectives the tasks use, and the torchrun relaunch with its exit codes.

Every helper is a no-op in a single process, so tasks call them unconditionally; the settings
(`DDETR_DIST_TIMEOUT_S`) and the exit-code rules are in docs/architecture.md.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import signal
import subprocess
import sys
import tempfile
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.distributed as dist

from .. import exit_codes
from ..errors import UsageError
from .logging import get_logger
from .signals import EXIT_SIGTERM

log = get_logger("distributed")

# Seconds a collective may wait for a peer before the run fails, so a dead peer ends the run instead
# of hanging it; DDETR_DIST_TIMEOUT_S sets it (a checkpoint save of a large model may need longer).
TIMEOUT_ENV = "DDETR_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 900

EXIT_PEER_LOST = exit_codes.PEER_LOST.code

# Where the launcher asks its workers to record their exit codes (torchrun itself exits 1 on any failure).
EXIT_CODE_DIR_ENV = "DDETR_EXIT_CODE_DIR"

# Words of the RuntimeErrors that gloo and NCCL raise when a peer is gone or silent (older torch
# versions, and some paths of newer ones, raise plain RuntimeError instead of DistError).
_COMMUNICATION_MARKERS = ("gloo", "nccl", "connection closed", "connection reset", "broken pipe")


@dataclasses.dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"environment variable {name}={value!r}: expected an integer") from None


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun), before any process group exists."""
    return _env_int("RANK", 0)


def timeout_seconds() -> int:
    return max(1, _env_int(TIMEOUT_ENV, DEFAULT_TIMEOUT_S))


def setup() -> DistInfo:
    """Join the process group when launched by torchrun (NCCL with CUDA, else gloo); describe this process."""
    rank, world_size = launched_rank(), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_seconds()),
                                device_id=device if use_cuda else None)
        log.debug("joined process group: rank %d of %d (%s)", rank, world_size, backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device, is_main=rank == 0)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _active():
        dist.barrier()


def all_gather_objects(obj: Any) -> list:
    """Every rank's `obj`, in rank order (a one-item list in a single process)."""
    if not _active():
        return [obj]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if not _active():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True on every rank when `flag` is true on at least one (e.g. a SIGTERM seen by one rank)."""
    if not _active():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device or _collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of `values` over ranks (a copy; the input is untouched)."""
    if not _active():
        return values.clone()
    out = values.detach().clone().to(_collective_device())
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return (out / dist.get_world_size()).to(values.device)


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def wrap_model(model: torch.nn.Module, strategy: str, info: DistInfo,
               shard_units: Sequence[torch.nn.Module] = ()) -> torch.nn.Module:
    """The model as training runs it: as is in one process, DDP for `ddp`, FSDP2 for `ddp_sharded`.

    `ddp_sharded` uses FSDP2 `fully_shard` (each of `shard_units`, then the root) rather than
    ZeroRedundancyOptimizer: ZeRO shards only the optimizer state, FSDP2 also shards the
    gradients (and the parameters between uses), which is what a large model needs; its
    DTensor state dicts load back through torch.distributed.checkpoint's full state dicts.
    """
    model = model.to(info.device)
    if not info.distributed:
        return model
    if strategy == "ddp_sharded":
        from torch.distributed.fsdp import fully_shard

        for unit in shard_units:
            fully_shard(unit)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    # Some parameters get no gradient in a step (unused levels; the intermediate decoder heads under
    # with_box_refine when aux_loss is off): let DDP find them, else it fails the next step.
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module under a DDP wrapper (FSDP2 modifies the module in place: returned as is)."""
    return getattr(model, "module", model)


def torchrun_command(task_argv: Sequence[str], num_gpus: int, num_nodes: int) -> list[str]:
    """The `python -m torch.distributed.run ... -m deformable_detr <argv>` line for this machine."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={num_gpus}"]
    if num_nodes > 1:
        # A multi-node gang needs a rendezvous every node agrees on; the operator (or the user) sets it.
        missing = [name for name in ("MASTER_ADDR", "NODE_RANK") if not os.environ.get(name)]
        if missing:
            raise UsageError(
                f"train.num_nodes={num_nodes}: set {' and '.join(missing)} (and MASTER_PORT) on every node, "
                "or start each node with torchrun --nnodes N --node_rank I --rdzv-endpoint HOST:PORT")
        cmd += [f"--nnodes={num_nodes}", f"--node_rank={os.environ['NODE_RANK']}",
                f"--master_addr={os.environ['MASTER_ADDR']}",
                f"--master_port={os.environ.get('MASTER_PORT', '29500')}"]
    else:
        cmd += ["--standalone", "--nnodes=1"]
    return cmd + ["-m", "deformable_detr", *task_argv]


def is_communication_failure(err: BaseException) -> bool:
    """Whether `err` (or an error it was raised from) is torch.distributed failing to reach a peer."""
    seen: set[int] = set()
    current: Optional[BaseException] = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, dist.DistError):  # DistBackendError, DistNetworkError, DistStoreError
            return True
        if isinstance(current, RuntimeError) and any(m in str(current).lower() for m in _COMMUNICATION_MARKERS):
            return True
        current = current.__cause__ or current.__context__
    return False


def exit_code_for(err: BaseException) -> int:
    """The exit code a task ending with `err` reports: 2/3 usage, 130/143 a stop signal, 200 peer lost, 1 bug."""
    from .signals import Stopped

    if isinstance(err, (UsageError, Stopped)):
        return err.exit_code
    if isinstance(err, KeyboardInterrupt):
        return exit_codes.INTERRUPTED.code
    if is_communication_failure(err):
        return EXIT_PEER_LOST
    return exit_codes.BUG.code


def record_exit_code(code: int) -> None:
    """Leave this worker's exit code where `launch_if_needed` reads it (nothing outside its launch)."""
    folder = os.environ.get(EXIT_CODE_DIR_ENV)
    if not folder:
        return
    path = os.path.join(folder, f"rank{os.environ.get('RANK', '0')}")  # as given: never fails while exiting
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        fh.write(str(code))
    os.replace(path + ".tmp", path)


def _recorded_exit_codes(folder: str) -> list[int]:
    codes = []
    for name in sorted(os.listdir(folder)):
        if name.startswith("rank") and not name.endswith(".tmp"):
            with open(os.path.join(folder, name), encoding="utf-8") as fh:
                codes.append(int(fh.read().strip() or 1))
    return codes


EXIT_KILLED = 128 + signal.SIGKILL


def launcher_exit_code(torchrun_code: int, terminated: bool, worker_codes: Iterable[int]) -> int:
    """The launcher's exit code from torchrun's (1 on any worker failure) and the codes workers recorded.

    A permanent failure (1-127: a bug, a usage error) wins over a lost peer, which it usually
    causes: a worker that raised leaves its peers failing in their next collective.
    """
    if torchrun_code == 0:
        return 0
    if terminated:
        return EXIT_SIGTERM
    codes = list(worker_codes)
    permanent = [c for c in codes if c > 0 and not exit_codes.is_retryable(c)]
    if permanent:
        return permanent[0]
    # The rank that met the cause (a full disk, storage down) says more than its peers' lost-peer codes.
    for retryable in (exit_codes.DISK_FULL, exit_codes.STORAGE_UNAVAILABLE, exit_codes.PEER_LOST,
                      exit_codes.TERMINATED, exit_codes.INTERRUPTED):
        if retryable.code in codes:
            return retryable.code
    if not codes:
        # Every worker that exits on its own records its code; none did, so they were killed by a
        # signal (the OOM killer's SIGKILL, a segfault): report it as a container runtime would
        # (128 + 9), retryable, not as torchrun's blanket 1, which reads as permanent.
        return EXIT_KILLED
    return torchrun_code


def relaunch_in_workers(spec, task: str, num_gpus: int, num_nodes: int = 1) -> Optional[int]:
    """Run `task` of `spec` (an ExperimentConfig) in torchrun workers; None = work in this process.

    The workers read the effective spec from a temporary file; the key goes on their command
    line (as -k), never into a file.
    """
    if under_torchrun() or (num_gpus <= 1 and num_nodes <= 1):
        return None
    from ..config.loader import dump_spec

    with tempfile.TemporaryDirectory(prefix=f"ddetr-{task}-") as folder:
        spec_path = os.path.join(folder, "spec.yaml")
        with open(spec_path, "w", encoding="utf-8") as fh:
            fh.write(dump_spec(dataclasses.replace(spec, encryption_key=None)))
        argv = [task, "-e", spec_path] + (["-k", spec.encryption_key] if spec.encryption_key else [])
        return launch_if_needed(argv, num_gpus=num_gpus, num_nodes=num_nodes)


def launch_if_needed(task_argv: Sequence[str], num_gpus: int, num_nodes: int = 1) -> Optional[int]:
    """Start `num_gpus` workers under torchrun and return their exit code; None = work in this process.

    SIGTERM and SIGINT reach the workers through torchrun; a run stopped by SIGTERM
    reports 143 (retryable), as the workers themselves do; workers that lost a peer, 200.
    """
    if under_torchrun() or (num_gpus <= 1 and num_nodes <= 1):
        return None
    if torch.cuda.is_available() and num_gpus > torch.cuda.device_count():
        raise UsageError(f"num_gpus: {num_gpus} processes asked for, but this machine has "
                         f"{torch.cuda.device_count()} GPU(s); accepted: 1..{torch.cuda.device_count()}")
    cmd = torchrun_command(task_argv, num_gpus, num_nodes)
    log.info("starting %d worker(s) per node on %d node(s): %s", num_gpus, num_nodes, " ".join(cmd[:6]))
    with tempfile.TemporaryDirectory(prefix="ddetr-exit-codes-") as codes_dir:
        child = subprocess.Popen(cmd, env={**os.environ, EXIT_CODE_DIR_ENV: codes_dir})
        terminated = False

        def _forward(signum, _frame):
            nonlocal terminated
            terminated = terminated or signum == signal.SIGTERM
            child.send_signal(signum)

        previous = {sig: signal.signal(sig, _forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            code = child.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return launcher_exit_code(code, terminated, _recorded_exit_codes(codes_dir))
