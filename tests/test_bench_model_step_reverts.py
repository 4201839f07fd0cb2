"""bench/model_step.py times each speed change of ours alone by patching the original Deformable-DETR's
computation back in: each revert must compute the current model's outputs (else the figure would time
another model), must really be called, and must leave the model as it was."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def model_step(monkeypatch):
    monkeypatch.setenv("DDETR_MSDA_IMPL", "reference")  # no compiled kernel needed
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("model_step_under_test", BENCH / "model_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("_common", None)


@pytest.fixture
def small(model_step):
    torch.manual_seed(0)
    model, _ = model_step.ours(model_step.CONFIGS["small"])
    images, masks, _ = model_step.batch(64, 2)
    return model, images, masks


def test_each_revert_computes_the_current_outputs_and_is_undone_after(model_step, small):
    from deformable_detr.model import attention, detector, transformer

    before = (attention.MSDeformAttn._sampling_locations, torch.nn.MultiheadAttention.forward, transformer._relu,
              detector.DeformableDETR.forward)
    differences = model_step.check_reverts(*small)
    assert set(differences) == set(model_step.CHANGES)
    assert all(0.0 <= d <= model_step.REVERT_ATOL for d in differences.values()), differences
    assert before == (attention.MSDeformAttn._sampling_locations, torch.nn.MultiheadAttention.forward,
                      transformer._relu, detector.DeformableDETR.forward)


def test_a_revert_that_computes_something_else_stops_the_bench(model_step, small, monkeypatch):
    monkeypatch.setattr(model_step, "_relu_out_of_place", lambda hidden: hidden)  # no ReLU at all
    with pytest.raises(RuntimeError, match="'relu_out_of_place' no longer computes"):
        model_step.check_reverts(*small)


def test_a_revert_the_model_no_longer_calls_stops_the_bench(model_step, small, monkeypatch):
    from deformable_detr.model import attention

    # A deformable attention that never computes sampling locations: the revert would time nothing.
    monkeypatch.setattr(attention.MSDeformAttn, "forward", lambda self, query, *args, **kwargs: query)
    with pytest.raises(RuntimeError, match="'sampling_locations': the original's code was never called"):
        model_step.check_reverts(*small, changes=["sampling_locations"])
