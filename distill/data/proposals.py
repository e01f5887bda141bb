"""Region proposals for teacher extraction: ground truth, jittered ground truth, or a file.

``cache.proposals``:

- ``gt``: the ground-truth boxes (crowd left out), score 1.
- ``jitter``: each GT box (score 1), then jittered copies cycling over the GT boxes
  until ``num_proposals`` boxes: centre shifted by U(-j, j) x box size, width and
  height scaled by 1 + U(-j, j) (j = ``cache.jitter``), clipped to the image, score =
  IoU with its source box. Drawn from ``np.random.default_rng([seed, image_id])``,
  so the same image always gets the same boxes.
- a path to a proposals file (below), e.g. written by an RPN; per image the top
  ``num_proposals`` by score (stable order among equal scores).

Every source keeps at most ``num_proposals`` boxes per image.

Proposals file format (safetensors; :func:`save_proposals` / :func:`load_proposals`):
``image_ids (M,) int64``, ``counts (M,) int64``, ``boxes (sum counts, 4) float32``
xyxy pixels, ``scores (sum counts,) float32``, the images' boxes back to back in
``image_ids`` order; metadata ``{"format": "ovdistill-proposals", "version": "1"}``
plus anything the writer adds (e.g. the RPN's config).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from distill.config import CacheConfig, ConfigError

FORMAT = "ovdistill-proposals"
VERSION = "1"
BUILTIN = ("gt", "jitter")

Proposals = dict[int, tuple[np.ndarray, np.ndarray]]  # image id -> (boxes (N, 4), scores (N,))


class ProposalsError(ValueError):
    """A proposals file cannot be used; the message is one line naming the file."""


def _f4(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


# --------------------------------------------------------------------------- file format


def save_proposals(path: str | os.PathLike, proposals: Mapping[int, Any],
                   metadata: Mapping[str, str] | None = None) -> None:
    """Write ``{image id: (boxes (N, 4) xyxy, scores (N,))}`` (numpy or torch; a dict
    with ``boxes``/``scores`` keys also works) atomically, image ids in the mapping's order."""
    path = Path(path)
    ids, counts, boxes, scores = [], [], [], []
    for image_id, value in proposals.items():
        b, s = (value["boxes"], value["scores"]) if isinstance(value, Mapping) else value
        b, s = _f4(b).reshape(-1, 4), _f4(s).reshape(-1)
        if len(b) != len(s):
            raise ProposalsError(f"{path}: image {image_id} has {len(b)} boxes but {len(s)} scores")
        ids.append(int(image_id))
        counts.append(len(b))
        boxes.append(b)
        scores.append(s)
    tensors = {
        "image_ids": np.asarray(ids, dtype=np.int64),
        "counts": np.asarray(counts, dtype=np.int64),
        "boxes": np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32),
        "scores": np.concatenate(scores) if scores else np.zeros(0, np.float32),
    }
    meta = {str(k): str(v) for k, v in (metadata or {}).items()} | {"format": FORMAT, "version": VERSION}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_proposals(path: str | os.PathLike) -> Proposals:
    """Read a proposals file: ``{image id: (boxes (N, 4) float32 xyxy, scores (N,) float32)}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"proposals file not found: {path}")
    try:
        t = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ProposalsError(f"{path}: not a proposals file ({' '.join(str(e).split())[:150]})") from None
    need = {"image_ids": 1, "counts": 1, "boxes": 2, "scores": 1}
    bad = [k for k, nd in need.items() if k not in t or t[k].ndim != nd]
    if bad:
        raise ProposalsError(f"{path}: not a proposals file (missing or malformed {', '.join(bad)})")
    ids, counts, boxes, scores = t["image_ids"], t["counts"], t["boxes"], t["scores"]
    if (len(ids) != len(counts) or boxes.shape[1:] != (4,) or len(boxes) != len(scores)
            or counts.sum() != len(boxes) or (counts < 0).any()):
        raise ProposalsError(f"{path}: inconsistent sizes (image_ids {ids.shape}, counts sum "
                             f"{int(counts.sum())}, boxes {boxes.shape}, scores {scores.shape})")
    if len(np.unique(ids)) != len(ids):
        raise ProposalsError(f"{path}: image ids repeat")
    if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
        raise ProposalsError(f"{path}: boxes or scores hold non-finite values")
    starts = np.concatenate([[0], np.cumsum(counts)])
    return {int(i): (boxes[starts[k]:starts[k + 1]].astype(np.float32),
                     scores[starts[k]:starts[k + 1]].astype(np.float32))
            for k, i in enumerate(ids.tolist())}


def tensors_sha256(path: str | os.PathLike) -> str:
    """sha256 over a safetensors file's tensors (names and bytes in name order): the file's
    own bytes are not stable, its header lists the metadata in a different order each write."""
    from safetensors.numpy import load_file

    digest = hashlib.sha256()
    for name, array in sorted(load_file(str(path)).items()):
        digest.update(name.encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- sources


def box_iou_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise IoU of (N, 4) and (N, 4) xyxy -> (N,)."""
    lt, rb = np.maximum(a[:, :2], b[:, :2]), np.minimum(a[:, 2:], b[:, 2:])
    inter = np.clip(rb - lt, 0, None).prod(1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1e-9)


