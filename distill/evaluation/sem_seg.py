"""Semantic-segmentation evaluation: mIoU over a whole split (mmseg's protocol).

Predicted and ground-truth label maps (H, W) are added one image at a time; a
(num_classes, num_classes) int64 confusion matrix (rows = ground truth, columns =
prediction) accumulates over the split, and per-class IoU = TP / (TP + FP + FN) is read
from it at the end, so large and small images weigh by their pixels, as mmseg does.
Pixels whose ground truth is ``ignore_index`` (255) take no part; a predicted label
outside 0..num_classes-1 is wrong for its pixel (it is in the union of the ground-truth
class, in no class's predictions). A class with neither ground-truth nor predicted
pixels has IoU NaN and is left out of the means (mmseg's nanmean).

    ev = SemSegEvaluator(150, class_names=ADE20K_NAMES, novel=is_novel, reduce_zero_label=True)
    for image, gt in dataset:           # gt (H, W) uint8 as stored: 0 = "other"
        ev.add(predict(image), gt)      # pred (H, W) int in 0..149 at gt's resolution
    metrics = ev.evaluate()             # {"mIoU": ..., "mIoU_novel": ..., "hIoU": ..., ...}
    ev.write("runs/exp/eval")           # metrics.json, per_class_iou.png
    overlay(image, pred, ADE20K_NAMES, is_novel).save("pred.png")

reduce_zero_label (ADE20k-150): ground truth 0 -> ignore, every other value - 1. Metric
values are fractions in [0, 1]; NaN means "nothing to score" (written as null in JSON).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from distill.config import atomic_write
from distill.engine import reduce_over_ranks
from distill.evaluation.plots import plot_per_class_ap

__all__ = ["SemSegEvaluator", "overlay", "palette"]


def _numpy(x: Any) -> np.ndarray:
    """Tensor (any device) / array / sequence -> numpy array."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _labels(x: Any, what: str) -> np.ndarray:
    a = _numpy(x)
    if a.dtype.kind not in "iub":
        raise TypeError(f"{what} must be an integer label map, got dtype {a.dtype}")
    return a


def _mean(values: np.ndarray) -> float:
    """Mean over the non-NaN values; NaN when there are none (no warning)."""
    v = values[~np.isnan(values)]
    return float(v.mean()) if v.size else math.nan


