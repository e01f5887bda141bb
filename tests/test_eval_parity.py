"""Parity of the project's detection evaluators with the official tools on the real
annotation fixtures, on synthetic result sets built from the ground truth:

- OVCocoEvaluator vs pycocotools' COCOeval run here (1e-6), result sets each isolating
  one perturbation (test_evaluation.py covers GT-as-detections, a mixed perturbation, a
  sub-vocabulary and shifted masks given as arrays);
- LVISEvaluator (faster-coco-eval) vs the official lvis package's LVISEval (1e-4, run by
  distill.evaluation.reference under the np.float alias), boxes and masks: the federated
  rules (neg_category_ids, not_exhaustive_category_ids, unverified classes), the
  300-per-image cap, zero-area detections, a frequency group without ground truth.

Each parity check prints its largest residual (pytest -rP shows them).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from distill.evaluation import LVISEvaluator, OVCocoEvaluator

FIXTURES = Path(__file__).resolve().parent / "fixtures"
COCO_JSON = FIXTURES / "coco_instances_val2014_100.json"
LVIS_JSON = FIXTURES / "lvis_v0.5_val_100.json"
pytestmark = [
    # third-party noise: pycocotools' decode under NumPy 2, lvis' Logger.warn
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning"),
]

COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LVIS_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf",
             "AR@300", "ARs@300", "ARm@300", "ARl@300")
COCO_TOL, LVIS_TOL = 1e-6, 1e-4
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_gt(path: Path) -> COCO:
    """pycocotools index of an annotation file: the test's own access to the ground truth
    (LVIS files load too), independent of both evaluation engines."""
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def check_parity(name: str, ours: dict, ref: dict, keys, tol: float) -> float:
    residuals = {k: abs(ours[k] - ref[k]) for k in keys}
    worst = max(residuals.values())
    print(f"[parity] {name}: max |ours - reference| = {worst:.3e} over {len(keys)} figures")
    bad = {k: (ours[k], ref[k]) for k, r in residuals.items() if not r <= tol}
    assert not bad, f"{name}: ours vs reference differ beyond {tol}: {bad}"
    return worst


# ----------------------------------------------------------------------------------
# synthetic result sets

FpCats = Callable[[dict, np.random.Generator], list[int]]


def rect_rle(xywh, h: int, w: int) -> dict:
    x, y, bw, bh = xywh
    poly = [x, y, x, y + bh, x + bw, y + bh, x + bw, y]
    return mask_utils.merge(mask_utils.frPyObjects([poly], h, w))


def synth(gt: COCO, seed: int, *, jitter: float = 0.1, drop: float = 0.2,
          fp_cats: FpCats | None = None, masks: bool = False, zero_area: int = 0,
          quantize: float | None = None):
    """Detections from the non-crowd ground truth of every image: a fraction ``drop``
    left out, the rest jittered (boxes: offsets and log-scales ~ N(0, jitter) of the box
    size; masks: polygons shifted by N(0, jitter) x box size, rounded), plus false
    positives (random boxes / rectangular masks) of the categories ``fp_cats(img, rng)``
    and ``zero_area`` top-scored detections of zero area (width-0 boxes / empty masks) of
    an annotated class. Scores uniform in [0.05, 1) (zero-area ones 0.999), optionally
    rounded to multiples of ``quantize`` (ties).

    Returns (per_image {id: (xyxy, scores, cats, rles | None)}, results): the same
    detections as a COCO results list written directly (xywh boxes, or RLE only).
    """
    rng = np.random.default_rng(seed)
    per_image, results = {}, []
    for iid in sorted(gt.getImgIds()):
        img = gt.imgs[iid]
        h, w = img["height"], img["width"]
        xywh, cats, rles = [], [], []
        anns = [a for a in gt.imgToAnns[iid] if not a.get("iscrowd", 0)]
        for a in anns:
            if rng.random() < drop:
                continue
            bx, by, bw, bh = a["bbox"]
            if masks:
                dx, dy = np.round(rng.normal(0, jitter, 2) * [bw, bh])
                polys = [(np.array(p).reshape(-1, 2) + [dx, dy]).ravel().tolist()
                         for p in a["segmentation"]]
                moved = dict(a, segmentation=polys)
                rles.append(gt.annToRLE(moved))
                xywh.append(mask_utils.toBbox(rles[-1]).tolist())
            else:
                dx, dy, sw, sh = rng.normal(0, jitter, 4)
                xywh.append([bx + dx * bw, by + dy * bh, bw * np.exp(sw), bh * np.exp(sh)])
            cats.append(a["category_id"])
        for c in fp_cats(img, rng) if fp_cats else []:
            bw, bh = rng.uniform(4, 200, 2)
            box = [rng.uniform(0, max(w - bw, 1)), rng.uniform(0, max(h - bh, 1)), bw, bh]
            if masks:
                rles.append(rect_rle(box, h, w))
                box = mask_utils.toBbox(rles[-1]).tolist()
            xywh.append(box)
            cats.append(int(c))
        scores = rng.uniform(0.05, 1.0, len(cats))
        if quantize:
            scores = np.round(scores / quantize) * quantize
        if zero_area and anns:
            for _ in range(zero_area):
                x, y = rng.uniform(0, w - 10), rng.uniform(0, h - 10)
                xywh.append([x, y, 0.0, 8.0])
                cats.append(anns[0]["category_id"])
                if masks:
                    rles.append(mask_utils.encode(np.zeros((h, w, 1), np.uint8, order="F"))[0])
                    xywh[-1] = [0.0, 0.0, 0.0, 0.0]
            scores = np.r_[scores, np.full(zero_area, 0.999)]
        b = np.array(xywh, np.float64).reshape(-1, 4)
        per_image[iid] = (np.c_[b[:, :2], b[:, :2] + b[:, 2:]], scores, np.array(cats, np.int64),
                          rles if masks else None)
        for k in range(len(cats)):
            d = {"image_id": iid, "category_id": int(cats[k]), "score": float(scores[k])}
            if masks:
                d["segmentation"] = rles[k]
            else:
                d["bbox"] = b[k].tolist()
            results.append(d)
    return per_image, results


def fill(ev, per_image) -> None:
    for iid, (boxes, scores, cats, masks) in per_image.items():
        ev.add(iid, boxes, scores, cats, masks)


# ----------------------------------------------------------------------------------
# COCO: OVCocoEvaluator vs COCOeval

@pytest.fixture(scope="module")
def coco_gt() -> COCO:
    return load_gt(COCO_JSON)


def cocoeval_stats(gt: COCO, results: list[dict], iou_type: str) -> dict[str, float]:
    with contextlib.redirect_stdout(io.StringIO()):
        E = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), iou_type)
        E.evaluate()
        E.accumulate()
        E.summarize()
    return dict(zip(COCO_STATS, map(float, E.stats[:6]), strict=True))


COCO_CAT_IDS = [c["id"] for c in json.loads(COCO_JSON.read_text())["categories"]]


def coco_random_fps(n: int) -> FpCats:
    def pick(img, rng):
        return [int(c) for c in rng.choice(COCO_CAT_IDS, size=n)]
    return pick


def coco_crowded(img, rng):
    """150 false positives of the image's first class on every third image: more than
    COCOeval's 100 detections per (image, class)."""
    return [1] * 150 if img["id"] % 3 == 0 else []