def jitter_boxes(gt: np.ndarray, image_id: int, height: int, width: int, num: int,
                 jitter: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """gt (G, 4) xyxy -> boxes (<= num, 4), scores: the GT boxes then jittered copies
    (see the module docstring). Copies that clip to under 1 px are dropped."""
    gt = _f4(gt).reshape(-1, 4)[:num]
    n_copies = num - len(gt) if len(gt) else 0
    rng = np.random.default_rng([seed, int(image_id)])
    u = rng.uniform(-jitter, jitter, size=(n_copies, 4)).astype(np.float64)
    src = gt[np.arange(n_copies) % max(len(gt), 1)].astype(np.float64)
    size = src[:, 2:] - src[:, :2]
    centre = (src[:, :2] + src[:, 2:]) / 2 + u[:, :2] * size
    half = size * (1 + u[:, 2:]) / 2
    boxes = np.concatenate([centre - half, centre + half], axis=1)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    ok = ((boxes[:, 2:] - boxes[:, :2]) >= 1).all(1)
    boxes, src = boxes[ok], src[ok]
    scores = box_iou_pairs(boxes, src)
    return (np.concatenate([gt, boxes.astype(np.float32)]),
            np.concatenate([np.ones(len(gt), np.float32), scores.astype(np.float32)]))


def top_k(boxes: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` highest-scoring boxes, score-descending (stable among ties)."""
    order = np.argsort(-scores, kind="stable")[:k]
    return boxes[order], scores[order]


class ProposalSource:
    """``cache.proposals`` as a function ``(image_id, gt boxes (G, 4), height, width) ->
    (boxes (N, 4) float32 xyxy, scores (N,) float32)``; ``description`` names it
    (for the cache fingerprint: the method and its parameters, or the file's tensors'
    sha256)."""

    def __init__(self, cfg: CacheConfig, seed: int = 0) -> None:
        if cfg.num_proposals < 1:
            raise ConfigError(f"cache.num_proposals must be >= 1, got {cfg.num_proposals}")
        self.kind, self.num, self.jitter, self.seed = cfg.proposals, cfg.num_proposals, cfg.jitter, seed
        self.file: Proposals | None = None
        if self.kind == "gt":
            self.description = "gt"
        elif self.kind == "jitter":
            if not 0 <= cfg.jitter < 1:
                raise ConfigError(f"cache.jitter must be in [0, 1), got {cfg.jitter}")
            self.description = f"jitter(j={cfg.jitter:g},seed={seed})"
        else:
            path = Path(cfg.proposals)
            if not path.is_file():
                raise ConfigError(f"cache.proposals must be {' | '.join(BUILTIN)} or a proposals "
                                  f"file; file not found: {path}")
            self.file = load_proposals(path)
            self.description = f"file(tensors_sha256={tensors_sha256(path)[:16]})"
            self.path = path

    @property
    def fingerprint(self) -> str:
        """The source description plus the per-image limit."""
        return f"proposals={self.description},n={self.num}"

    def check_covers(self, image_ids: list[int]) -> None:
        """A proposals file must hold every image to extract."""
        if self.file is not None:
            missing = [i for i in image_ids if i not in self.file]
            if missing:
                raise ProposalsError(f"{self.path}: no proposals for {len(missing)} of "
                                     f"{len(image_ids)} images (e.g. image {missing[0]})")

    def __call__(self, image_id: int, gt: Any, height: int, width: int
                 ) -> tuple[np.ndarray, np.ndarray]:
        gt = _f4(gt).reshape(-1, 4)
        if self.kind == "gt":
            return gt[:self.num], np.ones(min(len(gt), self.num), np.float32)
        if self.kind == "jitter":
            return jitter_boxes(gt, image_id, height, width, self.num, self.jitter, self.seed)
        boxes, scores = self.file[int(image_id)]
        return top_k(boxes, scores, self.num)


def store_fingerprint(teacher_fingerprint: str, source: ProposalSource, store_dense: bool) -> str:
    """The cache key of an extraction: teacher + proposal source + limit (+ dense maps)."""
    return f"{teacher_fingerprint}|{source.fingerprint}" + ("|dense" if store_dense else "")
