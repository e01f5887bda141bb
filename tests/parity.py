"""Comparing two runtimes' detections (PyTorch vs ONNX Runtime, one CPU kernel set vs another).

Two float paths agree to about 1e-6, not bit for bit, so a detection whose score sits on a
decision boundary may be kept by one and dropped by the other: the score threshold, the RoI
heads' own ``score_thresh``, the top-``detections_per_img`` cut, or NMS (two boxes whose IoU
is at the NMS threshold, or whose scores tie). Such a detection is allowed on either side;
every other detection must match one on the other side (same name, score within
``SCORE_TOL``, box within ``BOX_TOL`` px). A threshold that a test chooses itself must lie
between two scores (:func:`threshold_between`), never on one.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

SCORE_TOL = 1e-5  # two runtimes' scores of one detection differ by ~1e-7 here; 100x margin
BOX_TOL = 1e-3  # px
IOU_TOL = 1e-4


def threshold_between(scores, gap: float = 10 * SCORE_TOL) -> float:
    """A threshold halfway between two neighbouring scores near the middle of ``scores``
    whose gap exceeds ``gap``: no score lies within ``gap / 2`` of it."""
    s = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    order = sorted(range(len(s) - 1), key=lambda i: abs(i - len(s) // 2))
    for i in order:
        if s[i] - s[i + 1] > gap:
            return float((s[i] + s[i + 1]) / 2)
    raise AssertionError(f"no gap above {gap} between {len(s)} scores")


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def match_detections(got: dict, ref: dict, *, thresholds=(), cap: int | None = None,
                     nms_thresh: float | None = None) -> list[tuple[int, int]]:
    """Pairs ``(i, j)``: detection ``i`` of ``got`` is detection ``j`` of ``ref``.

    Fails unless every unpaired detection lies on a boundary: its score within
    ``SCORE_TOL`` of one of ``thresholds``; at or below the other side's lowest score
    plus ``SCORE_TOL`` when the other side holds ``cap`` detections (the top-k cut); or,
    with ``nms_thresh``, a same-name box of the other side that outscores it (within
    ``SCORE_TOL``) overlaps it at an IoU within ``IOU_TOL`` of ``nms_thresh``, ties its
    score, or is itself unpaired (one flip passed on).
    """
    sides = (got, ref)
    n = [len(s["scores"]) for s in sides]
    pairs, free = [], list(range(n[1]))
    for i in np.argsort(-np.asarray(got["scores"]), kind="stable"):
        j = next((j for j in free if ref["names"][j] == got["names"][i]
                  and abs(float(ref["scores"][j]) - float(got["scores"][i])) < SCORE_TOL
                  and np.abs(np.asarray(ref["boxes"][j]) - got["boxes"][i]).max() < BOX_TOL),
                 None)
        if j is not None:
            free.remove(j)
            pairs.append((int(i), j))
    paired = [{i for i, _ in pairs}, {j for _, j in pairs}]
    for side in (0, 1):
        mine, other = sides[side], sides[1 - side]
        for k in set(range(n[side])) - paired[side]:
            score, box = float(mine["scores"][k]), np.asarray(mine["boxes"][k])
            if any(abs(score - t) < SCORE_TOL for t in thresholds):
                continue
            if cap is not None and n[1 - side] >= cap and \
                    score <= float(np.min(other["scores"])) + SCORE_TOL:
                continue
            if nms_thresh is not None and any(
                    other["names"][m] == mine["names"][k]
                    and float(other["scores"][m]) > score - SCORE_TOL
                    and (abs(iou - nms_thresh) < IOU_TOL
                         or (iou > nms_thresh and (abs(float(other["scores"][m]) - score)
                                                   < SCORE_TOL or m not in paired[1 - side])))
                    for m in range(n[1 - side])
                    for iou in [_iou(box, np.asarray(other["boxes"][m]))]):
                continue
            raise AssertionError(
                f"{'got' if side == 0 else 'ref'} detection {k} ({mine['names'][k]!r}, score "
                f"{score:.8f}, box {box.round(3).tolist()}) has no counterpart and lies on no "
                f"threshold {list(thresholds)}, top-{cap} cut or NMS boundary")
    return pairs


def assert_same_detections(got: dict, ref: dict, student=None, thresholds=()) -> list:
    """:func:`match_detections` with the boundaries of an exported ``student``'s RoI heads
    (``score_thresh``, ``detections_per_img``, ``nms_thresh``) added; at least one pair,
    and ``got`` in score order."""
    cap = nms = None
    thresholds = list(thresholds)
    if student is not None:
        heads = student.model.roi_heads
        thresholds.append(float(heads.score_thresh))
        cap, nms = heads.detections_per_img, heads.nms_thresh
    pairs = match_detections(got, ref, thresholds=thresholds, cap=cap, nms_thresh=nms)
    assert pairs, "no detection in common"
    assert np.all(np.diff(got["scores"]) <= 1e-6)
    return pairs


PIXEL_TOL = 1e-4  # pixel scores in [0, 1]; a 1e-6 embedding change moves a logit (cos / T, x20) ~2e-5


def assert_same_label_maps(got: np.ndarray, ref: np.ndarray, model, image,
                           threshold: float = 0.0) -> None:
    """Two runtimes' label maps (H, W) for ``image`` (H, W, 3) uint8, pixels below
    ``threshold`` unlabelled, agree except where the reference ``model``'s upsampled name
    scores tie (best two within ``PIXEL_TOL``) or the best sits on the threshold."""
    import torch
    import torch.nn.functional as F

    assert got.shape == ref.shape == image.shape[:2]
    differ = got != ref
    if not differ.any():
        return
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
    with torch.no_grad():
        logits = F.interpolate(model.score_logits(x), size=got.shape, mode="bilinear",
                               align_corners=False)
        scores = model.name_scores(logits)[0]
    top2 = scores.topk(min(2, len(scores)), dim=0).values.numpy()
    margin = np.minimum(top2[0] - top2[-1] if len(top2) > 1 else np.inf,
                        np.abs(top2[0] - threshold))
    assert (margin[differ] < PIXEL_TOL).all(), (
        f"{int(differ.sum())} pixels differ, {int((margin[differ] >= PIXEL_TOL).sum())} of them "
        f"with a margin >= {PIXEL_TOL} between the two best scores or the best and the "
        f"threshold (largest {float(margin[differ].max()):.2e})")


def without_open_clip(code: str) -> str:
    """Run the Python ``code`` in a fresh interpreter where any import of open_clip fails (an
    exported student must not need it); its stdout, stripped. The run must succeed and leave
    open_clip unimported."""
    guard = "import sys\nsys.modules['open_clip'] = None  # importing open_clip now fails\n"
    check = ("\nassert 'open_clip' not in [m for m in sys.modules if sys.modules[m] is not None]\n")
    done = subprocess.run([sys.executable, "-c", guard + code + check],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()