COCO_SETS = {
    # name: (iou_type, synth kwargs)
    "bbox_jitter_only": ("bbox", dict(jitter=0.2, drop=0.0)),
    "bbox_dropped_and_false_positives": (
        "bbox", dict(jitter=0.0, drop=0.4, fp_cats=coco_random_fps(10))),
    "bbox_over_100_per_image_and_class": (
        "bbox", dict(jitter=0.05, drop=0.1, fp_cats=coco_crowded)),
    "bbox_tied_scores": (
        "bbox", dict(jitter=0.1, drop=0.2, fp_cats=coco_random_fps(5), quantize=0.1)),
    "segm_rle_dropped_false_positives_empty": (
        "segm", dict(jitter=0.05, drop=0.3, fp_cats=coco_random_fps(4), masks=True, zero_area=1)),
}


@pytest.mark.parametrize("name", list(COCO_SETS))
def test_coco_matches_cocoeval(coco_gt, name):
    iou_type, kw = COCO_SETS[name]
    per_image, results = synth(coco_gt, seed=len(name), **kw)
    ev = OVCocoEvaluator(COCO_JSON, iou_types=(iou_type,))
    fill(ev, per_image)
    m = ev.evaluate()[iou_type]
    ref = cocoeval_stats(coco_gt, results, iou_type)
    assert 0.05 < ref["AP"] < ref["AP50"] < 0.999, ref  # a real, imperfect result set
    check_parity(f"COCO {name}", m, ref, COCO_STATS, COCO_TOL)
    # AP50_all: mean of per-class AP50 over the classes with ground truth = COCOeval's AP50
    assert m["AP50_all"] == pytest.approx(ref["AP50"], abs=COCO_TOL)
    if name == "bbox_over_100_per_image_and_class":
        # COCOeval keeps 100 per (image, class); the evaluator must not cap by itself
        assert max(sum(r["image_id"] == i and r["category_id"] == 1 for r in ev.results())
                   for i in per_image) > 100


# ----------------------------------------------------------------------------------
# LVIS: LVISEvaluator (faster-coco-eval) vs the official LVISEval