def _json_safe(x: Any) -> Any:
    """NaN -> None (null) recursively, so metrics.json is strict JSON."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


class SemSegEvaluator:
    """mIoU / aAcc / mAcc of a split, with base / novel means when ``novel`` is given.

    num_classes: labels 0..num_classes-1; ignore_index: ground-truth value to skip (not a
    class id); class_names: num_classes distinct names (default "0", "1", ...); novel:
    num_classes flags (True = novel class); reduce_zero_label: ground truth 0 -> ignore,
    others - 1 (ADE20k), applied in :meth:`add` on a copy.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
        novel: Sequence[bool] | None = None,
        reduce_zero_label: bool = False,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} is a class id (num_classes {num_classes})")
        names = [str(i) for i in range(num_classes)] if class_names is None else list(class_names)
        if len(names) != num_classes or len(set(names)) != num_classes:
            raise ValueError(f"class_names must be {num_classes} distinct names, got {len(names)} "
                             f"({len(set(names))} distinct)")
        if novel is not None and len(novel) != num_classes:
            raise ValueError(f"novel must have one flag per class ({num_classes}), got {len(novel)}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = names
        self.novel = None if novel is None else np.array([bool(n) for n in novel])
        self.reduce_zero_label = reduce_zero_label
        self.reset()

    def reset(self) -> None:
        n = self.num_classes
        self.confusion = np.zeros((n, n), np.int64)  # rows = ground truth, columns = prediction
        self.pred_out_of_range = np.zeros(n, np.int64)  # per ground-truth class

    def add(self, pred: Any, gt: Any) -> None:
        """Add one image: pred and gt (H, W) integer label maps (tensors or arrays) of the
        same shape, gt as stored (before reduce_zero_label)."""
        p, g = _labels(pred, "pred"), _labels(gt, "gt")
        if p.shape != g.shape:
            raise ValueError(f"pred shape {p.shape} differs from gt shape {g.shape}")
        n, ignore = self.num_classes, self.ignore_index
        g = g.astype(np.int64).ravel()  # a copy: the caller's array is never changed
        if self.reduce_zero_label:
            unlabelled = (g == 0) | (g == ignore)
            g -= 1
            g[unlabelled] = ignore
        keep = g != ignore
        g, p = g[keep], p.ravel()[keep].astype(np.int64)
        bad = (g < 0) | (g >= n)
        if bad.any():
            values = np.unique(g[bad])
            raise ValueError(f"gt value(s) {values[:10].tolist()} outside [0, {n}) and not "
                             f"ignore_index {ignore}" + (" (after reduce_zero_label)"
                                                         if self.reduce_zero_label else ""))
        p = np.where((p >= 0) & (p < n), p, n)  # out of range -> an extra "wrong" column
        counts = np.bincount(g * (n + 1) + p, minlength=n * (n + 1)).reshape(n, n + 1)
        self.confusion += counts[:, :n]
        self.pred_out_of_range += counts[:, n]

    def sum_over_ranks(self) -> None:
        """Add up every rank's counts (each rank added its shard of the images): afterwards
        each rank holds the counts of the whole split (:func:`distill.engine.reduce_over_ranks`;
        nothing in one process)."""
        counts = [torch.from_numpy(self.confusion), torch.from_numpy(self.pred_out_of_range)]
        reduce_over_ranks(*counts)  # in place: the tensors share the arrays' memory

    def per_class_iou(self) -> np.ndarray:
        """(num_classes,) IoU = TP / (TP + FP + FN); NaN where the union is empty."""
        tp = np.diag(self.confusion).astype(np.float64)
        gt = self.confusion.sum(axis=1) + self.pred_out_of_range
        union = gt + self.confusion.sum(axis=0) - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def evaluate(self) -> dict[str, Any]:
        """{mIoU, [mIoU_base, mIoU_novel, hIoU,] aAcc, mAcc, per_class {name: IoU}}.

        Means skip NaN classes; hIoU = 2 b n / (b + n) of the base and novel mIoU (0 when
        either is 0). aAcc = correct / labelled pixels; mAcc = mean over classes with
        ground truth of TP / ground-truth pixels. Plain floats; NaN when nothing to score.
        """
        iou = self.per_class_iou()
        tp = np.diag(self.confusion).astype(np.float64)
        gt = (self.confusion.sum(axis=1) + self.pred_out_of_range).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            acc = np.where(gt > 0, tp / gt, np.nan)
        m: dict[str, Any] = {"mIoU": _mean(iou)}
        if self.novel is not None:
            base, novel = _mean(iou[~self.novel]), _mean(iou[self.novel])
            m["mIoU_base"], m["mIoU_novel"] = base, novel
            if math.isnan(base) or math.isnan(novel):
                m["hIoU"] = math.nan
            else:
                m["hIoU"] = 0.0 if base == 0 or novel == 0 else 2 * base * novel / (base + novel)
        m["aAcc"] = float(tp.sum() / gt.sum()) if gt.sum() > 0 else math.nan
        m["mAcc"] = _mean(acc)
        m["per_class"] = {name: float(v) for name, v in zip(self.class_names, iou, strict=True)}
        return m

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``metrics.json`` (NaN as null) and ``per_class_iou.png`` (classes with a
        defined IoU, novel ones highlighted) to out_dir, each atomically.
        Returns {"metrics", "plot": path}."""
        metrics = self.evaluate()
        out = Path(out_dir)
        paths = {"metrics": out / "metrics.json", "plot": out / "per_class_iou.png"}
        atomic_write(paths["metrics"], json.dumps(_json_safe(metrics), indent=2))
        novel_names = set() if self.novel is None else {
            name for name, n in zip(self.class_names, self.novel, strict=True) if n}
        defined = {k: v for k, v in metrics["per_class"].items() if not math.isnan(v)}
        title = f"IoU per class (mIoU {metrics['mIoU']:.3f}"
        if self.novel is not None:
            title += f", novel {metrics['mIoU_novel']:.3f}, base {metrics['mIoU_base']:.3f}"
        atomic_write(paths["plot"], plot_per_class_ap(defined, novel_names, title=title + ")",
                                                      xlabel="IoU"))
        return paths


# --------------------------------------------------------------------------- drawing


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 fixed colours: the PASCAL VOC bit palette of ids 1.. (class k
    gets VOC colour k + 1, so no class is black)."""
    ids = np.arange(1, num_classes + 1)
    colors = np.zeros((num_classes, 3), np.int64)
    for shift in range(8):
        for ch in range(3):
            colors[:, ch] |= ((ids >> (3 * shift + ch)) & 1) << (7 - shift)
    return colors.astype(np.uint8)


def overlay(
    image: Any,
    labels: Any,
    class_names: Sequence[str],
    novel: Sequence[bool] | None = None,
    alpha: float = 0.5,
    ignore_index: int = 255,
) -> Image.Image:
    """Draw a label map over an RGB image; returns a new PIL image of the same size.

    image (H, W, 3) uint8; labels (H, W) int in 0..len(class_names)-1 (other values, e.g.
    ignore_index 255, stay transparent). Each class gets its :func:`palette` colour at
    ``alpha``, and its name once at the centroid of its pixels (novel names end in "*").
    """
    img = _numpy(image)
    lab = _labels(labels, "labels")
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) uint8, got {img.shape} {img.dtype}")
    if lab.shape != img.shape[:2]:
        raise ValueError(f"labels shape {lab.shape} differs from the image's {img.shape[:2]}")
    if novel is not None and len(novel) != len(class_names):
        raise ValueError(f"novel has {len(novel)} flags for {len(class_names)} classes")
    n = len(class_names)
    lab = lab.astype(np.int64)
    drawn = (lab >= 0) & (lab < n) & (lab != ignore_index)
    colors = palette(n).astype(np.float64)
    out = img.astype(np.float64)
    out[drawn] = (1 - alpha) * out[drawn] + alpha * colors[lab[drawn]]
    result = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(result)
    font = ImageFont.load_default()
    stroke = 1 if isinstance(font, ImageFont.FreeTypeFont) else 0
    for k in np.unique(lab[drawn]).tolist():
        ys, xs = np.nonzero(lab == k)
        text = class_names[k] + ("*" if novel is not None and novel[k] else "")
        x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font, stroke_width=stroke)
        pos = (xs.mean() - (x0 + x1) / 2, ys.mean() - (y0 + y1) / 2)
        draw.text(pos, text, fill=(255, 255, 255), font=font, stroke_width=stroke,
                  stroke_fill=(0, 0, 0))
    return result
