"""How a detector's scores hold up when the user names only a few classes.

    m = few_names(model, val, text_embeddings, novel, thresholds=[0.3, 0.5])
    rows = measure_run("outputs/shapes/vild-<hash>", {"reference": 3, "softmax": 1}, [0.3, 0.5])

For every class, box AP50 over the whole val split when the vocabulary is a random
``size``-name subset containing it (every other object still in the pictures, unnamed),
beside the same class's AP50 with every name; and, at each of ``thresholds`` (the demo's
score cut), how many detections per image fall on objects of unnamed classes (their best
ground-truth match, IoU >= 0.5, is of a class outside the vocabulary). Subsets: ``rounds``
random partitions of the classes into groups of ``size`` (a short last group is filled
with other classes, which are scored there too).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

import torch
from torchvision.ops import box_iou
from tqdm import tqdm

from detectors.inference import model_device
from detectors.vild import ViLD
from distill.data.coco import CocoDetection
from distill.data.vocab import subsets
from distill.engine import to_device
from distill.evaluation import OVCocoEvaluator


def on_objects(boxes: torch.Tensor, gt_boxes: torch.Tensor, gt_classes: torch.Tensor,
               named: Sequence[int]) -> tuple[int, int]:
    """(detections on objects of unnamed classes, on objects of named ones): a detection is
    on the ground-truth object it overlaps most, when their IoU is at least 0.5; ``named``
    are the vocabulary's class indices (0-based, as ``gt_classes``)."""
    if not len(boxes) or not len(gt_boxes):
        return 0, 0
    iou, best = box_iou(boxes, gt_boxes).max(1)
    inside = torch.isin(gt_classes[best[iou >= 0.5]], torch.as_tensor(list(named)))
    return int((~inside).sum()), int(inside.sum())


@torch.no_grad()
def _predict_all(model: ViLD, val: CocoDetection, batch_size: int) -> list[dict]:
    out = []
    for start in range(0, len(val), batch_size):
        samples = [val[i] for i in range(start, min(start + batch_size, len(val)))]
        found = model([s["image"].to(model_device(model)) for s in samples])
        out += to_device(found, "cpu")
    return out


@torch.no_grad()
def few_names(model: ViLD, val: CocoDetection, text: torch.Tensor, novel: Sequence[bool],
              thresholds: Sequence[float], size: int = 3, rounds: int = 3, seed: int = 0,
              batch_size: int = 8, progress: bool = True) -> dict:
    """The measure of the module docstring. Returns ``per_class`` {name: {"all": AP50,
    "few": mean AP50 over its subsets}} (classes with val boxes), their means ``all`` and
    ``few``, ``few_over_all``, and per threshold of ``thresholds`` ``unnamed_per_image``
    (detections scoring at least that on objects of unnamed classes, per image, mean over
    the subsets) and ``named_per_image`` (the same on objects of named classes)."""
    saved = (model.roi_heads.text_embeddings, model.roi_heads.novel_mask)
    was_training = model.training
    model.eval()
    ids = [int(c["id"]) for c in val.categories]
    gts = [val.targets(i) for i in range(len(val))]
    novel_ids = [c for c, n in zip(ids, novel, strict=True) if n]
    groups = [list(range(len(ids)))] + subsets(len(ids), size, rounds, seed)
    aps: dict[int, list[float]] = {k: [] for k in range(len(ids))}
    full: dict[int, float] = {}
    counts = torch.zeros(len(thresholds), 2)
    try:
        for g, group in enumerate(tqdm(groups, desc="few names", disable=not progress)):
            model.set_vocabulary(text[group], torch.as_tensor([novel[k] for k in group]))
            found = _predict_all(model, val, batch_size)
            named = [ids[k] for k in group]
            ev = OVCocoEvaluator(val.instances_json, category_ids=named,
                                 novel_category_ids=[c for c in novel_ids if c in named])
            for gt, det in zip(gts, found, strict=True):
                ev.add(gt["image_id"], det["boxes"], det["scores"],
                       [ids[group[k - 1]] for k in det["labels"].tolist()])
                if g == 0:
                    continue
                for j, threshold in enumerate(thresholds):
                    counts[j] += torch.tensor(on_objects(
                        det["boxes"][det["scores"] >= threshold], gt["boxes"], gt["labels"] - 1,
                        group), dtype=torch.float32)
            per_class = ev.evaluate()["bbox"]["per_class_AP50"]
            for k in group:
                ap = per_class.get(val.categories[k]["name"])  # None: no val box of it
                if ap is not None and g == 0:
                    full[k] = ap
                elif ap is not None:
                    aps[k].append(ap)
    finally:
        model.roi_heads.text_embeddings, model.roi_heads.novel_mask = saved
        model.train(was_training)
    scored = [k for k in full if aps[k]]
    per_class = {val.names[k]: {"all": full[k], "few": statistics.fmean(aps[k])}
                 for k in scored}
    per = len(val) * (len(groups) - 1)  # images x subsets
    mean_all = statistics.fmean(full[k] for k in scored)
    mean_few = statistics.fmean(per_class[val.names[k]]["few"] for k in scored)
    by_cut = list(zip(thresholds, (counts / per).tolist(), strict=True))
    return {"per_class": per_class, "all": mean_all, "few": mean_few,
            "few_over_all": mean_few / mean_all if mean_all > 0 else float("nan"),
            "unnamed_per_image": {t: c[0] for t, c in by_cut},
            "named_per_image": {t: c[1] for t, c in by_cut},
            "size": size, "subsets": len(groups) - 1}


def measure_run(run, rounds: Mapping[str, int], thresholds: Sequence[float],
                progress: bool = True) -> dict[str, dict]:
    """A trained detector run under each ``model.scoring`` of ``rounds`` (the same weights,
    loaded once), with that many rounds of subsets: its generalized-setting ``AP50_novel`` /
    ``AP50_base`` (every val name) and :func:`few_names`'s figures, per scoring."""
    from detectors import recipe as detection

    cfg, teacher, model = detection.load_trained(run)
    val = detection.val_set(cfg)
    text = teacher.text(val.names)
    rows = {}
    for scoring, n in rounds.items():
        model.roi_heads.scoring = scoring
        generalized = detection.evaluate(model, teacher, val, None, progress=False)
        m = few_names(model, val, text, val.novel, thresholds, rounds=n, progress=progress)
        rows[scoring] = {"AP50_novel": generalized["AP50_novel"],
                         "AP50_base": generalized["AP50_base"], **m}
    return rows
