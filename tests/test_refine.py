"""CLIPSelf refinement of the teacher (distill/teacher/refine.py): the region grid, the pooling
and the loss against hand computations; the refined file in open_clip; exact resume; the
refined tower on the dense path only (teacher.dense_pretrained)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.config import load_config
from distill.engine import last_checkpoint
from distill.teacher import Teacher
from distill.teacher.refine import clipself_loss, grid_boxes, pool_regions
from tools import refine_teacher

REPO = Path(__file__).resolve().parents[1]


def test_grid_boxes_by_hand():
    boxes = grid_boxes(60, 100, 2, 4)  # 2 rows of 30 px, 4 columns of 25 px, row-major
    assert boxes.tolist() == [[0, 0, 25, 30], [25, 0, 50, 30], [50, 0, 75, 30], [75, 0, 100, 30],
                              [0, 30, 25, 60], [25, 30, 50, 60], [50, 30, 75, 60],
                              [75, 30, 100, 60]]
    assert grid_boxes(7, 9, 1, 1).tolist() == [[0, 0, 9, 7]]


def test_pool_regions_averages_the_cells_a_box_covers():
    # a 4 x 4 map of a 64 x 64 image: 16 px per cell; channel 0 = 10 * row + column
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    feats = torch.stack([10 * rows + cols, torch.ones(4, 4)])
    boxes = torch.tensor([[0.0, 0, 32, 32],    # cells (0,0) (0,1) (1,0) (1,1)
                          [16, 16, 48, 32],    # cells (1,1) (1,2)
                          [48, 48, 64, 64]])   # cell (3,3)
    pooled = pool_regions(feats, boxes, (64, 64))
    assert pooled[:, 0].tolist() == pytest.approx([5.5, 11.5, 33.0])
    assert pooled[:, 1].tolist() == pytest.approx([1.0, 1.0, 1.0])
    # a map at half the image's resolution: the boxes scale with it
    assert torch.allclose(pool_regions(feats, boxes * 2, (128, 128)), pooled)


def test_clipself_loss_by_hand():
    dense = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    crops = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    each = [0.0, 1 - 1 / math.sqrt(2), 2.0]  # 1 - cosine: the norm does not count
    assert clipself_loss(dense, crops).item() == pytest.approx(sum(each) / 3)
    weights = torch.tensor([1.0, 0.0, 1.0])
    assert clipself_loss(dense, crops, weights).item() == pytest.approx((each[0] + each[2]) / 2)
    assert clipself_loss(dense, crops, torch.zeros(3)).item() == 0.0


def _overrides(tmp_path: Path, out: str) -> list[str]:
    return [f"world.root={tmp_path / 'world'}", "world.num_train=4", "world.num_val=2",
            "world.image_size=96", "teacher.dense_short_side=96", "train.max_iters=3",
            "train.batch_size=2", "train.checkpoint_period=1", "train.log_period=1",
            "train.schedule.warmup_iters=0", f"output_dir={tmp_path / out}",
            f"refine.output={tmp_path / out / 'refined.safetensors'}", "--no-progress"]


def test_refinement_writes_an_open_clip_file_resumes_exactly_and_plugs_into_the_dense_path(
        tmp_path, capsys):
    assert refine_teacher.main(_overrides(tmp_path, "a")) == 0
    assert "before: zero-shot top-1 on val objects: crop" in capsys.readouterr().out
    cfg = load_config(REPO / "configs/shapes/refine.yaml",
                      [o for o in _overrides(tmp_path, "a") if "=" in o])
    refined = tmp_path / "a" / "refined.safetensors"
    record = json.loads(refined.with_suffix(".json").read_text())
    assert record["iterations"] == 3 and {"crop_top1", "dense_top1", "cosine"} <= set(
        record["after"])
    before = Teacher.from_config(cfg.teacher)
    after = Teacher.from_config(dataclasses.replace(cfg.teacher, pretrained=str(refined)))
    names = ["star", "ring", "arrow"]
    assert torch.equal(before.text(names), after.text(names))  # the text tower is untouched
    moved = [k for k, v in before.model.visual.state_dict().items()
             if not torch.equal(v, after.model.visual.state_dict()[k])]
    assert moved and all(not k.startswith(("attnpool.q_proj", "attnpool.k_proj",
                                           "attnpool.positional")) for k in moved)
    # resume: the last checkpoint and the final weights gone, a rerun redoes iteration 3
    # from checkpoint 2 and ends where the uninterrupted run ended
    assert refine_teacher.main(_overrides(tmp_path, "b")) == 0
    last = last_checkpoint(tmp_path / "b")
    shutil.rmtree(last)
    (last.parent / "last_checkpoint").write_text("iter_0000002")  # as before iteration 3
    (tmp_path / "b" / "model_final.safetensors").unlink()
    assert last_checkpoint(tmp_path / "b").name == "iter_0000002"
    assert refine_teacher.main(_overrides(tmp_path, "b")) == 0
    a, b = load_file(refined), load_file(tmp_path / "b" / "refined.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # teacher.dense_pretrained: the refined tower on the dense path, crops keep the original
    both = Teacher.from_config(dataclasses.replace(cfg.teacher, dense_pretrained=str(refined)))
    image = torch.randint(0, 256, (3, 96, 96), dtype=torch.uint8)
    box = torch.tensor([[10.0, 10, 60, 70]])
    assert torch.equal(both.regions(image, box, mode="crop"), before.regions(image, box, "crop"))
    assert torch.allclose(both.dense(image), after.dense(image))
    assert not torch.allclose(both.dense(image), before.dense(image))
    assert both.fingerprint not in (before.fingerprint, after.fingerprint)
