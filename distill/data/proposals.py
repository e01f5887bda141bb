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
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

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


class ProposalsFile(Mapping):
    """A proposals file read lazily: ``{image id: (boxes (N, 4) float32 xyxy, scores (N,)
    float32)}`` as a read-only mapping that holds only the ids and counts in memory and
    reads each image's rows from the file when asked (safetensors slices of the memory-mapped
    file): extraction on OV-COCO's 2.2 GB file keeps the memory of one image's boxes. The
    header, ids and counts are checked at open; each image's values when read."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"proposals file not found: {self.path}")
        try:
            with safe_open(str(self.path), "np") as f:
                names = set(f.keys())
                need = {"image_ids": 1, "counts": 1, "boxes": 2, "scores": 1}
                shapes = {k: f.get_slice(k).get_shape() for k in need if k in names}
                bad = [k for k, nd in need.items() if k not in shapes or len(shapes[k]) != nd]
                if bad:
                    raise ProposalsError(f"{self.path}: not a proposals file (missing or "
                                         f"malformed {', '.join(bad)})")
                ids, counts = f.get_tensor("image_ids"), f.get_tensor("counts")
        except (SafetensorError, OSError, ValueError) as e:
            if isinstance(e, ProposalsError):
                raise
            raise ProposalsError(f"{self.path}: not a proposals file "
                                 f"({' '.join(str(e).split())[:150]})") from None
        n_boxes, n_scores = shapes["boxes"][0], shapes["scores"][0]
        if (len(ids) != len(counts) or tuple(shapes["boxes"][1:]) != (4,)
                or n_boxes != n_scores or counts.sum() != n_boxes or (counts < 0).any()):
            raise ProposalsError(f"{self.path}: inconsistent sizes (image_ids {ids.shape}, "
                                 f"counts sum {int(counts.sum())}, boxes {tuple(shapes['boxes'])}, "
                                 f"scores {tuple(shapes['scores'])})")
        if len(np.unique(ids)) != len(ids):
            raise ProposalsError(f"{self.path}: image ids repeat")
        starts = (np.cumsum(counts) - counts).astype(np.int64)
        self._rows = dict(zip(ids.tolist(), zip(starts.tolist(), counts.tolist(),
                                                strict=True), strict=True))
        self._file = None

    def __getstate__(self) -> dict:  # a loader worker opens its own view of the file
        return {**self.__dict__, "_file": None}

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self):
        return iter(self._rows)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._rows

    def __getitem__(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        start, count = self._rows[int(image_id)]
        if self._file is None:
            self._file = safe_open(str(self.path), "np")
        if count == 0:  # an empty slice is refused by safetensors
            return np.zeros((0, 4), np.float32), np.zeros(0, np.float32)
        boxes = self._file.get_slice("boxes")[start:start + count].astype(np.float32)
        scores = self._file.get_slice("scores")[start:start + count].astype(np.float32)
        if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
            raise ProposalsError(f"{self.path}: boxes or scores of image {image_id} hold "
                                 f"non-finite values")
        return boxes, scores


def load_proposals(path: str | os.PathLike) -> ProposalsFile:
    """Open a proposals file (:class:`ProposalsFile`: lazily, checked as it is read)."""
    return ProposalsFile(path)


def tensors_sha256(path: str | os.PathLike, rows: int = 1 << 20) -> str:
    """sha256 over a safetensors file's tensors (names and bytes in name order): the file's
    own bytes are not stable, its header lists the metadata in a different order each write.
    Read ``rows`` rows at a time: memory stays flat whatever the file's size."""
    digest = hashlib.sha256()
    with safe_open(str(path), "np") as f:
        for name in sorted(f.keys()):
            digest.update(name.encode())
            part = f.get_slice(name)
            n = part.get_shape()[0] if part.get_shape() else 0
            if not part.get_shape():  # a scalar tensor
                digest.update(f.get_tensor(name).tobytes())
            for start in range(0, n, rows):
                digest.update(np.ascontiguousarray(part[start:min(start + rows, n)]).tobytes())
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
        self.file: ProposalsFile | None = None
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
