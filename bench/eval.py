"""LVIS evaluation speed: our LVISEvaluator (faster-coco-eval) vs the official lvis package.

    python bench/eval.py [--repeat 3 --iou-types bbox segm --json PATH]

On tests/fixtures/lvis_v0.5_val_100.json (LVIS v0.5 val, 100 images, 977 annotations,
1230 classes) with one seeded result set of exactly 300 detections per image: the
ground truth jittered (20 % dropped), the rest false positives of the image's
annotated, negative, not-exhaustive and unverified classes; masks (segm) are the
shifted GT polygons and rectangles, as RLE. Both engines get the same detections:

- ours: ``LVISEvaluator.add`` per image (arrays and RLE dicts in) + ``evaluate()``;
- official: ``LVISResults`` + ``LVISEval.run()`` on the COCO-format results
  (``distill.evaluation.reference.official_lvis_eval``, under the np.float alias).

The ground truth is loaded outside the timers, afresh for every run of either engine
(LVISEval rewrites its polygons to RLE in place); its load times are reported apart.
Rounds alternate the engines after one untimed warm-up round; medians are reported,
with the largest |ours - official| over the 13 metrics as a check.
Floor: ours >= 5x faster than the official package (median, each IoU type).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from pycocotools.coco import COCO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill.config import atomic_write  # noqa: E402
from distill.evaluation.lvis import LVISEvaluator  # noqa: E402
from distill.evaluation.reference import load_official_gt, official_lvis_eval  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "lvis_v0.5_val_100.json"
FLOOR = 5.0
PER_IMAGE = 300


def make_detections(path: Path, seed: int, masks: bool):
    """{image_id: (xyxy, scores, category_ids, rles | None)} and the same as a COCO
    results list (xywh boxes, or RLE only for masks), PER_IMAGE detections per image."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path))  # pycocotools: the timed runs load their own
    rng = np.random.default_rng(seed)
    all_cats = np.array(sorted(gt.getCatIds()))
    per_image, results = {}, []
    for iid in sorted(gt.getImgIds()):
        img = gt.imgs[iid]
        h, w = img["height"], img["width"]
        anns = gt.imgToAnns[iid]
        xywh, cats, rles = [], [], []
        for a in anns:
            if rng.random() < 0.2 or len(cats) >= PER_IMAGE:
                continue
            bx, by, bw, bh = a["bbox"]
            dx, dy = rng.normal(0, 0.08, 2)
            if masks:
                shift = np.round([dx * bw, dy * bh])
                polys = [(np.array(p).reshape(-1, 2) + shift).ravel().tolist()
                         for p in a["segmentation"]]
                rles.append(gt.annToRLE(dict(a, segmentation=polys)))
                xywh.append(mask_utils.toBbox(rles[-1]).tolist())
            else:
                xywh.append([bx + dx * bw, by + dy * bh, bw, bh])
            cats.append(a["category_id"])
        pools = [p for p in (sorted({a["category_id"] for a in anns}), img["neg_category_ids"],
                             img["not_exhaustive_category_ids"], all_cats) if len(p)]
        while len(cats) < PER_IMAGE:
            pool = pools[int(rng.integers(len(pools)))]
            bw, bh = rng.uniform(4, 200, 2)
            box = [rng.uniform(0, max(w - bw, 1)), rng.uniform(0, max(h - bh, 1)), bw, bh]
            if masks:
                x, y = box[:2]
                poly = [x, y, x, y + bh, x + bw, y + bh, x + bw, y]
                rles.append(mask_utils.merge(mask_utils.frPyObjects([poly], h, w)))
                box = mask_utils.toBbox(rles[-1]).tolist()
            xywh.append(box)
            cats.append(int(rng.choice(pool)))
        scores = rng.uniform(0.0, 1.0, len(cats))
        b = np.array(xywh, np.float64)
        per_image[iid] = (np.c_[b[:, :2], b[:, :2] + b[:, 2:]], scores, np.array(cats),
                          rles if masks else None)
        for k in range(len(cats)):
            d = {"image_id": iid, "category_id": cats[k], "score": float(scores[k])}
            d.update({"segmentation": rles[k]} if masks else {"bbox": b[k].tolist()})
            results.append(d)
    return per_image, results


