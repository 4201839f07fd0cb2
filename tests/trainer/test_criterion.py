"""Set criterion (focal, L1, GIoU; auxiliary and encoder terms; box count across ranks) and post-process."""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchvision.ops import sigmoid_focal_loss as torchvision_focal

from deformable_detr.model.criterion import SetCriterion, weight_dict_for
from deformable_detr.model.matcher import HungarianMatcher
from deformable_detr.model.postprocess import PostProcess

TARGETS = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.2, 0.4]])},
           {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]


def criterion(aux: bool = True, two_stage: bool = False, num_classes: int = 4) -> SetCriterion:
    weights = weight_dict_for(2.0, 5.0, 2.0, dec_layers=3, aux_loss=aux, two_stage=two_stage)
    return SetCriterion(num_classes, HungarianMatcher(2.0, 5.0, 2.0), weights, focal_alpha=0.25)


def outputs(seed: int = 0, queries: int = 6, classes: int = 4):
    generator = torch.Generator().manual_seed(seed)
    return {"pred_logits": torch.randn(2, queries, classes, generator=generator, requires_grad=True),
            "pred_boxes": (torch.rand(2, queries, 4, generator=generator) * 0.5 + 0.25).requires_grad_()}


def test_focal_term_equals_torchvision_focal_loss_per_box():
    out = outputs()
    crit = criterion(aux=False)
    losses = crit.unweighted(out, TARGETS)
    indices = crit.matcher(out, TARGETS)
    onehot = torch.zeros_like(out["pred_logits"])
    for b, (queries, targets) in enumerate(indices):
        onehot[b, queries, TARGETS[b]["labels"][targets]] = 1
    # The original's mean over queries times the number of queries: a sum over all entries, per box (3).
    expected = torchvision_focal(out["pred_logits"], onehot, alpha=0.25, gamma=2, reduction="sum") / 3
    torch.testing.assert_close(losses["loss_ce"], expected)


def test_perfect_boxes_have_zero_box_losses_and_weights_apply():
    out = outputs()
    with torch.no_grad():
        out["pred_boxes"][0, 1] = TARGETS[0]["boxes"][0]
        out["pred_boxes"][0, 4] = TARGETS[0]["boxes"][1]
        out["pred_boxes"][1, 2] = TARGETS[1]["boxes"][0]
        out["pred_logits"].fill_(-8.0)
        out["pred_logits"][0, 1, 1] = out["pred_logits"][0, 4, 2] = out["pred_logits"][1, 2, 3] = 8.0
    crit = criterion(aux=False)
    raw = crit.unweighted(out, TARGETS)
    assert raw["loss_bbox"].item() < 1e-6 and raw["loss_giou"].item() < 1e-6 and raw["loss_ce"].item() < 1e-3
    weighted = crit(outputs(1), TARGETS)
    raw = crit.unweighted(outputs(1), TARGETS)
    for key, coef in (("loss_ce", 2.0), ("loss_bbox", 5.0), ("loss_giou", 2.0)):
        torch.testing.assert_close(weighted[key], raw[key] * coef)


def test_aux_and_encoder_terms_and_gradients():
    final, aux0, aux1, enc = outputs(0), outputs(1), outputs(2), outputs(3, classes=4)
    out = {**final, "aux_outputs": [aux0, aux1], "enc_outputs": enc}
    crit = criterion(aux=True, two_stage=True)
    losses = crit(out, TARGETS)
    assert set(losses) == set(crit.weight_dict) == {f"{k}{s}" for k in ("loss_ce", "loss_bbox", "loss_giou")
                                                    for s in ("", "_0", "_1", "_enc")}
    # An auxiliary term is the same computation as the final one on that layer's predictions.
    torch.testing.assert_close(losses["loss_ce_1"], crit({**aux1}, TARGETS)["loss_ce"])
    sum(losses.values()).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (*final.values(), *enc.values()))
    # The encoder term is class-agnostic: labels are all 0.
    binary = [{**t, "labels": torch.zeros_like(t["labels"])} for t in TARGETS]
    torch.testing.assert_close(losses["loss_ce_enc"], crit(enc, binary)["loss_ce"])


def _count_boxes(rank: int, world: int, init_file: str, result_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    targets = TARGETS if rank == 0 else TARGETS[1:]  # 3 boxes on rank 0, 1 box on rank 1
    num_boxes = criterion()._num_boxes(targets, torch.device("cpu"))
    if rank == 0:
        with open(result_file, "w") as fh:
            fh.write(str(num_boxes))
    dist.destroy_process_group()


def test_box_count_is_averaged_across_ranks(tmp_path):
    result = tmp_path / "num_boxes"
    # fork: the children reuse the imported modules (spawn would re-import torch in each).
    mp.start_processes(_count_boxes, args=(2, str(tmp_path / "init"), str(result)), nprocs=2, join=True,
                       start_method="fork")
    assert float(result.read_text()) == pytest.approx(2.0)


def test_postprocess_top_k_over_queries_and_classes():
    logits = torch.full((1, 3, 4), -5.0)
    logits[0, 2, 1], logits[0, 0, 3], logits[0, 1, 1] = 3.0, 2.0, 1.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]])
    result = PostProcess(num_select=3)({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[200, 100]]))[0]
    torch.testing.assert_close(result["scores"], torch.tensor([3.0, 2.0, 1.0]).sigmoid())
    assert result["labels"].tolist() == [1, 3, 1]
    # (h, w) = (200, 100): x scales by 100, y by 200.
    torch.testing.assert_close(result["boxes"], torch.tensor(
        [[0.0, 0.0, 100.0, 200.0], [40.0, 60.0, 60.0, 140.0], [0.0, 0.0, 50.0, 100.0]]))
    assert PostProcess(num_select=100)({"pred_logits": logits, "pred_boxes": boxes},
                                       torch.tensor([[1, 1]]))[0]["scores"].numel() == 12
