"""evaluate/inference gpu_ids and num_gpus, reconciled as TAO does, made the visible GPUs."""
from __future__ import annotations

import pytest

from deformable_detr.errors import UsageError
from deformable_detr.tasks.devices import reconcile_gpus, select_gpus


@pytest.mark.parametrize("num_gpus, gpu_ids, expected", [
    (1, [0], [0]),
    (1, [2], [2]),
    (2, [1, 3], [1, 3]),
    (2, [0], [0, 1]),        # more GPUs than ids: ids 0..N-1
    (1, [2, 3], [2, 3]),     # more ids than GPUs: the ids win
    (3, [5, 6], [0, 1, 2]),
])
def test_num_gpus_and_gpu_ids_reconcile_as_in_tao(num_gpus, gpu_ids, expected):
    assert reconcile_gpus(num_gpus, gpu_ids) == expected


def test_the_chosen_gpus_become_the_visible_ones():
    env: dict = {}
    assert select_gpus("inference", 2, [1, 3], environ=env) == 2
    assert env["CUDA_VISIBLE_DEVICES"] == "1,3"


def test_the_first_gpus_leave_the_environment_alone():
    env = {"CUDA_VISIBLE_DEVICES": "7"}
    assert select_gpus("inference", 2, [0], environ=env) == 2 and env == {"CUDA_VISIBLE_DEVICES": "7"}
    env = {}
    assert select_gpus("evaluate", 1, [0], environ=env) == 1 and env == {}


def test_ids_index_into_gpus_made_visible_already():
    env = {"CUDA_VISIBLE_DEVICES": "4,5,6"}
    assert select_gpus("evaluate", 1, [2], environ=env) == 1
    assert env["CUDA_VISIBLE_DEVICES"] == "6"
    with pytest.raises(UsageError, match=r"^evaluate.gpu_ids: \[3\] but 3 GPU\(s\) are visible "
                                         r"\(CUDA_VISIBLE_DEVICES=4,5,6\); accepted: ids 0..2$"):
        select_gpus("evaluate", 1, [3], environ={"CUDA_VISIBLE_DEVICES": "4,5,6"})


def test_a_torchrun_worker_keeps_what_its_parent_chose():
    env = {"RANK": "1", "WORLD_SIZE": "2", "CUDA_VISIBLE_DEVICES": "1,3"}
    assert select_gpus("inference", 2, [1, 3], environ=env) == 2
    assert env["CUDA_VISIBLE_DEVICES"] == "1,3"


def test_several_nodes_are_refused_in_one_line():
    with pytest.raises(UsageError, match=r"^inference.num_nodes: 2; inference runs on one node; accepted: 1$"):
        select_gpus("inference", 1, [0], num_nodes=2, environ={})


def test_gpus_given_to_a_container_without_cuda_are_said_in_one_line(caplog):
    """A device plugin's NVIDIA_VISIBLE_DEVICES where CUDA sees no device (this machine): one
    warning, then the CPU; nothing without the variable, nor in torchrun's workers."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here: the line is for containers without one")
    caplog.set_level("WARNING")
    assert select_gpus("train", 1, [0], environ={"NVIDIA_VISIBLE_DEVICES": "fake-gpu-1"}) == 1
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["train: NVIDIA_VISIBLE_DEVICES=fake-gpu-1 names GPU(s), but no CUDA device is visible "
                     "(no NVIDIA driver or device in this container): running on the CPU"]
    caplog.clear()
    select_gpus("train", 1, [0], environ={})
    select_gpus("train", 1, [0], environ={"NVIDIA_VISIBLE_DEVICES": "fake-gpu-1", "RANK": "0", "WORLD_SIZE": "2"})
    select_gpus("train", 1, [0], environ={"NVIDIA_VISIBLE_DEVICES": "void"})
    assert not caplog.records
