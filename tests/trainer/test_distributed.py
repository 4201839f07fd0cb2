"""runtime.distributed: process-group setup and collectives under a real torchrun (gloo, CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from deformable_detr.errors import UsageError
from deformable_detr.runtime import distributed

WORKER = textwrap.dedent("""
    import json, os, sys
    import torch
    from deformable_detr.runtime import distributed

    info = distributed.setup()
    gathered = distributed.all_gather_objects({"rank": info.rank})
    stop = distributed.any_rank(info.rank == info.world_size - 1)
    mean = distributed.all_reduce_mean(torch.tensor([float(info.rank)]))
    from_main = distributed.broadcast_object("hello" if info.is_main else None)
    distributed.barrier()
    out = {"rank": info.rank, "world_size": info.world_size, "local_rank": info.local_rank,
           "device": str(info.device), "is_main": info.is_main, "gathered": gathered,
           "stop": stop, "mean": mean.item(), "from_main": from_main}
    with open(os.path.join(sys.argv[1], f"rank{info.rank}.json"), "w") as fh:
        json.dump(out, fh)
    distributed.cleanup()
""")


def test_single_process_helpers_are_local(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = distributed.setup()
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}]
    assert distributed.any_rank(False) is False
    assert distributed.broadcast_object(3) == 3
    distributed.barrier()


def test_collectives_under_torchrun(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", DDETR_DIST_TIMEOUT_S="60")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), str(tmp_path)], capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    outs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, out in enumerate(outs):
        assert out["rank"] == rank and out["world_size"] == 2 and out["local_rank"] == rank
        assert out["device"] == "cpu" and out["is_main"] == (rank == 0)
        assert out["gathered"] == [{"rank": 0}, {"rank": 1}]
        assert out["stop"] is True  # only rank 1 raised the flag; both see it
        assert out["mean"] == pytest.approx(0.5)
        assert out["from_main"] == "hello"


def test_launch_if_needed_runs_the_command_in_n_workers(tmp_path, monkeypatch, capfd):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # `default-spec convert` is a real CLI command; two workers each print it.
    code = distributed.launch_if_needed(["default-spec", "convert"], num_gpus=2, num_nodes=1)
    assert code == 0
    assert capfd.readouterr().out.count("num_shards:") == 2


def test_launch_if_needed_does_nothing_in_one_process_or_under_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.launch_if_needed(["train"], num_gpus=1, num_nodes=1) is None
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.launch_if_needed(["train"], num_gpus=2, num_nodes=1) is None


def test_multi_node_launch_needs_a_rendezvous(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UsageError, match="MASTER_ADDR and NODE_RANK"):
        distributed.torchrun_command(["train"], num_gpus=2, num_nodes=2)
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("NODE_RANK", "1")
    cmd = distributed.torchrun_command(["train", "-e", "s.yaml"], num_gpus=2, num_nodes=2)
    assert "--nnodes=2" in cmd and "--node_rank=1" in cmd and "--master_addr=10.0.0.1" in cmd
    assert cmd[-4:] == ["deformable_detr", "train", "-e", "s.yaml"]


def test_exit_codes_tell_a_lost_peer_from_a_bug_and_a_usage_error():
    """The operator retries 128-255 and gives up on 1-127: a lost peer must read as retryable."""
    import torch.distributed as dist

    lost = [dist.DistBackendError("NCCL communicator was aborted"), dist.DistNetworkError("connection refused"),
            RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234")]
    for err in lost:
        assert distributed.exit_code_for(err) == distributed.EXIT_PEER_LOST
    try:  # raised while handling a collective's failure: still a lost peer
        try:
            raise dist.DistBackendError("gloo: timed out")
        except dist.DistBackendError as inner:
            raise ValueError("all_gather_object failed") from inner
    except ValueError as wrapped:
        assert distributed.exit_code_for(wrapped) == distributed.EXIT_PEER_LOST
    assert distributed.exit_code_for(ValueError("shape mismatch")) == 1
    assert distributed.exit_code_for(RuntimeError("CUDA out of memory")) == 1
    assert distributed.exit_code_for(UsageError("train.num_epochs: ...")) == 2
    assert 128 <= distributed.EXIT_PEER_LOST <= 255 and distributed.EXIT_PEER_LOST != 143


def test_launcher_exit_code_from_torchrun_and_the_workers():
    code = distributed.launcher_exit_code
    assert code(0, False, []) == 0
    assert code(1, True, [distributed.EXIT_PEER_LOST]) == 143  # SIGTERM to the launcher
    # A worker SIGKILLed records nothing; its peer records the lost peer: retryable.
    assert code(1, False, [distributed.EXIT_PEER_LOST]) == distributed.EXIT_PEER_LOST
    # A bug in one worker makes its peers lose it: the bug decides (permanent).
    assert code(1, False, [1, distributed.EXIT_PEER_LOST]) == 1
    assert code(1, False, [distributed.EXIT_PEER_LOST, 2]) == 2
    assert code(1, False, [143, 143]) == 143
    # No worker recorded a code: each was killed by a signal (this node's rank SIGKILLed by the
    # OOM killer): 137, retryable, as a container runtime reports a SIGKILL.
    assert code(1, False, []) == distributed.EXIT_KILLED == 137


FAILING_WORKER = textwrap.dedent("""
    import sys
    import torch
    from deformable_detr.runtime import distributed

    info = distributed.setup()
    if info.rank == 1:  # what train.run does on failing: record the code, then exit with it
        code = distributed.EXIT_PEER_LOST if sys.argv[1] == "lost" else 1
        distributed.record_exit_code(code)
        raise SystemExit(code)
    distributed.record_exit_code(0)
""")


def test_launch_if_needed_reports_the_codes_its_workers_recorded(tmp_path, monkeypatch):
    """torchrun exits 1 whatever failed; the launcher reads what its workers recorded instead."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    script = tmp_path / "worker.py"
    script.write_text(FAILING_WORKER)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(distributed, "torchrun_command",
                        lambda argv, n, _nodes: [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                 f"--nproc_per_node={n}", str(script), *argv])
    assert distributed.launch_if_needed(["lost"], num_gpus=2) == distributed.EXIT_PEER_LOST
    assert distributed.launch_if_needed(["bug"], num_gpus=2) == 1
