"""COCO-style open-vocabulary detection evaluation on pycocotools.

Detections are collected per image with :meth:`add` (boxes xyxy in pixels, as the
detectors produce them), turned into the COCO results format (bbox xywh) and scored
with pycocotools' ``COCOeval``; nothing of AP is re-implemented here. On top of
``COCOeval.stats`` the evaluator reports box/mask AP50 on novel, base and all classes
in the generalized setting (every class of the vocabulary competes at test time):
the mean over classes of per-class AP50 read from ``COCOeval.eval["precision"]``,
classes without ground truth left out as COCOeval does.

    ev = OVCocoEvaluator("instances_val2017_ov.json", novel_category_ids=COCO_OV_NOVEL_IDS)
    for image_id, det in predictions:
        ev.add(image_id, det["boxes"], det["scores"], det["category_ids"])
    metrics = ev.evaluate()          # {"bbox": {"AP": ..., "AP50_novel": ..., ...}}
    ev.write("runs/exp/eval")        # results.json, metrics.json, per-class AP50 plot

Metric values are fractions in [0, 1]; -1.0 means "no ground truth to score", the
pycocotools / lvis convention.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from distill.config import atomic_write
from distill.evaluation.plots import plot_per_class_ap

IOU_TYPES = ("bbox", "segm")
_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _numpy(x: Any, dtype: Any | None = None) -> np.ndarray:
    """Tensor (any device) / array / sequence -> numpy array."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def xyxy_to_xywh(boxes: Any) -> np.ndarray:
    """boxes (N, 4) x1, y1, x2, y2 -> (N, 4) x, y, w, h (float64, COCO results format)."""
    b = _numpy(boxes, np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)


def encode_masks(masks: Any, height: int, width: int) -> list[dict]:
    """Masks -> compressed RLE dicts with ``counts`` as str (JSON-ready).

    masks: (N, H, W) bool/uint8 tensor or array at the image's resolution, or a sequence
    of RLE dicts (``{"size": [H, W], "counts": str | bytes}``).
    """
    if isinstance(masks, (list, tuple)) and (not masks or isinstance(masks[0], dict)):
        rles = [dict(r) for r in masks]
    else:
        m = _numpy(masks)
        if m.ndim != 3 or m.shape[1:] != (height, width):
            raise ValueError(f"masks must be (N, {height}, {width}) for this image, got {m.shape}")
        if m.dtype.kind == "f":
            raise TypeError("masks must be bool/uint8; threshold mask probabilities first")
        rles = mask_utils.encode(np.asfortranarray((m != 0).astype(np.uint8).transpose(1, 2, 0)))
    for r in rles:
        if list(r["size"]) != [height, width]:
            raise ValueError(f"RLE size {r['size']} differs from the image size {[height, width]}")
        if isinstance(r["counts"], bytes):
            r["counts"] = r["counts"].decode("ascii")
        elif not isinstance(r["counts"], str):
            raise ValueError("only compressed RLE (counts as str/bytes) is supported")
    return rles