@pytest.fixture(scope="module")
def lvis_env():
    """(gt index, annotated classes per image, classes with any annotation)."""
    gt = load_gt(LVIS_JSON)
    pos = {i: {a["category_id"] for a in gt.imgToAnns[i]} for i in gt.getImgIds()}
    with_gt = sorted({a["category_id"] for a in gt.dataset["annotations"]})
    return gt, pos, with_gt


@pytest.fixture(scope="module")
def official():
    pytest.importorskip("lvis")  # the official package: dev extra
    from distill.evaluation.reference import official_lvis_eval
    return official_lvis_eval


def lvis_pair(official, per_image, results, iou_type: str, gt_path: Path = LVIS_JSON):
    """(our evaluator, its metrics, the official metrics) for one result set."""
    ev = LVISEvaluator(gt_path, iou_types=(iou_type,))
    fill(ev, per_image)
    return ev, ev.evaluate()[iou_type], official(gt_path, results, iou_type)


def federated_fps(env, crowded: int = 0) -> FpCats:
    """Per image: 2 false positives of negative classes (counted), 2 of not-exhaustive
    classes (ignored when unmatched), 2 of unverified classes (dropped); on every 4th
    image ``crowded`` more of annotated or negative classes (some images then exceed the
    300 cap)."""
    gt, pos, _ = env
    all_cats = np.array(gt.getCatIds())

    def pick(img, rng):
        neg, nel = img["neg_category_ids"], img["not_exhaustive_category_ids"]
        known = set(neg) | pos[img["id"]]
        unverified = [c for c in all_cats.tolist() if c not in known]
        out = [int(rng.choice(x)) for x in (neg, neg, nel, nel, unverified, unverified) if len(x)]
        if crowded and img["id"] % 4 == 0 and known:
            out += [int(c) for c in rng.choice(sorted(known), size=crowded)]
        return out
    return pick


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_lvis_matches_official_federated_cap_and_zero_area(lvis_env, official, iou_type, tmp_path):
    """Negative / not-exhaustive / unverified false positives, > 300 detections on a
    quarter of the images (the cap also drops true positives there) and top-scored
    zero-area detections (they take cap slots, then LVISEval drops them)."""
    gt = lvis_env[0]
    per_image, results = synth(gt, seed=7, jitter=0.08, drop=0.2,
                               fp_cats=federated_fps(lvis_env, 320),
                               masks=iou_type == "segm", zero_area=2)
    ev, m, ref = lvis_pair(official, per_image, results, iou_type)
    check_parity(f"LVIS {iou_type} federated + cap + zero-area", m, ref, LVIS_KEYS, LVIS_TOL)
    assert 0.1 < m["AP"] < m["AP50"] < 0.95 and m["APc"] != m["APf"], m

    # the cap: top-300 by score on the crowded images, nothing dropped elsewhere
    kept: dict[int, list[float]] = {}
    for r in ev.results():
        kept.setdefault(r["image_id"], []).append(r["score"])
    crowded = [i for i, d in per_image.items() if len(d[1]) > 300]
    assert len(crowded) >= 20
    for i, (_, scores, _, _) in per_image.items():
        want = np.sort(scores)[::-1][:300]
        assert np.array_equal(np.array(kept.get(i, [])), want), i
    if iou_type == "bbox":
        # without the cap the figures differ: the cap is not vacuous
        uncapped = LVISEvaluator(LVIS_JSON, max_dets_per_image=1000)
        fill(uncapped, per_image)
        free = uncapped.evaluate()["bbox"]
        print(f"uncapped - capped: AP {free['AP'] - m['AP']:.4f}, "
              f"AR {free['AR@1000'] - m['AR@300']:.4f}")
        assert free["AR@1000"] > m["AR@300"] + 0.01 and free["AP"] > m["AP"]
        # written files
        paths = ev.write(tmp_path, prefix="lvis_")
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "lvis_AP_groups_bbox.png", "lvis_results.json", "metrics.json"]
        assert json.loads(paths["metrics"].read_text()) == ev.evaluate()
        assert json.loads(paths["results"].read_text()) == ev.results()
        assert paths["plot_bbox"].read_bytes().startswith(PNG_MAGIC)


