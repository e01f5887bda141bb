"""LVIS evaluation (federated protocol) on faster-coco-eval's C++ COCOeval in LVIS mode.

Same interface as :class:`distill.evaluation.coco.OVCocoEvaluator`: :meth:`add` per
image, :meth:`evaluate`, :meth:`write`. ``COCOeval_faster(..., lvis_style=True)``
applies the federated rules of the official ``lvis`` package's ``LVISEval``:
detections of classes neither annotated in an image nor listed in its
``neg_category_ids`` are dropped; unmatched detections of its
``not_exhaustive_category_ids`` are ignored; APr/APc/APf average the classes of each
``frequency`` tag. On top of that this module reproduces the rest of the official
pipeline: the top-300 detections per image by score (``LVISResults``' ``max_dets``,
applied before anything else), annotations and detections of zero area left out
(``LVIS.get_ann_ids`` keeps ``0 < area < inf``), one AR figure at 300 detections.
tests/test_eval_parity.py checks the metrics against the official package (bbox and
segm, 1e-4; observed residuals are ~1e-16).

Reported for boxes and optionally masks: AP, AP50, AP75, APs/m/l, APr/APc/APf,
AR@300, ARs@300, ARm@300, ARl@300 (the official keys). Values are fractions; -1.0
means no ground truth in that group (e.g. no rare class in the evaluated images).
Classes without any ground-truth annotation in the evaluated images are left out of
the C++ evaluation: they would only add -1 entries that every mean skips.

The official ``lvis`` package (dev extra) is used only as the reference in tests
and bench/eval.py, through :mod:`distill.evaluation.reference`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import pycocotools.mask as mask_utils
from faster_coco_eval import COCO, COCOeval_faster

from distill.config import atomic_write
from distill.evaluation.coco import DetectionCollector
from distill.evaluation.plots import plot_groups

MAX_DETS_PER_IMAGE = 300
FREQUENCIES = ("r", "c", "f")
_IMAGE_KEYS = ("neg_category_ids", "not_exhaustive_category_ids")


def _silent(*args: object, **kwargs: object) -> None:
    pass


def _mask_areas(rles: list[dict]) -> list[float]:
    """Pixel counts of compressed RLEs (as ``pycocotools.mask.area``, in chunks of 255:
    pycocotools 2.0.11's ``area`` of a longer list overflows a uint8 shape array)."""
    out: list[float] = []
    for k in range(0, len(rles), 255):
        out += mask_utils.area(rles[k:k + 255]).astype(float).tolist()
    return out


def _lvis_keys(max_dets: int) -> dict[str, str]:
    """Our (official LVISEval) metric name -> ``COCOeval_faster.stats_as_dict`` label."""
    return {"AP": "AP_all", "AP50": "AP_50", "AP75": "AP_75", "APs": "AP_small",
            "APm": "AP_medium", "APl": "AP_large", "APr": "APr", "APc": "APc", "APf": "APf",
            f"AR@{max_dets}": "AR_all", f"ARs@{max_dets}": "AR_small",
            f"ARm@{max_dets}": "AR_medium", f"ARl@{max_dets}": "AR_large"}


def load_lvis_gt(gt: str | Path | COCO, verbose: bool = False) -> COCO:
    """LVIS annotation json path or loaded ``faster_coco_eval.COCO`` -> COCO index, checked
    for the LVIS fields; annotations with area <= 0 are removed (as ``LVISEval`` does)."""
    if not isinstance(gt, COCO):
        gt = COCO(str(gt), print_function=print if verbose else _silent)
    for img in gt.dataset.get("images", []):
        missing = [k for k in _IMAGE_KEYS if k not in img]
        if missing:
            raise ValueError(f"not an LVIS annotation file: image {img.get('id')} lacks {missing}")
    cats = gt.dataset.get("categories", [])
    bad = [c.get("id") for c in cats if c.get("frequency") not in FREQUENCIES]
    if bad:
        raise ValueError(f"not an LVIS annotation file: categories {bad[:10]} lack frequency r/c/f")
    anns = gt.dataset.get("annotations", [])
    if any(not a["area"] > 0 for a in anns):
        kept = [a for a in anns if a["area"] > 0]
        gt = COCO(dict(gt.dataset, annotations=kept), print_function=gt.print_function)
    return gt


class LVISEvaluator(DetectionCollector):
    """LVIS evaluator. gt: LVIS annotation json path or a loaded ``faster_coco_eval.COCO``
    of one (its annotations receive the evaluator's bookkeeping keys, as with pycocotools);
    iou_types: ("bbox",) or ("bbox", "segm"); max_dets_per_image: the per-image cap
    (300 in the LVIS protocol); verbose=True prints the engine's log and summary."""

    def __init__(
        self,
        gt: str | Path | COCO,
        iou_types: Sequence[str] = ("bbox",),
        max_dets_per_image: int = MAX_DETS_PER_IMAGE,
        verbose: bool = False,
    ) -> None:
        n = max_dets_per_image
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_dets_per_image must be a positive int, got {n!r}")
        self.gt = load_lvis_gt(gt, verbose)
        # per image: the classes verified present (annotated) or absent (neg_category_ids)
        self._verified = {i: set(img["neg_category_ids"]) for i, img in self.gt.imgs.items()}
        for a in self.gt.dataset["annotations"]:
            self._verified[a["image_id"]].add(a["category_id"])
        super().__init__(self.gt.imgs, self.gt.getCatIds(), iou_types, max_dets_per_image, verbose)

    @property
    def _print(self):
        return print if self.verbose else _silent

    def _detections(self, iou_type: str) -> COCO:
        """The capped results as a COCO index of detections, without those that
        ``LVISEval._prepare`` leaves out after the cap: detections of unverified classes
        (neither annotated in the image nor in its neg_category_ids) and of zero area (it
        loads only ``0 < area < inf``). Areas as ``LVISResults`` computes them: box w * h
        for "bbox", mask area for "segm".

        COCOeval_faster drops the unverified detections itself too, but in
        faster-coco-eval 1.8.0 "segm" then fails (``IndexError: unordered_map::at``) on an
        image whose detections are all unverified: it encodes their masks without the image
        size, which it records only for kept detections. The index is built here rather
        than by ``COCO.loadRes``, whose per-detection mask area and box calls took most of
        the "segm" time (the C++ evaluation reads id, score, area, iscrowd and the box or
        the mask, nothing else)."""
        res = [d for d in self._results_for(iou_type)
               if d["category_id"] in self._verified[d["image_id"]]]
        if iou_type == "segm":
            areas = _mask_areas([d["segmentation"] for d in res])
        else:
            areas = [d["bbox"][2] * d["bbox"][3] for d in res]
        anns = []
        for d, area in zip(res, areas, strict=True):
            if area > 0:
                d.update(area=area, id=len(anns) + 1, iscrowd=0)
                anns.append(d)
        dt = COCO(print_function=self._print)
        gt = self.gt.dataset
        dt.dataset = {"images": gt["images"], "categories": gt["categories"], "annotations": anns}
        dt.createIndex()
        return dt

    def run_lvis_eval(self, iou_type: str) -> COCOeval_faster:
        """Run ``COCOeval_faster`` in LVIS mode (evaluate, accumulate, summarize) on the
        capped results; ``stats_as_dict`` holds the figures."""
        if iou_type not in self.iou_types:
            raise ValueError(f"iou_type {iou_type!r} is not one of {self.iou_types}")
        dt = self._detections(iou_type)
        E = COCOeval_faster(self.gt, dt, iou_type, lvis_style=True, print_function=self._print)
        # Classes with ground truth: the others only yield -1 entries, skipped by every mean
        # (all classes when there is no ground truth at all: an empty catIds means "all").
        with_gt = sorted({a["category_id"] for a in self.gt.dataset["annotations"]})
        E.params.catIds = with_gt or sorted(self.gt.getCatIds())
        E.params.maxDets = [self.max_dets_per_image]
        E.run()
        return E

    def evaluate(self) -> dict[str, dict[str, float]]:
        """{iou_type: {AP, AP50, AP75, APs, APm, APl, APr, APc, APf, AR@300, ARs@300,
        ARm@300, ARl@300}} (300: ``max_dets_per_image``)."""
        if self._metrics is None:
            keys = _lvis_keys(self.max_dets_per_image)
            self._metrics = {}
            for t in self.iou_types:
                stats = self.run_lvis_eval(t).stats_as_dict
                self._metrics[t] = {k: float(stats[label]) for k, label in keys.items()}
        return copy.deepcopy(self._metrics)

    def write(self, out_dir: str | Path, prefix: str = "") -> dict[str, Path]:
        """Write ``<prefix>results.json`` (capped COCO-format results), ``metrics.json`` and
        ``<prefix>AP_groups_<iou_type>.png`` to out_dir, each atomically.
        Returns {"results", "metrics", "plot_<iou_type>": path}."""
        out, metrics, paths = self._write_results(out_dir, prefix)
        for t in self.iou_types:
            paths[f"plot_{t}"] = out / f"{prefix}AP_groups_{t}.png"
            groups = {k: metrics[t][k] for k in ("AP", "APr", "APc", "APf", "AP50")}
            atomic_write(paths[f"plot_{t}"], plot_groups(
                groups, title=f"LVIS {t} AP by frequency group",
                ylabel=f"{'box' if t == 'bbox' else 'mask'} AP"))
        return paths