class DetectionCollector:
    """Per-image detections of one evaluation run, kept as arrays until :meth:`results`.

    images: image id -> image record with ``height`` and ``width``; category_ids: the
    ground-truth category ids (others are rejected); max_dets_per_image: keep only the
    top-scoring detections of each image (None: keep all).
    """

    def __init__(
        self,
        images: Mapping[int, Mapping[str, Any]],
        category_ids: Iterable[int],
        iou_types: Sequence[str],
        max_dets_per_image: int | None = None,
        verbose: bool = False,
    ) -> None:
        self.iou_types = tuple(iou_types)
        bad = [t for t in self.iou_types if t not in IOU_TYPES]
        if bad or not self.iou_types:
            raise ValueError(f"iou_types must be a non-empty subset of {IOU_TYPES}, got {iou_types}")
        self._images = images
        self._category_ids = set(int(c) for c in category_ids)
        self.max_dets_per_image = max_dets_per_image
        self.verbose = verbose
        self.reset()

    def reset(self) -> None:
        self._chunks: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, list[dict] | None]] = []
        self._metrics: dict[str, dict] | None = None

    def add(self, image_id: int, boxes: Any, scores: Any, category_ids: Any, masks: Any = None) -> None:
        """Add the detections of one image (may be called again for the same image).

        boxes (N, 4) xyxy in pixels; scores (N,); category_ids (N,) dataset category ids;
        masks (N, H, W) bool/uint8 at image resolution or N RLE dicts, needed for "segm".
        """
        image_id = int(image_id)
        if image_id not in self._images:
            raise KeyError(f"image id {image_id} is not in the ground truth")
        xywh = xyxy_to_xywh(boxes)
        s = _numpy(scores, np.float64).reshape(-1)
        c = _numpy(category_ids, np.int64).reshape(-1)
        if not len(xywh) == len(s) == len(c):
            raise ValueError(f"boxes/scores/category_ids lengths differ: {len(xywh)}, {len(s)}, {len(c)}")
        if not (np.isfinite(xywh).all() and np.isfinite(s).all()):
            raise ValueError(f"non-finite boxes or scores for image {image_id}")
        unknown = set(c.tolist()) - self._category_ids
        if unknown:
            raise ValueError(f"category ids not in the ground truth: {sorted(unknown)[:10]}")
        rles = None
        if masks is not None:
            img = self._images[image_id]
            rles = encode_masks(masks, int(img["height"]), int(img["width"]))
            if len(rles) != len(s):
                raise ValueError(f"{len(rles)} masks for {len(s)} boxes")
        elif "segm" in self.iou_types and len(s):
            raise ValueError("masks are required when 'segm' is evaluated")
        self._chunks.append((image_id, xywh, s, c, rles))
        self._metrics = None

    def state(self) -> list[tuple]:
        """The detections added so far, per :meth:`add` call (picklable): what one process of
        a sharded evaluation sends to the process that scores (:meth:`merge`)."""
        return list(self._chunks)

    def merge(self, states: Iterable[list[tuple]]) -> None:
        """Append other collectors' :meth:`state` (in the order given) as if added here."""
        for chunks in states:
            for image_id, *_ in chunks:
                if int(image_id) not in self._images:
                    raise KeyError(f"image id {image_id} is not in the ground truth")
            self._chunks.extend(chunks)
        self._metrics = None

    def results(self) -> list[dict]:
        """Detections in the COCO results format: image_id, category_id, bbox [x, y, w, h],
        score (full float precision), segmentation (RLE) when masks were given.
        Sorted by image (insertion order), then score descending (ties keep insertion
        order); capped to ``max_dets_per_image`` per image when set."""
        return self._build_results(with_boxes=True, with_masks=True)

    def _build_results(self, with_boxes: bool, with_masks: bool) -> list[dict]:
        """:meth:`results` as fresh dicts, leaving out the boxes or the masks."""
        if not self._chunks:
            return []
        img = np.concatenate([np.full(len(ch[2]), ch[0], np.int64) for ch in self._chunks])
        boxes = np.concatenate([ch[1] for ch in self._chunks])
        scores = np.concatenate([ch[2] for ch in self._chunks])
        cats = np.concatenate([ch[3] for ch in self._chunks])
        with_masks = with_masks and any(ch[4] is not None for ch in self._chunks)
        rles = [r for ch in self._chunks for r in (ch[4] or [None] * len(ch[2]))]
        rank = {i: k for k, i in enumerate(dict.fromkeys(img.tolist()))}  # first-seen order
        img_rank = np.array([rank[i] for i in img.tolist()], np.int64)
        order = np.lexsort((np.arange(len(img)), -scores, img_rank))
        if self.max_dets_per_image is not None:
            sorted_rank = img_rank[order]
            start = np.searchsorted(sorted_rank, sorted_rank, side="left")
            order = order[np.arange(len(order)) - start < self.max_dets_per_image]
        # whole-array tolist: the same Python ints / floats as per-element int() / float()
        cols = img[order].tolist(), cats[order].tolist(), scores[order].tolist()
        if with_boxes:
            out = [{"image_id": i, "category_id": c, "bbox": b, "score": s}
                   for i, c, s, b in zip(*cols, boxes[order].tolist(), strict=True)]
        else:
            out = [{"image_id": i, "category_id": c, "score": s}
                   for i, c, s in zip(*cols, strict=True)]
        if with_masks:
            for d, i in zip(out, order.tolist(), strict=True):
                if rles[i] is not None:
                    d["segmentation"] = rles[i]
        return out

    def _quiet(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if self.verbose else contextlib.redirect_stdout(io.StringIO())

    def _results_for(self, iou_type: str) -> list[dict]:
        """:meth:`results` for one evaluation, as fresh dicts (the loaders mutate them). For
        "segm" the boxes are left out so that area ranges use mask areas (detectron2 does
        the same); for "bbox" the masks are left out."""
        return self._build_results(with_boxes=iou_type != "segm", with_masks=iou_type == "segm")

    def _write_results(self, out_dir: str | Path, prefix: str) -> tuple[Path, dict, dict]:
        """Write ``<prefix>results.json`` and ``metrics.json``; returns (dir, metrics, paths)."""
        metrics = self.evaluate()
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"results": out / f"{prefix}results.json", "metrics": out / "metrics.json"}
        atomic_write(paths["results"], json.dumps(self.results()))
        atomic_write(paths["metrics"], json.dumps(metrics, indent=2))
        return out, metrics, paths