def run_ours(path: Path, iou_type: str, per_image) -> tuple[float, float, dict]:
    t = time.perf_counter()
    ev = LVISEvaluator(path, iou_types=(iou_type,))
    load = time.perf_counter() - t
    t = time.perf_counter()
    for iid, (boxes, scores, cats, rles) in per_image.items():
        ev.add(iid, boxes, scores, cats, rles)
    metrics = ev.evaluate()[iou_type]
    return load, time.perf_counter() - t, metrics


def run_official(path: Path, iou_type: str, results) -> tuple[float, float, dict]:
    t = time.perf_counter()
    gt = load_official_gt(path)
    load = time.perf_counter() - t
    t = time.perf_counter()
    metrics = official_lvis_eval(gt, results, iou_type)  # copies the results: timed, as in use
    return load, time.perf_counter() - t, metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3, help="timed rounds per engine (3)")
    p.add_argument("--iou-types", nargs="+", default=["bbox", "segm"], choices=["bbox", "segm"])
    p.add_argument("--gt", default=str(FIXTURE), help="LVIS annotation json (100-image fixture)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args(argv)
    path = Path(a.gt)
    engines = {"ours (faster-coco-eval)": run_ours, "official lvis 0.5.3": run_official}
    rows = []
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    for iou_type in a.iou_types:
        per_image, results = make_detections(path, a.seed, masks=iou_type == "segm")
        inputs = {"ours (faster-coco-eval)": per_image, "official lvis 0.5.3": results}
        times = {k: [] for k in engines}
        loads = {k: [] for k in engines}
        metrics = {}
        for r in range(a.repeat + 1):  # round 0: warm-up
            for name, fn in engines.items():
                load, secs, metrics[name] = fn(path, iou_type, inputs[name])
                if r:
                    times[name].append(secs)
                    loads[name].append(load)
                print(f"{iou_type} round {r} {name}: {secs:.3f} s", file=sys.stderr, flush=True)
        ours, official = (metrics[k] for k in engines)
        residual = max(abs(ours[k] - official[k]) for k in official)
        med = {k: statistics.median(v) for k, v in times.items()}
        for name in engines:
            rows.append({"iou_type": iou_type, "engine": name, "seconds_median": med[name],
                         "seconds_all": times[name],
                         "gt_load_median": statistics.median(loads[name]),
                         "x_official": med["official lvis 0.5.3"] / med[name],
                         "AP": metrics[name]["AP"], "max_abs_metric_diff": residual,
                         "detections": len(results)})
    load_end = os.getloadavg()
    settings = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/eval.py"]
                            + (argv if argv is not None else sys.argv[1:])),
        "gt": str(path), "detections_per_image": PER_IMAGE, "repeat": a.repeat, "seed": a.seed,
        "cpus": os.cpu_count(), "loadavg_start": list(load_start), "loadavg_end": list(load_end),
        "total_s": time.perf_counter() - t_start,
    }
    print(f"## LVIS evaluation speed ({settings['date']})\n")
    print(f"- command: `{settings['command']}`")
    print(f"- {path.name}, {PER_IMAGE} detections per image ({rows[0]['detections']} in all); "
          f"median of {a.repeat} alternating rounds after a warm-up; {os.cpu_count()} CPUs, "
          f"load {load_start[0]:.2f} -> {load_end[0]:.2f}; total {settings['total_s']:.0f} s\n")
    print("| IoU type | engine | seconds (median) | x official | GT load s | AP | max abs diff |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['iou_type']} | {r['engine']} | {r['seconds_median']:.3f} | "
              f"{r['x_official']:.1f} | {r['gt_load_median']:.3f} | {r['AP']:.4f} | "
              f"{r['max_abs_metric_diff']:.1e} |")
    ratios = {r["iou_type"]: r["x_official"] for r in rows if r["engine"].startswith("ours")}
    ok = all(v >= FLOOR for v in ratios.values())
    print("\nfloor: ours / official speed " + ", ".join(f"{t} {v:.1f}x" for t, v in ratios.items())
          + f" {'PASS' if ok else 'FAIL'} (>= {FLOOR:g}x)")
    if a.json:
        atomic_write(a.json, json.dumps({"settings": settings, "floor": FLOOR, "rows": rows},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
