"""distill/evaluation/sem_seg.py: SemSegEvaluator against hand-computed IoUs and an
independent per-class computation; write() and overlay()."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill.evaluation import SemSegEvaluator
from distill.evaluation.sem_seg import overlay, palette

F = Fraction


def approx(x: Fraction) -> object:
    return pytest.approx(float(x), rel=1e-12, abs=1e-12)


# --------------------------------------------------------------------------- by hand


def test_hand_computed_2x3_with_base_and_novel():
    gt = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [2, 2, 0]])  # the last pixel is ignored
    ev = SemSegEvaluator(3, class_names=["sky", "tree", "cat"], novel=[False, False, True])
    ev.add(pred, gt)
    m = ev.evaluate()
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 1, FP 1, FN 1 -> 1/3; class 2: TP 1, FP 1 -> 1/2
    assert m["per_class"] == {"sky": approx(F(1, 2)), "tree": approx(F(1, 3)), "cat": approx(F(1, 2))}
    assert m["mIoU"] == approx(F(4, 9))
    assert m["mIoU_base"] == approx(F(5, 12)) and m["mIoU_novel"] == approx(F(1, 2))
    assert m["hIoU"] == approx(2 * F(5, 12) * F(1, 2) / (F(5, 12) + F(1, 2)))  # 5/11
    assert m["aAcc"] == approx(F(3, 5))
    assert m["mAcc"] == approx((F(1, 2) + F(1, 2) + 1) / 3)
    assert all(type(v) is float for k, v in m.items() if k != "per_class")
    assert ev.confusion.dtype == np.int64 and ev.confusion.tolist() == [[1, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_out_of_range_predictions_absent_classes_and_nan():
    # 4 classes: class 2 only predicted (IoU 0, counted), class 3 nowhere (NaN, skipped);
    # pred 9 is wrong for its class-0 pixel; pred 3 on an ignored pixel counts for nothing
    gt = np.array([[0, 0, 1], [1, 0, 255]])
    pred = np.array([[0, 9, 1], [2, 0, 3]])
    ev = SemSegEvaluator(4)
    ev.add(pred, gt)
    m = ev.evaluate()
    assert [m["per_class"][str(k)] for k in range(3)] == [approx(F(2, 3)), approx(F(1, 2)), 0.0]
    assert math.isnan(m["per_class"]["3"])
    assert m["mIoU"] == approx((F(2, 3) + F(1, 2)) / 3)
    assert m["aAcc"] == approx(F(3, 5))
    assert m["mAcc"] == approx((F(2, 3) + F(1, 2)) / 2)  # classes 2, 3 have no ground truth
    assert set(m) == {"mIoU", "aAcc", "mAcc", "per_class"}  # no novel split given


def test_hiou_is_zero_when_novel_miou_is_zero():
    ev = SemSegEvaluator(2, novel=[False, True])
    ev.add(np.array([[0, 0]]), np.array([[0, 1]]))  # novel class 1 never found
    m = ev.evaluate()
    assert m["mIoU_novel"] == 0.0 and m["mIoU_base"] == approx(F(1, 2)) and m["hIoU"] == 0.0


def test_reduce_zero_label_ade20k_convention():
    gt = np.array([[0, 1, 2], [3, 255, 1]], dtype=np.uint8)
    pred = torch.tensor([[5, 0, 1], [2, 0, 1]])  # (0, 0) and (1, 1) are ignored
    before = gt.copy()
    ev = SemSegEvaluator(3, reduce_zero_label=True)
    ev.add(pred, gt)
    assert np.array_equal(gt, before)  # the caller's uint8 map is not changed
    # reduced gt [[255, 0, 1], [2, 255, 0]]: pairs (0,0) (1,1) (2,2) (0,1)
    m = ev.evaluate()
    assert [m["per_class"][k] for k in "012"] == [approx(F(1, 2)), approx(F(1, 2)), 1.0]
    assert m["aAcc"] == approx(F(3, 4))
    with pytest.raises(ValueError, match=r"gt value\(s\) \[3\].*reduce_zero_label"):
        ev.add(np.zeros((1, 1), np.uint8), np.full((1, 1), 4, np.uint8))  # 4 - 1 = 3 >= 3


def test_errors_name_shapes_and_values():
    ev = SemSegEvaluator(3)
    with pytest.raises(ValueError, match=r"pred shape \(2, 3\) differs from gt shape \(3, 2\)"):
        ev.add(np.zeros((2, 3), np.int64), np.zeros((3, 2), np.int64))
    with pytest.raises(ValueError, match=r"gt value\(s\) \[-1, 7\] outside \[0, 3\)"):
        ev.add(np.zeros((1, 4), np.int64), np.array([[7, -1, 255, 2]]))
    assert ev.confusion.sum() == 0  # a rejected image adds nothing
    with pytest.raises(TypeError, match="integer"):
        ev.add(np.zeros((2, 2), np.float32), np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match="ignore_index 2 is a class id"):
        SemSegEvaluator(3, ignore_index=2)
    with pytest.raises(ValueError, match="distinct"):
        SemSegEvaluator(2, class_names=["a", "a"])
    with pytest.raises(ValueError, match="one flag per class"):
        SemSegEvaluator(2, novel=[True])


# --------------------------------------------------------------------------- random vs independent


def random_split(seed: int = 0, n: int = 7):
    """Images of varying size; gt uses classes 0..4 (+ ignore), pred uses 0..3, 5 and the
    out-of-range 7 and -1: class 4 is never predicted, 5 never in gt, 6 nowhere."""
    rng = np.random.default_rng(seed)
    pairs = []
    for h, w in [(5, 7), (8, 3), (6, 6)]:
        gt = rng.choice([0, 1, 2, 3, 4, 255], size=(h, w), p=[0.2, 0.2, 0.2, 0.15, 0.15, 0.1])
        pred = np.where(rng.random((h, w)) < 0.5, gt, rng.choice([0, 1, 2, 3, 5, 7, -1], size=(h, w)))
        pred[pred == 4] = 0
        pred[pred == 255] = 3
        pairs.append((pred, gt))
    return pairs


def independent_metrics(pairs, n: int, ignore: int = 255) -> dict:
    g = np.concatenate([gt.ravel() for _, gt in pairs])
    p = np.concatenate([pred.ravel() for pred, _ in pairs])
    keep = g != ignore
    g, p = g[keep], p[keep]
    iou, acc = [], []
    for c in range(n):  # explicit per-class counting
        inter = np.sum((g == c) & (p == c))
        union = np.sum((g == c) | (p == c))
        iou.append(inter / union if union else math.nan)
        acc.append(inter / np.sum(g == c) if np.sum(g == c) else math.nan)
    conf = np.zeros((n, n + 1), np.int64)  # np.add.at, last column = any invalid prediction
    np.add.at(conf, (g, np.where((p >= 0) & (p < n), p, n)), 1)
    return {"iou": np.array(iou), "acc": np.array(acc), "aAcc": np.trace(conf[:, :n]) / conf.sum(),
            "confusion": conf[:, :n]}


def test_random_split_matches_independent_computation():
    n, pairs = 7, random_split()
    novel = [False, True, False, False, True, True, False]
    ev = SemSegEvaluator(n, novel=novel)
    for i, (pred, gt) in enumerate(pairs):  # several add() calls, numpy and torch inputs
        ev.add(torch.from_numpy(pred) if i == 1 else pred, gt.astype(np.uint8))
    ref = independent_metrics(pairs, n)
    m = ev.evaluate()
    assert np.array_equal(ev.confusion, ref["confusion"])
    iou = np.array([m["per_class"][str(c)] for c in range(n)])
    assert np.isnan(iou[6]) and np.isnan(ref["iou"][6])
    assert iou[:6] == pytest.approx(ref["iou"][:6], rel=1e-12)
    assert iou[4] == 0.0 and iou[5] == 0.0  # gt only / prediction only: 0, in the means
    assert m["mIoU"] == pytest.approx(np.nanmean(ref["iou"]), rel=1e-12)
    nov = np.array(novel)
    assert m["mIoU_novel"] == pytest.approx(np.nanmean(ref["iou"][nov]), rel=1e-12)
    assert m["mIoU_base"] == pytest.approx(np.nanmean(ref["iou"][~nov]), rel=1e-12)
    b, v = m["mIoU_base"], m["mIoU_novel"]
    assert m["hIoU"] == pytest.approx(2 * b * v / (b + v), rel=1e-12)
    assert m["mAcc"] == pytest.approx(np.nanmean(ref["acc"]), rel=1e-12)
    assert m["aAcc"] == pytest.approx(ref["aAcc"], rel=1e-12)
    # accumulation over the split differs from averaging per-image mIoUs
    per_image = []
    for pred, gt in pairs:
        one = SemSegEvaluator(n)
        one.add(pred, gt)
        per_image.append(one.evaluate()["mIoU"])
    assert abs(np.mean(per_image) - m["mIoU"]) > 1e-6
    ev.reset()
    assert ev.confusion.sum() == 0 and math.isnan(ev.evaluate()["mIoU"])


def test_class_never_predicted_has_zero_iou():
    # in random_split class 4 is in gt but never predicted: IoU exactly 0, counted in means
    ev = SemSegEvaluator(7)
    for pred, gt in random_split(seed=3):
        ev.add(pred, gt)
    assert ev.evaluate()["per_class"]["4"] == 0.0
    assert ev.confusion[:, 4].sum() == 0 and ev.confusion[4].sum() > 0


def test_matches_torchmetrics_jaccard():
    tm = pytest.importorskip("torchmetrics.classification",
                             reason="torchmetrics is not installed (optional cross-check)")
    n, pairs = 7, random_split(seed=1)
    jac = tm.MulticlassJaccardIndex(num_classes=n, ignore_index=255, average="none")
    ev = SemSegEvaluator(n)
    for pred, gt in pairs:
        pred = np.where((pred >= 0) & (pred < n), pred, 0)  # torchmetrics rejects out-of-range
        ev.add(pred, gt)
        jac.update(torch.from_numpy(pred).flatten(), torch.from_numpy(gt).flatten())
    ours = np.array(list(ev.evaluate()["per_class"].values()))
    theirs = jac.compute().numpy()
    defined = ~np.isnan(ours)
    assert ours[defined] == pytest.approx(theirs[defined], rel=1e-6)


# --------------------------------------------------------------------------- write / overlay


def test_write_metrics_json_and_png(tmp_path: Path):
    ev = SemSegEvaluator(4, class_names=["a", "b", "c", "d"], novel=[False, True, False, True])
    for pred, gt in [(np.array([[0, 1], [2, 2]]), np.array([[0, 1], [1, 2]])),
                     (np.array([[0, 0]]), np.array([[0, 255]]))]:
        ev.add(pred, gt)
    paths = ev.write(tmp_path / "eval")
    m = ev.evaluate()
    saved = json.loads(paths["metrics"].read_text())
    assert math.isnan(m["per_class"]["d"]) and saved["per_class"]["d"] is None  # strict JSON
    assert saved == {**m, "per_class": {**m["per_class"], "d": None}}
    assert saved["mIoU"] == m["mIoU"] and saved["mIoU"] == pytest.approx((1 + 1 / 2 + 1 / 2) / 3)
    with Image.open(paths["plot"]) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["metrics.json", "per_class_iou.png"]


def test_overlay_draws_labels_and_leaves_ignore_untouched():
    h, w = 40, 120
    image = np.empty((h, w, 3), np.uint8)
    image[:] = (100, 150, 200)
    labels = np.full((h, w), 255, np.int64)
    labels[:20, :60] = 0
    labels[20:, :60] = 1
    out = overlay(image, labels, ["a", "b"], novel=[False, True])
    assert isinstance(out, Image.Image) and out.size == (w, h) and out.mode == "RGB"
    arr = np.asarray(out)
    assert np.array_equal(arr[:, 60:], image[:, 60:])  # ignore 255 is transparent
    assert (arr[:, :60] != image[:, :60]).any(axis=-1).all()  # every labelled pixel changed
    blend = np.rint(0.5 * np.array([100, 150, 200]) + 0.5 * palette(2)[0]).astype(np.uint8)
    top = arr[:20, :60].reshape(-1, 3)
    assert (top == blend).all(axis=1).mean() > 0.8  # mostly the class colour at alpha 0.5 ...
    assert not (top == blend).all(axis=1).all()  # ... and the class name written on it
    plain = np.asarray(overlay(image, torch.from_numpy(labels), ["a", "b"]))
    changed = (plain != arr).any(axis=-1)
    assert changed.any() and not changed[:20].any()  # the novel "*" only beside "b"
    assert not np.array_equal(palette(2)[0], palette(2)[1]) and palette(3)[0].any()
    with pytest.raises(ValueError, match="differs from the image"):
        overlay(image, labels[:, :10], ["a", "b"])


def test_pascal_context_reads_its_split_files_and_names_a_missing_id(tmp_path):
    from distill.data.semantic import PASCAL_CONTEXT_59_CLASSES, pascal_context

    voc = tmp_path / "VOC2010"
    for sub in ("JPEGImages", "SegmentationClassContext", "ImageSets/SegmentationContext"):
        (voc / sub).mkdir(parents=True)
    for stem, value in (("a", 0), ("b", 59), ("c", 7)):
        Image.new("RGB", (4, 3)).save(voc / "JPEGImages" / f"{stem}.jpg")
        Image.fromarray(np.full((3, 4), value, np.uint8)).save(
            voc / "SegmentationClassContext" / f"{stem}.png")
    (voc / "ImageSets/SegmentationContext/val.txt").write_text("b\na\n")
    data = pascal_context(voc, "val")
    assert len(data) == 2 and data.classes == list(PASCAL_CONTEXT_59_CLASSES)
    assert data[0]["file_name"].endswith("b.jpg")  # the split file's order
    assert data[0]["labels"].eq(58).all()  # 59 -> class 58, "wood"
    assert data[1]["labels"].eq(255).all()  # 0 (background) is ignored
    (voc / "ImageSets/SegmentationContext/train.txt").write_text("a\nzz\n")
    with pytest.raises(FileNotFoundError, match=r"JPEGImages: no file for id 'zz' of the split"):
        pascal_context(voc, "train")