class OVCocoEvaluator(DetectionCollector):
    """COCO / COCO-OV evaluator (box and optionally mask AP).

    gt: COCO instances json path or a loaded ``COCO``; novel_category_ids: COCO ids of
    the novel classes (must be ground-truth categories); iou_types: ("bbox",) or
    ("bbox", "segm"); category_ids: the test vocabulary (default: every ground-truth
    category), e.g. the 65 COCO-OV classes on a full COCO json; base = vocabulary minus
    novel. verbose=True shows pycocotools' prints.
    """

    def __init__(
        self,
        gt: str | Path | COCO,
        novel_category_ids: Iterable[int] = (),
        iou_types: Sequence[str] = ("bbox",),
        category_ids: Iterable[int] | None = None,
        verbose: bool = False,
    ) -> None:
        if not isinstance(gt, COCO):
            with contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO()):
                gt = COCO(str(gt))
        self.gt = gt
        gt_cats = set(gt.getCatIds())
        self.category_ids = sorted(gt_cats if category_ids is None else {int(c) for c in category_ids})
        self.novel_category_ids = sorted({int(c) for c in novel_category_ids})
        for what, ids in (("category_ids", self.category_ids), ("novel_category_ids", self.novel_category_ids)):
            if set(ids) - gt_cats:
                raise ValueError(f"{what} not in the ground truth categories: {sorted(set(ids) - gt_cats)}")
        if set(self.novel_category_ids) - set(self.category_ids):
            raise ValueError("novel_category_ids must be part of the vocabulary (category_ids)")
        self.category_names = {c["id"]: c["name"] for c in gt.loadCats(self.category_ids)}
        super().__init__(gt.imgs, gt_cats, iou_types, None, verbose)

    def _empty_results(self) -> COCO:
        # COCO.loadRes indexes anns[0]; an empty result set is a COCO with no annotations.
        res = COCO()
        res.dataset = {"images": list(self.gt.dataset["images"]),
                       "categories": copy.deepcopy(self.gt.dataset["categories"]), "annotations": []}
        res.createIndex()
        return res

    def run_cocoeval(self, iou_type: str) -> COCOeval:
        """Run COCOeval (evaluate, accumulate, summarize) over the vocabulary."""
        res = self._results_for(iou_type)
        with self._quiet():
            dt = self.gt.loadRes(res) if res else self._empty_results()
            E = COCOeval(self.gt, dt, iouType=iou_type)
            E.params.catIds = list(self.category_ids)
            E.evaluate()
            E.accumulate()
            E.summarize()
        return E

    def evaluate(self) -> dict[str, dict]:
        """{iou_type: {AP, AP50, AP75, APs, APm, APl (COCOeval.stats),
        AP50_novel, AP50_base, AP50_all (means of per-class AP50), num_classes
        {novel, base, all} (classes with ground truth), per_class_AP50 {name: AP50}}}."""
        if self._metrics is None:
            self._metrics = {t: self._summarise(self.run_cocoeval(t)) for t in self.iou_types}
        return copy.deepcopy(self._metrics)

    def _summarise(self, E: COCOeval) -> dict[str, Any]:
        m: dict[str, Any] = {k: float(v) for k, v in zip(_STAT_NAMES, E.stats[:6], strict=True)}
        # precision (T, R, K, A, M); IoU 0.5, area "all", maxDets 100 -> (R, K)
        p = E.eval["precision"][0, :, :, E.params.areaRngLbl.index("all"), -1]
        per_class = {}
        for k, cid in enumerate(E.params.catIds):
            col = p[:, k]
            if (col > -1).any():
                per_class[cid] = float(col[col > -1].mean())
        novel = set(self.novel_category_ids)
        groups = {"novel": [v for c, v in per_class.items() if c in novel],
                  "base": [v for c, v in per_class.items() if c not in novel],
                  "all": list(per_class.values())}
        for g, vals in groups.items():
            m[f"AP50_{g}"] = float(np.mean(vals)) if vals else -1.0
        m["num_classes"] = {g: len(vals) for g, vals in groups.items()}
        m["per_class_AP50"] = {self.category_names[c]: v for c, v in per_class.items()}
        return m

    def write(self, out_dir: str | Path, prefix: str = "") -> dict[str, Path]:
        """Write ``<prefix>results.json`` (COCO results), ``metrics.json`` and
        ``<prefix>per_class_AP50_<iou_type>.png`` to out_dir, each atomically.
        Returns {"results", "metrics", "plot_<iou_type>": path}."""
        out, metrics, paths = self._write_results(out_dir, prefix)
        novel_names = {self.category_names[c] for c in self.novel_category_ids}
        for t in self.iou_types:
            paths[f"plot_{t}"] = out / f"{prefix}per_class_AP50_{t}.png"
            atomic_write(paths[f"plot_{t}"], plot_per_class_ap(
                metrics[t]["per_class_AP50"], novel_names,
                title=f"{t} AP50 per class (novel {metrics[t]['AP50_novel']:.3f}, "
                      f"base {metrics[t]['AP50_base']:.3f})",
                xlabel=f"{'box' if t == 'bbox' else 'mask'} AP50"))
        return paths
