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
from distill.teacher.dense import dense_features
from distill.teacher.pretrain import _dense_on_own_crops
from distill.teacher.refine import RegionGrids, clipself_loss, grid_boxes, pool_regions
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


def test_proposal_regions_are_the_top_boxes_scaled_to_the_dense_input():
    image = torch.zeros(3, 50, 100, dtype=torch.uint8)
    data = [{"image": image, "image_id": 7}, {"image": image, "image_id": 8}]
    proposals = {7: (torch.tensor([[0.0, 0, 10, 10], [10, 10, 60, 40], [-5, 20, 120, 30],
                                   [5, 5, 5, 30]]), torch.tensor([0.1, 0.9, 0.5, 0.8])),
                 8: (torch.zeros(0, 4), torch.zeros(0))}
    grids = RegionGrids(data, lambda h, w: (2 * h, 2 * w), proposals=proposals, max_boxes=3)
    s = grids.sample(0, None)
    assert s["image"].shape == (3, 100, 200)
    # scores 0.9, 0.8, 0.5 in that order; x2; clipped to the image; the empty box dropped
    assert s["boxes"].tolist() == [[20, 20, 120, 80], [0, 40, 200, 60]]
    assert grids.sample(1, None)["boxes"].tolist() == [[0, 0, 200, 100]]  # none: whole image


def test_dense_on_own_crop_of_the_whole_image_is_the_dense_maps_mean():
    cfg = load_config(REPO / "configs/shapes/refine.yaml")
    teacher = Teacher.from_config(cfg.teacher)
    size = teacher.image_size[0]
    image = torch.randint(0, 256, (3, size, size), generator=torch.Generator().manual_seed(0),
                          dtype=torch.uint8)
    own = _dense_on_own_crops(teacher, image, torch.tensor([[0.0, 0, size, size]]))
    feats = dense_features(teacher.model.visual, teacher.normalize(image), teacher.dense_mode)
    assert torch.allclose(own[0], torch.nn.functional.normalize(feats.mean((-2, -1))[0], dim=0),
                          atol=1e-5)


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
    assert record["iterations"] == 3 and {"crop_top1", "dense_top1", "dense_on_crop_top1",
                                          "cosine"} <= set(record["after"])
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


def test_refinement_on_proposals_reads_the_proposals_file(tmp_path, capsys):
    from distill.data.coco import CocoDetection, dataset_paths
    from distill.data.proposals import save_proposals

    assert refine_teacher.main(_overrides(tmp_path, "a")) == 0  # writes the world
    cfg = load_config(REPO / "configs/shapes/refine.yaml",
                      [o for o in _overrides(tmp_path, "a") if "=" in o])
    ids = [int(s["image_id"]) for s in CocoDetection(*dataset_paths(cfg, "train"))]
    path = tmp_path / "proposals_train.safetensors"
    save_proposals(path, {i: (torch.tensor([[8.0, 8, 40, 40], [0, 0, 96, 96]]),
                              torch.tensor([0.9, 0.2])) for i in ids[1:]})
    args = [f"refine.proposals={path}", *_overrides(tmp_path, "p")]
    capsys.readouterr()
    assert refine_teacher.main(args) == 2  # refused before any training
    assert capsys.readouterr().err.strip() == (
        f"error: refine.proposals: {path} has no proposals for 1 of the 4 train images "
        f"(first: image {ids[0]})")
    assert not (tmp_path / "p").exists()
    save_proposals(path, {i: (torch.tensor([[8.0, 8, 40, 40]]), torch.tensor([0.9]))
                          for i in ids})
    assert refine_teacher.main(args) == 0
    record = json.loads((tmp_path / "p" / "refined.safetensors").with_suffix(".json").read_text())
    assert record["refine"]["proposals"] == str(path) and record["iterations"] == 3



def test_a_dense_cache_from_the_refined_tower_trains_a_detector(tmp_path):
    """teacher.region_mode=dense with teacher.dense_pretrained: the cache holds the refined
    tower's dense region embeddings (not the original's), and ViLD trains from it."""
    import numpy as np

    from detectors import recipe
    from distill.cache import EmbeddingCache
    from distill.data.coco import CocoDetection, dataset_paths
    from tools import extract

    assert refine_teacher.main(_overrides(tmp_path, "a")) == 0
    refined = tmp_path / "a" / "refined.safetensors"
    common = _overrides(tmp_path, "a")[:4] + [
        "teacher.region_mode=dense", "teacher.dense_short_side=96",
        f"teacher.dense_pretrained={refined}", f"cache.root={tmp_path / 'cache'}",
        "cache.name=dense", "cache.proposals=gt"]
    assert extract.main(["--config", str(REPO / "configs/shapes/extract.yaml"), "--no-progress",
                         *common]) == 0
    cfg = load_config(REPO / "configs/shapes/vild.yaml", [
        *common, f"output_dir={tmp_path / 'vild'}", "train.max_iters=2", "train.batch_size=2",
        "model.image_size=96", "model.hidden=32", "model.box_batch_size_per_image=16"])
    refined_teacher = Teacher.from_config(cfg.teacher)
    original = Teacher.from_config(dataclasses.replace(cfg.teacher, dense_pretrained=None))
    ds = CocoDetection(*dataset_paths(cfg, "train"))
    s = ds[0]
    rec = EmbeddingCache.open(tmp_path / "cache" / "dense").get(ds.ids[0])
    got = torch.from_numpy(np.asarray(rec["embeddings"], dtype=np.float32))
    assert torch.allclose(got, refined_teacher.regions(s["image"], s["boxes"]), atol=2e-3)
    assert not torch.allclose(got, original.regions(s["image"], s["boxes"]), atol=2e-3)
    metrics = recipe.train(cfg, progress=False)
    assert "AP50_novel" in metrics
    losses = json.loads((tmp_path / "vild/metrics.jsonl").read_text().splitlines()[0])
    assert losses["loss_vild_image"] > 0
