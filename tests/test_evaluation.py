"""COCO-OV evaluator against independent pycocotools runs on a real annotation file
(tests/fixtures). Result sets are synthesised from the ground truth. The LVIS evaluator's
tests, and more COCO result sets, are in test_eval_parity.py."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from distill.evaluation import OVCocoEvaluator, xyxy_to_xywh

FIXTURES = Path(__file__).resolve().parent / "fixtures"
COCO_JSON = FIXTURES / "coco_instances_val2014_100.json"
pytestmark = [
    # third-party noise: pycocotools' decode under NumPy 2
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]

# COCO-OV novel classes (OVR-CNN split), DESIGN.md
NOVEL_IDS = (5, 6, 17, 18, 21, 22, 28, 32, 36, 41, 47, 49, 61, 63, 76, 81, 87)
STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def quiet():
    return contextlib.redirect_stdout(io.StringIO())


def load_coco() -> COCO:
    with quiet():
        return COCO(str(COCO_JSON))


# ----------------------------------------------------------------------------------
# independent reference runs (no code from distill.evaluation)

def direct_cocoeval(results: list[dict], iou_type: str, cat_ids=None) -> COCOeval:
    gt = load_coco()
    with quiet():
        E = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), iou_type)
        if cat_ids is not None:
            E.params.catIds = list(cat_ids)
        E.evaluate()
        E.accumulate()
        E.summarize()
    return E


def per_class_ap50_by_hand(E: COCOeval) -> dict[int, float]:
    """Mean over the 101 recall points of precision at IoU 0.5, area all, 100 dets."""
    assert E.params.iouThrs[0] == 0.5 and E.params.areaRngLbl[0] == "all"
    assert E.params.maxDets[2] == 100
    p = E.eval["precision"][0, :, :, 0, 2]  # (R, K)
    return {cid: float(p[:, k].mean()) for k, cid in enumerate(E.params.catIds) if p[0, k] > -1}


# ----------------------------------------------------------------------------------
# synthetic result sets from the COCO ground truth

def gt_dets(gt: COCO, with_masks: bool = False):
    """Non-crowd GT as detections, score 1: per image (xyxy, scores, cats, rles) and the
    same detections as a COCO results list written directly in xywh."""
    per_image, results = {}, []
    for iid in gt.getImgIds():
        anns = [a for a in gt.imgToAnns[iid] if not a["iscrowd"]]
        xywh = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
        rles = [gt.annToRLE(a) for a in anns] if with_masks else None
        per_image[iid] = (np.c_[xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], np.ones(len(anns)),
                          np.array([a["category_id"] for a in anns]), rles)
        for k, a in enumerate(anns):
            d = {"image_id": iid, "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 1.0}
            if with_masks:
                d["segmentation"] = rles[k]
            results.append(d)
    return per_image, results


def perturbed_dets(gt: COCO, seed: int = 0):
    """GT boxes jittered, 20% dropped, 10% relabelled, 3 random false positives per image,
    random scores; per image (xyxy, scores, cats) and the direct xywh results list."""
    rng = np.random.default_rng(seed)
    cat_ids = np.array(gt.getCatIds())
    per_image, results = {}, []
    for iid in gt.getImgIds():
        img = gt.imgs[iid]
        boxes, cats = [], []
        for a in gt.imgToAnns[iid]:
            if rng.random() < 0.2:
                continue
            x, y, w, h = a["bbox"]
            x, y = x + rng.normal(0, 0.1) * w, y + rng.normal(0, 0.1) * h
            w, h = w * np.exp(rng.normal(0, 0.1)), h * np.exp(rng.normal(0, 0.1))
            boxes.append([x, y, x + w, y + h])
            cats.append(a["category_id"] if rng.random() > 0.1 else int(rng.choice(cat_ids)))
        for _ in range(3):
            x, y = rng.uniform(0, img["width"] - 60), rng.uniform(0, img["height"] - 60)
            w, h = rng.uniform(10, 200, size=2)
            boxes.append([x, y, x + w, y + h])
            cats.append(int(rng.choice(cat_ids)))
        boxes = np.array(boxes, np.float64).reshape(-1, 4)
        scores = rng.uniform(0.05, 1.0, len(boxes))
        per_image[iid] = (boxes, scores, np.array(cats), None)
        for b, s, c in zip(boxes, scores, cats, strict=True):
            results.append({"image_id": iid, "category_id": int(c), "score": float(s),
                            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
    return per_image, results


def shifted_mask_dets(gt: COCO, seed: int = 1):
    """Non-crowd GT polygons shifted by a few pixels as masks (arrays for even images,
    RLE dicts for odd ones), boxes from the masks, random scores; plus the direct
    results list (RLE segmentation only)."""
    rng = np.random.default_rng(seed)
    per_image, results = {}, []
    for n, iid in enumerate(gt.getImgIds()):
        rles, cats = [], []
        for a in gt.imgToAnns[iid]:
            if a["iscrowd"]:
                continue
            dx, dy = rng.integers(-4, 5, size=2)
            moved = dict(a, segmentation=[(np.array(p).reshape(-1, 2) + [dx, dy]).ravel().tolist()
                                          for p in a["segmentation"]])
            rles.append(gt.annToRLE(moved))
            cats.append(a["category_id"])
        scores = rng.uniform(0.05, 1.0, len(rles))
        xywh = mask_utils.toBbox(rles).reshape(-1, 4) if rles else np.zeros((0, 4))
        masks = (np.stack([mask_utils.decode(r) for r in rles]) if rles else
                 np.zeros((0, gt.imgs[iid]["height"], gt.imgs[iid]["width"]), np.uint8))
        per_image[iid] = (np.c_[xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], scores, np.array(cats),
                          masks if n % 2 == 0 else rles)
        for r, s, c in zip(rles, scores, cats, strict=True):
            results.append({"image_id": iid, "category_id": c, "segmentation": r, "score": float(s)})
    return per_image, results


def fill(ev, per_image) -> None:
    for iid, (boxes, scores, cats, masks) in per_image.items():
        ev.add(iid, boxes, scores, cats, masks)


def check_against_direct(metrics: dict, results: list[dict], iou_type: str, gt_cat_ids) -> None:
    E = direct_cocoeval(results, iou_type)
    for k, name in enumerate(STATS):
        assert metrics[name] == pytest.approx(E.stats[k], abs=1e-6), name
    ref = per_class_ap50_by_hand(E)
    assert metrics["AP50_all"] == pytest.approx(np.mean(list(ref.values())), abs=1e-6)
    assert metrics["AP50_all"] == pytest.approx(E.stats[1], abs=1e-6)
    novel = [c for c in NOVEL_IDS if c in gt_cat_ids]
    base = [c for c in gt_cat_ids if c not in NOVEL_IDS]
    for group, ids in (("novel", novel), ("base", base)):
        Eg = direct_cocoeval(results, iou_type, cat_ids=ids)
        by_hand = per_class_ap50_by_hand(Eg)
        assert set(by_hand) <= set(ids) and len(by_hand) == metrics["num_classes"][group]
        assert metrics[f"AP50_{group}"] == pytest.approx(np.mean(list(by_hand.values())), abs=1e-6)
        assert metrics[f"AP50_{group}"] == pytest.approx(Eg.stats[1], abs=1e-6)
    names = {c["id"]: c["name"] for c in load_coco().dataset["categories"]}
    assert metrics["per_class_AP50"] == pytest.approx({names[c]: v for c, v in ref.items()}, abs=1e-6)


@pytest.fixture(scope="module")
def coco_gt() -> COCO:
    return load_coco()


# ----------------------------------------------------------------------------------
# COCO

def test_coco_gt_boxes_give_ap50_one_and_match_cocoeval(coco_gt):
    per_image, results = gt_dets(coco_gt)
    ev = OVCocoEvaluator(COCO_JSON, novel_category_ids=NOVEL_IDS)
    fill(ev, per_image)
    m = ev.evaluate()["bbox"]
    assert m["AP50"] == 1.0 and m["AP50_novel"] == 1.0 and m["AP50_base"] == 1.0
    assert m["num_classes"] == {"novel": 15, "base": 55, "all": 70}  # 76, 87 have no gt here
    check_against_direct(m, results, "bbox", set(coco_gt.getCatIds()))


def test_coco_perturbed_boxes_match_cocoeval_all_novel_base(coco_gt, tmp_path):
    per_image, results = perturbed_dets(coco_gt)
    ev = OVCocoEvaluator(coco_gt, novel_category_ids=NOVEL_IDS)
    fill(ev, per_image)
    m = ev.evaluate()["bbox"]
    assert 0.1 < m["AP"] < m["AP50"] < 0.95  # a real, imperfect result set
    assert m["AP50_novel"] != m["AP50_base"]
    check_against_direct(m, results, "bbox", set(coco_gt.getCatIds()))

    # written files
    paths = ev.write(tmp_path, prefix="coco_")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "coco_per_class_AP50_bbox.png", "coco_results.json", "metrics.json"]  # no temp files left
    with quiet():
        loaded = load_coco().loadRes(str(paths["results"]))
    assert len(loaded.anns) == len(results)
    assert json.loads(paths["metrics"].read_text()) == ev.evaluate()
    png = paths["plot_bbox"].read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000


def test_coco_masks_match_cocoeval_segm(coco_gt):
    # exact GT masks (RLE from the polygons): perfect mask AP50
    per_image, results = gt_dets(coco_gt, with_masks=True)
    ev = OVCocoEvaluator(COCO_JSON, novel_category_ids=NOVEL_IDS, iou_types=("segm",))
    fill(ev, per_image)
    assert ev.evaluate()["segm"]["AP50"] == 1.0
    # shifted masks, given as arrays and as RLE dicts
    per_image, results = shifted_mask_dets(coco_gt)
    ev = OVCocoEvaluator(COCO_JSON, novel_category_ids=NOVEL_IDS, iou_types=("segm",))
    fill(ev, per_image)
    m = ev.evaluate()["segm"]
    assert 0.2 < m["AP"] < m["AP50"] < 1.0
    check_against_direct(m, results, "segm", set(coco_gt.getCatIds()))
    iid = next(iter(per_image))  # array masks were encoded to the same RLE (counts as str)
    ours = [r["segmentation"] for r in ev.results() if r["image_id"] == iid]
    theirs = [r["segmentation"] for r in results if r["image_id"] == iid]
    order = np.argsort(-per_image[iid][1], kind="stable")
    assert [o["counts"] for o in ours] == [theirs[i]["counts"].decode() for i in order]


def test_coco_xyxy_to_xywh_and_results_format(coco_gt):
    iid = coco_gt.getImgIds()[0]
    assert xyxy_to_xywh([[10.0, 20.0, 50.0, 80.0]]).tolist() == [[10.0, 20.0, 40.0, 60.0]]
    ev = OVCocoEvaluator(coco_gt)
    ev.add(iid, torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.5, 1.25, 3.0, 2.5]]),
           torch.tensor([0.25, 0.75]), torch.tensor([3, 1]))
    assert ev.results() == [
        {"image_id": iid, "category_id": 1, "bbox": [0.5, 1.25, 2.5, 1.25], "score": 0.75},
        {"image_id": iid, "category_id": 3, "bbox": [10.0, 20.0, 40.0, 60.0], "score": 0.25},
    ]
    with pytest.raises(KeyError):
        ev.add(-1, [[0, 0, 1, 1]], [1.0], [1])
    with pytest.raises(ValueError, match="non-finite"):
        ev.add(iid, [[0, 0, 1, 1]], [float("nan")], [1])
    with pytest.raises(ValueError, match="not in the ground truth"):
        ev.add(iid, [[0, 0, 1, 1]], [1.0], [999])
    with pytest.raises(ValueError, match="novel_category_ids"):
        OVCocoEvaluator(coco_gt, novel_category_ids=[999])


def test_coco_vocabulary_restriction(coco_gt):
    """category_ids limits the evaluated classes (e.g. the 65 COCO-OV classes)."""
    per_image, results = perturbed_dets(coco_gt, seed=3)
    vocab = [c for c in coco_gt.getCatIds() if c % 3]  # an arbitrary sub-vocabulary
    ev = OVCocoEvaluator(coco_gt, novel_category_ids=[c for c in NOVEL_IDS if c % 3], category_ids=vocab)
    fill(ev, per_image)
    m = ev.evaluate()["bbox"]
    E = direct_cocoeval(results, "bbox", cat_ids=vocab)
    for k, name in enumerate(STATS):
        assert m[name] == pytest.approx(E.stats[k], abs=1e-6), name
    assert m["num_classes"]["all"] == len(per_class_ap50_by_hand(E)) < 70


def test_coco_empty_predictions(coco_gt, tmp_path):
    ev = OVCocoEvaluator(coco_gt, novel_category_ids=NOVEL_IDS, iou_types=("bbox", "segm"))
    ev.add(coco_gt.getImgIds()[0], np.zeros((0, 4)), np.zeros(0), np.zeros(0, int))
    assert ev.results() == []
    m = ev.evaluate()
    for t in ("bbox", "segm"):
        assert all(m[t][k] == 0.0 for k in STATS + ("AP50_novel", "AP50_base", "AP50_all"))
        assert len(m[t]["per_class_AP50"]) == 70 and set(m[t]["per_class_AP50"].values()) == {0.0}
    paths = ev.write(tmp_path)
    assert json.loads(paths["results"].read_text()) == []
    assert paths["plot_segm"].read_bytes().startswith(PNG_MAGIC)
