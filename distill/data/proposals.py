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
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from distill.config import CacheConfig, ConfigError

FORMAT = "ovdistill-proposals"
VERSION = "1"
BUILTIN = ("gt", "jitter")


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


_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "I32": np.int32,
           "I64": np.int64}
_NEED = {"image_ids": 1, "counts": 1, "boxes": 2, "scores": 1}  # name -> number of dimensions


def _header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (name -> {dtype, shape, data_offsets}) and where its data
    starts; read with plain file reads, so no byte of the data is mapped into memory."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= 100 * 2**20 or n + 8 > path.stat().st_size:
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ProposalsError(f"{path}: not a proposals file (not safetensors: "
                             f"{' '.join(str(e).split())[:120]})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


class ProposalsFile(Mapping):
    """A proposals file read lazily: ``{image id: (boxes (N, 4) float32 xyxy, scores (N,)
    float32)}`` as a read-only mapping that holds the ids and counts (three int64 arrays) and
    reads each image's rows from the file when asked (``os.pread`` at the tensor's offset:
    nothing else of the file enters the process). Extraction on OV-COCO's 2.2 GB file keeps
    the memory of one image's boxes. The header, ids and counts are checked at open; each
    image's values when read."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"proposals file not found: {self.path}")
        header, self._data = _header(self.path)
        bad = [k for k, nd in _NEED.items() if k not in header
               or len(header[k].get("shape", ())) != nd or header[k].get("dtype") not in _DTYPES]
        if bad:
            raise ProposalsError(f"{self.path}: not a proposals file (missing or malformed "
                                 f"{', '.join(bad)})")
        self._tensors = {k: (_DTYPES[header[k]["dtype"]], tuple(header[k]["shape"]),
                             int(header[k]["data_offsets"][0])) for k in _NEED}
        self._fd: int | None = None
        ids, counts = self._read("image_ids", 0, -1), self._read("counts", 0, -1)
        shape_b, shape_s = self._tensors["boxes"][1], self._tensors["scores"][1]
        if (len(ids) != len(counts) or shape_b[1:] != (4,) or shape_b[0] != shape_s[0]
                or counts.sum() != shape_b[0] or (counts < 0).any()):
            raise ProposalsError(f"{self.path}: inconsistent sizes (image_ids {ids.shape}, "
                                 f"counts sum {int(counts.sum())}, boxes {shape_b}, "
                                 f"scores {shape_s})")
        if len(np.unique(ids)) != len(ids):
            raise ProposalsError(f"{self.path}: image ids repeat")
        self._ids, self._counts = ids.astype(np.int64), counts.astype(np.int64)
        self._starts = np.cumsum(self._counts) - self._counts
        self._order = np.argsort(self._ids, kind="stable")
        self._sorted = self._ids[self._order]

    def _read(self, name: str, start: int, count: int) -> np.ndarray:
        """Rows ``start .. start + count`` (all rows for count -1) of tensor ``name``."""
        dtype, shape, offset = self._tensors[name]
        row = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
        count = shape[0] - start if count < 0 else count
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        data = os.pread(self._fd, count * row, self._data + offset + start * row)
        if len(data) != count * row:
            raise ProposalsError(f"{self.path}: truncated ({name} rows {start}..{start + count})")
        return np.frombuffer(data, dtype=dtype).reshape(count, *shape[1:])

    def __getstate__(self) -> dict:  # a loader worker opens its own descriptor
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def _position(self, image_id: object) -> int | None:
        try:
            key = int(image_id)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            return None
        k = int(np.searchsorted(self._sorted, key))
        return int(self._order[k]) if k < len(self._sorted) and self._sorted[k] == key else None

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self):
        return (int(i) for i in self._ids)

    def __contains__(self, image_id: object) -> bool:
        return self._position(image_id) is not None

    def __getitem__(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        k = self._position(image_id)
        if k is None:
            raise KeyError(image_id)
        start, count = int(self._starts[k]), int(self._counts[k])
        boxes = self._read("boxes", start, count).astype(np.float32)
        scores = self._read("scores", start, count).astype(np.float32)
        if not (np.isfinite(boxes).all() and np.isfinite(scores).all()):
            raise ProposalsError(f"{self.path}: boxes or scores of image {image_id} hold "
                                 f"non-finite values")
        return boxes, scores


def load_proposals(path: str | os.PathLike) -> ProposalsFile:
    """Open a proposals file (:class:`ProposalsFile`: lazily, checked as it is read)."""
    return ProposalsFile(path)


def tensors_sha256(path: str | os.PathLike, chunk: int = 16 * 2**20) -> str:
    """sha256 over a safetensors file's tensors (names and bytes in name order): the file's
    own bytes are not stable, its header lists the metadata in a different order each write.
    Streams each tensor's bytes from the file ``chunk`` bytes at a time (plain reads, no
    mapping): memory stays flat whatever the file's size."""
    path = Path(path)
    header, data = _header(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for name in sorted(header):
            begin, end = (int(v) for v in header[name]["data_offsets"])
            digest.update(name.encode())
            f.seek(data + begin)
            left = end - begin
            while left > 0:
                block = f.read(min(chunk, left))
                if not block:
                    raise ProposalsError(f"{path}: truncated in tensor {name}")
                digest.update(block)
                left -= len(block)
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