def test_lvis_federated_rules_each_matter_and_match_official(lvis_env, official):
    """On one base set: high-scored false positives of negative classes lower AP;
    unmatched ones of not-exhaustive classes, and any of unverified classes, change
    nothing, in both engines."""
    gt, pos, with_gt = lvis_env
    all_cats = gt.getCatIds()

    def unmatched_box(img, cat, rng):
        own = [a["bbox"] for a in gt.imgToAnns[img["id"]] if a["category_id"] == cat]
        while True:
            bw, bh = rng.uniform(8, 120, 2)
            box = [rng.uniform(0, img["width"] - bw), rng.uniform(0, img["height"] - bh), bw, bh]
            if not own or mask_utils.iou([box], own, [0] * len(own)).max() < 0.1:
                return box

    def with_extra(base, choose, seed):
        """base + one 0.99-scored detection per image of the class ``choose`` picks."""
        rng = np.random.default_rng(seed)
        per_image, results = copy.deepcopy(base)
        for iid, (boxes, scores, cats, _) in per_image.items():
            img = gt.imgs[iid]
            c = choose(img, rng)
            if c is None:
                continue
            b = unmatched_box(img, c, rng)
            per_image[iid] = (np.r_[boxes, [[b[0], b[1], b[0] + b[2], b[1] + b[3]]]],
                              np.r_[scores, 0.99], np.r_[cats, c], None)
            results.append({"image_id": iid, "category_id": int(c), "bbox": b, "score": 0.99})
        return per_image, results

    def pick(options):
        return lambda img, rng: int(rng.choice(options(img))) if len(options(img)) else None

    neg_with_gt = pick(lambda img: [c for c in img["neg_category_ids"] if c in set(with_gt)])
    nel = pick(lambda img: img["not_exhaustive_category_ids"])
    unverified = pick(lambda img: [c for c in all_cats if c not in pos[img["id"]]
                                   and c not in img["neg_category_ids"]])
    base = synth(gt, seed=11, jitter=0.08, drop=0.2)
    variants = {"base": base, "negative": with_extra(base, neg_with_gt, 1),
                "not exhaustive": with_extra(base, nel, 2),
                "unverified": with_extra(base, unverified, 3)}
    got = {}
    for name, (per_image, results) in variants.items():
        _, m, ref = lvis_pair(official, per_image, results, "bbox")
        check_parity(f"LVIS bbox rule set '{name}'", m, ref, LVIS_KEYS, LVIS_TOL)
        got[name] = m
    assert got["negative"]["AP"] < got["base"]["AP"] - 1e-3
    assert got["not exhaustive"] == got["base"]
    assert got["unverified"] == got["base"]
    assert len(variants["not exhaustive"][1]) - len(base[1]) >= 10


def test_lvis_group_without_ground_truth_is_minus_one(lvis_env, official, tmp_path):
    """The only rare class's annotation removed: APr is -1.0 in both engines."""
    data = json.loads(LVIS_JSON.read_text())
    rare = {c["id"] for c in data["categories"] if c["frequency"] == "r"}
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] not in rare]
    path = tmp_path / "lvis_no_rare.json"
    path.write_text(json.dumps(data))
    per_image, results = synth(load_gt(path), seed=5, jitter=0.08, drop=0.2,
                               fp_cats=federated_fps(lvis_env))
    _, m, ref = lvis_pair(official, per_image, results, "bbox", gt_path=path)
    check_parity("LVIS bbox without rare ground truth", m, ref, LVIS_KEYS, LVIS_TOL)
    assert m["APr"] == ref["APr"] == -1.0 and m["APc"] > 0


def test_lvis_gt_as_detections_and_empty(lvis_env):
    gt = lvis_env[0]
    per_image = {}
    for iid in gt.getImgIds():  # exact GT boxes and masks, score 1
        anns = gt.imgToAnns[iid]
        b = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
        per_image[iid] = (np.c_[b[:, :2], b[:, :2] + b[:, 2:]], np.ones(len(anns)),
                          np.array([a["category_id"] for a in anns]),
                          [gt.annToRLE(a) for a in anns])
    ev = LVISEvaluator(LVIS_JSON, iou_types=("bbox", "segm"))
    fill(ev, per_image)
    m = ev.evaluate()
    for t in ("bbox", "segm"):
        assert set(m[t]) == set(LVIS_KEYS)
        assert all(m[t][k] == pytest.approx(1.0, abs=1e-12) for k in LVIS_KEYS), m[t]
    assert not hasattr(np, "float")  # no np.float alias needed or leaked
    empty = LVISEvaluator(LVIS_JSON).evaluate()["bbox"]
    assert all(empty[k] == 0.0 for k in LVIS_KEYS), empty


def test_lvis_rejects_bad_input():
    with pytest.raises(ValueError, match="not an LVIS annotation file"):
        LVISEvaluator(COCO_JSON)
    with pytest.raises(ValueError, match="max_dets_per_image"):
        LVISEvaluator(LVIS_JSON, max_dets_per_image=0)
    ev = LVISEvaluator(LVIS_JSON)
    with pytest.raises(ValueError, match="not in the ground truth"):
        ev.add(next(iter(ev.gt.imgs)), [[0, 0, 1, 1]], [1.0], [10**6])
