"""The teacher-embedding cache: region (and optional dense) embeddings stored offline.

Written once by the extraction tool, read every epoch by training. One record per
image id: ``boxes (N, 4)`` xyxy float32, proposal ``scores (N,)`` float32, teacher
``embeddings (N, D)`` and optionally a dense map ``(D, h, w)``; N may be 0.

Layout of a store directory::

    meta.json          fingerprint, dataset id, D, dtype, shard size, plan size + hash
    shard-00000.bin    the records of plan[0:S], in plan order (raw little-endian arrays)
    shard-00001.bin    the records of plan[S:2S] ...
    index-rank0.json   the shards rank 0 wrote (k % world_size == 0): file, bytes, sha256,
    index-rank1.json   image ids, region counts and array offsets; readers merge all parts

A shard file holds, each section starting 64-byte aligned, for its R regions:
``embeddings (R, D)`` float16 or int8, [int8: per-row ``scales (R,)`` float32],
``boxes (R, 4)`` float32, ``scores (R,)`` float32, then each record's dense map
``(D, h, w)`` [int8: per-pixel ``scales (h, w)`` float32]. int8 is symmetric:
``scale = max|x| / 127`` per vector, ``x ~= q * scale``.

Determinism and crash safety: the writer is given the ordered list of every image
id to extract (the plan); shard k always holds ``plan[k*S:(k+1)*S]``; files carry no
timestamps; every file is written to a temporary name, fsynced and renamed, and a
rank's index part is rewritten only after a shard is complete. A run killed at any
moment loses at most its in-progress shards, and rerunning the same command ends
with the same bytes an uninterrupted run writes (given a deterministic teacher).
A shard whose size or sha256 disagrees with the index is never read (size checked
on open, hash on first access) and is rewritten by the next extraction run.

    with EmbeddingCache.create_or_open(path, plan, fingerprint=fp, dataset_id=ds,
                                       dim=512) as writer:
        for image_id in writer.missing():
            writer.add(image_id, boxes, scores, embeddings)
    cache = EmbeddingCache.open(path, fingerprint=fp, dataset_id=ds)
    rec = cache.get(image_id)   # dict(boxes, scores, embeddings (N, D) float32, dense)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from distill.data.coco import dataset_id

FORMAT = 1
ALIGN = 64  # section alignment inside a shard file, bytes
META = "meta.json"
DTYPES = {"float16": np.dtype("<f2"), "int8": np.dtype("i1")}
_F4 = np.dtype("<f4")
_HINT = "use another cache.name or delete it"


class CacheError(ValueError):
    """The store cannot be used as asked; the message is one line and names the path."""


# --------------------------------------------------------------------------- helpers


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.bin"


def index_name(rank: int) -> str:
    return f"index-rank{rank}.json"


def bytes_per_region(dim: int, dtype: str) -> int:
    """Stored bytes per region: embedding (+ int8 scale) + box (16) + score (4)."""
    return dim * DTYPES[dtype].itemsize + (4 if dtype == "int8" else 0) + 16 + 4


def _tmp_path(path: Path, tag: str = "") -> Path:
    return path.with_name(f".{path.name}{tag}.tmp")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, chunks: Iterable[Any], tag: str = "") -> str:
    """Write buffers to ``path`` via tmp + fsync + rename; returns the sha256 hex. A failed
    write (disk full, read-only directory) raises :class:`CacheError`, leaving ``path`` as
    it was."""
    tmp, sha = _tmp_path(path, tag), hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                sha.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CacheError(f"cannot write {path}: {e.strerror or e}; the shards stored before are "
                         f"intact: rerun the same command to finish") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return sha.hexdigest()


def _dump_json(obj: Any, indent: int | None = None) -> bytes:
    sep = (",", ": ") if indent else (",", ":")
    return (json.dumps(obj, sort_keys=True, indent=indent, separators=sep) + "\n").encode()


def _sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    return sha.hexdigest()


def _plan_sha(plan: Sequence[int]) -> str:
    return hashlib.sha256(",".join(map(str, plan)).encode()).hexdigest()


def _short(a: Any, b: Any) -> tuple[str, str]:
    """Prefixes of two values long enough to tell them apart (full when short)."""
    a, b = str(a), str(b)
    if max(len(a), len(b)) <= 24:
        return a, b
    n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    n = max(12, n + 4)
    return (a[:n] + ".." if len(a) > n else a), (b[:n] + ".." if len(b) > n else b)


def _quantize(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 along ``axis``: returns ``q`` (x's shape) and ``scale`` (axis removed)."""
    scale = (np.abs(x).max(axis=axis) / 127.0).astype(_F4)
    safe = np.expand_dims(np.where(scale > 0, scale, 1.0).astype(_F4), axis)
    q = np.clip(np.rint(x / safe), -127, 127).astype(DTYPES["int8"])
    return q, scale


def _as_f4(x: Any, name: str, image_id: int) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    x = np.ascontiguousarray(x, dtype=_F4)
    if not np.isfinite(x).all():
        raise CacheError(f"image {image_id}: {name} holds non-finite values")
    return x


def _view(buf: np.ndarray, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    nbytes = int(np.prod(shape)) * dtype.itemsize
    return buf[offset:offset + nbytes].view(dtype).reshape(shape)


def _read_meta(path: Path) -> dict:
    file = path / META
    if not file.is_file():
        raise CacheError(f"no cache at {path} ({META} missing); run the extraction tool first")
    meta = json.loads(file.read_text())
    if meta.get("format") != FORMAT:
        raise CacheError(f"cache {path} has format {meta.get('format')}, this code reads {FORMAT}; {_HINT}")
    return meta


def _check(path: Path, meta: dict, key: str, what: str, ours: Any) -> None:
    if ours is not None and meta[key] != ours:
        stored, mine = _short(meta[key], ours)
        raise CacheError(f"cache {path} was written by {what} {stored}, this run's is {mine}; {_HINT}")


def _check_identity(path: Path, meta: dict, fingerprint: str | None, dataset_id: str | None) -> None:
    _check(path, meta, "fingerprint", "teacher fingerprint", fingerprint)
    _check(path, meta, "dataset_id", "dataset", dataset_id)


def _index_parts(path: Path) -> dict[int, list[dict]]:
    """Shard entries of every rank's index part: ``{k: [entry, ...]}``."""
    entries: dict[int, list[dict]] = {}
    for file in sorted(path.glob("index-rank*.json")):
        for entry in json.loads(file.read_text())["shards"]:
            if entry not in entries.setdefault(entry["shard"], []):
                entries[entry["shard"]].append(entry)
    return entries


# --------------------------------------------------------------------------- reading


class EmbeddingCache:
    """Memory-mapped reader of a store; see the module docstring.

    ``len``, ``ids()`` and ``in`` cover the stored (complete, indexed) shards. At open every
    shard's size is checked against the index; with ``verify`` each shard's sha256 is also
    checked on first access in this object (call :meth:`verify` once in the main process
    before DataLoader workers start to hash each shard once). Training opens without it
    (:func:`open_cache`: OV-COCO's cache is about 34 GB, hashed by every rank at every start);
    ``python -m tools.extract --verify`` hashes a store on request.
    """

    def __init__(self, path: str | os.PathLike, fingerprint: str | None = None,
                 dataset_id: str | None = None, verify: bool = True) -> None:
        self.path = Path(path)
        self._check_hashes = verify
        self.meta = meta = _read_meta(self.path)
        _check_identity(self.path, meta, fingerprint, dataset_id)
        self.dim: int = meta["dim"]
        self.dtype: str = meta["dtype"]
        self.fingerprint: str = meta["fingerprint"]
        self.dataset_id: str = meta["dataset_id"]
        self.num_planned: int = meta["num_images"]
        self._shards: list[dict] = []
        for k, candidates in sorted(_index_parts(self.path).items()):
            if k < meta["num_shards"]:
                self._shards.append(self._resolve(candidates))
        self._where: dict[int, tuple[int, int, int]] = {}  # id -> (shard pos, record, row)
        for s, entry in enumerate(self._shards):
            file = self.path / entry["file"]
            size = file.stat().st_size if file.is_file() else -1
            if size != entry["bytes"]:
                state = "missing" if size < 0 else f"truncated ({size} of {entry['bytes']} bytes)"
                raise CacheError(f"cache shard {file} is {state}; rerun extraction with the same command to rewrite it")
            rows = np.concatenate([[0], np.cumsum(entry["regions"])]).tolist()
            for i, image_id in enumerate(entry["ids"]):
                self._where[image_id] = (s, i, rows[i])
        self._verified: set[int] = set()
        self._maps: dict[int, np.ndarray] = {}

    def _resolve(self, candidates: list[dict]) -> dict:
        """Entries of one shard from several index parts (a resume with another world
        size): the one whose hash matches the file; otherwise the first (fails on read)."""
        if len(candidates) > 1:
            file = self.path / candidates[0]["file"]
            sha = _sha256_file(file) if file.is_file() else None
            for entry in candidates:
                if entry["sha256"] == sha:
                    return entry
        return candidates[0]

    @classmethod
    def open(cls, path: str | os.PathLike, fingerprint: str | None = None,
             dataset_id: str | None = None, verify: bool = True) -> EmbeddingCache:
        """Open for reading; a given fingerprint / dataset id must match the store's."""
        return cls(path, fingerprint, dataset_id, verify)

    @staticmethod
    def create_or_open(path: str | os.PathLike, plan: Sequence[int], *, fingerprint: str,
                       dataset_id: str, dim: int, dtype: str = "float16", shard_size: int = 256,
                       rank: int = 0, world_size: int = 1) -> CacheWriter:
        """Writer for ``plan`` (every image id to extract, in order); resumes a store."""
        return CacheWriter(path, plan, fingerprint=fingerprint, dataset_id=dataset_id, dim=dim,
                           dtype=dtype, shard_size=shard_size, rank=rank, world_size=world_size)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._where

    def ids(self) -> list[int]:
        """Stored image ids, in plan order."""
        return [i for entry in self._shards for i in entry["ids"]]

    @property
    def complete(self) -> bool:
        """Every planned image is stored."""
        return len(self._where) == self.num_planned

    @property
    def bytes_per_region(self) -> int:
        return bytes_per_region(self.dim, self.dtype)

    def shard_files(self) -> list[Path]:
        return [self.path / entry["file"] for entry in self._shards]

    def verify(self) -> None:
        """Hash every stored shard now; raises :class:`CacheError` naming a corrupt one."""
        for s in range(len(self._shards)):
            self._hash(s)

    def _buffer(self, s: int) -> np.ndarray:
        buf = self._maps.get(s)
        if buf is None:
            entry = self._shards[s]
            file = self.path / entry["file"]
            if self._check_hashes:
                self._hash(s)
            buf = np.memmap(file, dtype=np.uint8, mode="r") if entry["bytes"] else np.zeros(0, np.uint8)
            self._maps[s] = buf
        return buf

    def _hash(self, s: int) -> None:
        """Check shard ``s``'s sha256 against the index (once per object)."""
        if s in self._verified:
            return
        entry = self._shards[s]
        file = self.path / entry["file"]
        sha = _sha256_file(file)
        if sha != entry["sha256"]:
            raise CacheError(f"cache shard {file} is corrupt (sha256 {sha[:12]}.., index says "
                             f"{entry['sha256'][:12]}..); rerun extraction with the same command "
                             f"to rewrite it")
        self._verified.add(s)

    def get(self, image_id: int) -> dict[str, np.ndarray | None]:
        """One image's record (fresh float32 arrays).

        Returns ``boxes (N, 4)`` xyxy, ``scores (N,)``, ``embeddings (N, D)`` (dequantised)
        and ``dense (D, h, w)`` or None.
        """
        where = self._where.get(image_id)
        if where is None:
            raise KeyError(f"image {image_id} is not in cache {self.path} ({len(self)} of "
                           f"{self.num_planned} planned images stored); rerun extraction")
        s, i, row = where
        entry, buf, D = self._shards[s], self._buffer(s), self.dim
        n, off, dt = entry["regions"][i], entry["offsets"], DTYPES[self.dtype]
        emb = _view(buf, off["embeddings"] + row * D * dt.itemsize, dt, (n, D)).astype(np.float32)
        if self.dtype == "int8":
            emb *= _view(buf, off["scales"] + row * 4, _F4, (n, 1))
        dense = None
        if entry.get("dense") and entry["dense"][i] is not None:
            d_off, h, w, s_off = entry["dense"][i]
            dense = _view(buf, d_off, dt, (D, h, w)).astype(np.float32)
            if s_off is not None:
                dense *= _view(buf, s_off, _F4, (1, h, w))
        return {
            "boxes": np.array(_view(buf, off["boxes"] + row * 16, _F4, (n, 4))),
            "scores": np.array(_view(buf, off["scores"] + row * 4, _F4, (n,))),
            "embeddings": emb,
            "dense": dense,
        }

    def __iter__(self) -> Iterator[int]:
        return iter(self.ids())

    def __getstate__(self) -> dict:  # memory maps are reopened in the receiving process
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    def __repr__(self) -> str:
        return (f"EmbeddingCache({str(self.path)!r}, {len(self)}/{self.num_planned} images, "
                f"D={self.dim}, {self.dtype})")


# --------------------------------------------------------------------------- writing


def open_cache(cfg, teacher_fingerprint: str, instances: Path) -> EmbeddingCache:
    """The complete cache ``cfg.cache.root/cfg.cache.name`` of ``instances``' images, written
    by the teacher of ``teacher_fingerprint``, for training a student. Checked cheaply (the
    meta and index files, the fingerprint, every shard's size); the shards' hashes are for
    ``python -m tools.extract --verify``."""
    path = Path(cfg.cache.root) / cfg.cache.name
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"no embedding cache at {path}: run tools/extract.py with this "
                                "config first (cache.store_dense=true for segmenters)")
    cache = EmbeddingCache.open(path, dataset_id=dataset_id(instances), verify=False)
    if not cache.fingerprint.startswith(teacher_fingerprint):
        raise ValueError(f"cache {path} was written by another teacher ({cache.fingerprint[:16]}"
                         f"...), this config's teacher is {teacher_fingerprint}")
    if not cache.complete:
        raise ValueError(f"cache {path} is incomplete: rerun tools/extract.py to finish it")
    return cache


class CacheWriter:
    """Writes this rank's shards (k % world_size == rank) of a plan; see the module docstring.

    On creation it checks the store's identity, drops its own stale temporary files
    and index entries whose shard is missing, truncated or corrupt, and keeps the rest.
    Records are buffered per shard and a shard is written (then the index part) as
    soon as all its images were added, in any order.
    """

    def __init__(self, path: str | os.PathLike, plan: Sequence[int], *, fingerprint: str,
                 dataset_id: str, dim: int, dtype: str = "float16", shard_size: int = 256,
                 rank: int = 0, world_size: int = 1) -> None:
        self.path = Path(path)
        self.plan = [int(i) for i in plan]
        self._pos = {image_id: p for p, image_id in enumerate(self.plan)}
        if len(self._pos) != len(self.plan):
            raise CacheError(f"cache {self.path}: the plan repeats image ids")
        if dtype not in DTYPES:
            raise CacheError(f"cache {self.path}: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if dim <= 0 or shard_size <= 0 or not 0 <= rank < world_size:
            raise CacheError(f"cache {self.path}: bad dim={dim}, shard_size={shard_size}, "
                             f"rank={rank} or world_size={world_size}")
        self.dim, self.dtype, self.shard_size = dim, dtype, shard_size
        self.rank, self.world_size = rank, world_size
        self.num_shards = -(-len(self.plan) // shard_size)
        meta = {"format": FORMAT, "fingerprint": fingerprint, "dataset_id": dataset_id, "dim": dim,
                "dtype": dtype, "shard_size": shard_size, "num_images": len(self.plan),
                "num_shards": self.num_shards, "plan_sha256": _plan_sha(self.plan)}
        self.path.mkdir(parents=True, exist_ok=True)
        self._own = [k for k in range(self.num_shards) if k % world_size == rank]
        self._clean_tmp()
        if (self.path / META).is_file():
            self._check_meta(_read_meta(self.path), meta)
        else:  # ranks may race here: identical content, rank-specific temporary names
            _atomic_write(self.path / META, [_dump_json(meta, indent=1)], tag=f".rank{rank}")
        self._done: dict[int, dict] = {}  # shard k -> index entry
        found = _index_parts(self.path)
        for k in self._own:
            for entry in found.get(k, []):
                if self._intact(k, entry):
                    self._done[k] = entry
                    break
        index = self.path / index_name(rank)
        if not index.is_file() or index.read_bytes() != self._index_bytes():
            self._write_index()
        self._pending: dict[int, dict[int, tuple]] = {}  # shard k -> {image id: record}

    def _check_meta(self, stored: dict, ours: dict) -> None:
        _check_identity(self.path, stored, ours["fingerprint"], ours["dataset_id"])
        for key in ("dim", "dtype", "shard_size"):
            _check(self.path, stored, key, key, ours[key])
        if stored["plan_sha256"] != ours["plan_sha256"]:
            raise CacheError(f"cache {self.path} was written for another image list ({stored['num_images']} "
                             f"images), this run's has {ours['num_images']}; {_HINT}")

    def _clean_tmp(self) -> None:
        mine = {_tmp_path(self.path / shard_name(k)).name for k in self._own}
        mine |= {_tmp_path(self.path / index_name(self.rank)).name,
                 _tmp_path(self.path / META, f".rank{self.rank}").name}
        for name in mine:
            (self.path / name).unlink(missing_ok=True)

    def _ids(self, k: int) -> list[int]:
        return self.plan[k * self.shard_size:(k + 1) * self.shard_size]

    def _intact(self, k: int, entry: dict) -> bool:
        file = self.path / shard_name(k)
        return (entry["file"] == file.name and entry["ids"] == self._ids(k) and file.is_file()
                and file.stat().st_size == entry["bytes"] and _sha256_file(file) == entry["sha256"])

    def _index_bytes(self) -> bytes:
        return _dump_json({"format": FORMAT, "rank": self.rank, "world_size": self.world_size,
                           "shards": [self._done[k] for k in sorted(self._done)]})

    def _write_index(self) -> None:
        _atomic_write(self.path / index_name(self.rank), [self._index_bytes()])

    @property
    def bytes_per_region(self) -> int:
        return bytes_per_region(self.dim, self.dtype)

    @property
    def complete(self) -> bool:
        """All of this rank's shards are stored."""
        return len(self._done) == len(self._own)

    def missing(self, image_ids: Iterable[int] | None = None) -> list[int]:
        """This rank's image ids neither stored nor added yet (plan order, or the order of
        ``image_ids`` when given; ids of other ranks' shards are left out)."""
        todo = [i for k in self._own if k not in self._done
                for i in self._ids(k) if i not in self._pending.get(k, ())]
        if image_ids is None:
            return todo
        todo_set = set(todo)
        out = []
        for image_id in image_ids:
            if image_id not in self._pos:
                raise CacheError(f"cache {self.path}: image {image_id} is not in the extraction plan")
            if image_id in todo_set:
                out.append(image_id)
        return out

    def add(self, image_id: int, boxes: Any, scores: Any, embeddings: Any, dense: Any = None) -> None:
        """Buffer one image; writes its shard once the shard's last image arrives.

        ``boxes (N, 4)`` xyxy, ``scores (N,)``, ``embeddings (N, D)``, ``dense (D, h, w)``
        or None; numpy arrays or torch tensors, N >= 0.
        """
        pos = self._pos.get(image_id)
        if pos is None:
            raise CacheError(f"cache {self.path}: image {image_id} is not in the extraction plan")
        k = pos // self.shard_size
        if k % self.world_size != self.rank:
            raise CacheError(f"cache {self.path}: image {image_id} is in shard {k}, which rank "
                             f"{k % self.world_size} writes, not rank {self.rank}")
        if k in self._done or image_id in self._pending.get(k, ()):
            raise CacheError(f"cache {self.path}: image {image_id} was already added")
        boxes, scores = _as_f4(boxes, "boxes", image_id), _as_f4(scores, "scores", image_id)
        emb = _as_f4(embeddings, "embeddings", image_id)
        n = len(emb)
        if emb.shape != (n, self.dim) or boxes.shape != (n, 4) or scores.shape != (n,):
            raise CacheError(f"image {image_id}: expected boxes (N, 4), scores (N,), embeddings "
                             f"(N, {self.dim}); got {boxes.shape}, {scores.shape}, {emb.shape}")
        emb, scale = _quantize(emb, axis=1) if self.dtype == "int8" else (emb.astype("<f2"), None)
        dense_scale = None
        if dense is not None:
            dense = _as_f4(dense, "dense", image_id)
            if dense.ndim != 3 or dense.shape[0] != self.dim:
                raise CacheError(f"image {image_id}: dense must be ({self.dim}, h, w), got {dense.shape}")
            if self.dtype == "int8":
                dense, dense_scale = _quantize(dense, axis=0)
            else:
                dense = dense.astype("<f2")
        self._pending.setdefault(k, {})[image_id] = (boxes, scores, emb, scale, dense, dense_scale)
        if len(self._pending[k]) == len(self._ids(k)):
            self._flush(k)

    def _flush(self, k: int) -> None:
        ids = self._ids(k)
        records = [self._pending[k][i] for i in ids]
        chunks: list[Any] = []
        pos = 0

        def section(arrays: list[np.ndarray | None]) -> int:
            """Append arrays back to back at the next aligned offset; returns that offset."""
            nonlocal pos
            pad = -pos % ALIGN
            if pad:
                chunks.append(bytes(pad))
                pos += pad
            start = pos
            for a in arrays:
                if a is not None and a.size:
                    chunks.append(np.ascontiguousarray(a).reshape(-1).view(np.uint8).data)
                    pos += a.nbytes
            return start

        offsets = {"embeddings": section([r[2] for r in records]),
                   "scales": section([r[3] for r in records]) if self.dtype == "int8" else None,
                   "boxes": section([r[0] for r in records]),
                   "scores": section([r[1] for r in records])}
        dense = []
        for r in records:
            if r[4] is None:
                dense.append(None)
                continue
            d_off = section([r[4]])
            s_off = section([r[5]]) if r[5] is not None else None
            dense.append([d_off, int(r[4].shape[1]), int(r[4].shape[2]), s_off])
        file = self.path / shard_name(k)
        sha = _atomic_write(file, chunks)
        entry = {"shard": k, "file": file.name, "bytes": pos, "sha256": sha, "ids": ids,
                 "regions": [len(r[0]) for r in records], "offsets": offsets}
        if any(d is not None for d in dense):
            entry["dense"] = dense
        self._done[k] = entry
        del self._pending[k]
        self._write_index()

    def close(self) -> None:
        """Check nothing is left half-added: a shard is only written whole."""
        if self._pending:
            parts = ", ".join(f"shard {k}: {len(v)} of {len(self._ids(k))} images"
                              for k, v in sorted(self._pending.items()))
            self._pending = {}
            raise CacheError(f"cache {self.path}: closed with incomplete shards ({parts}); "
                             "they were not written, rerun extraction to finish them")

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            self._pending = {}  # an error is propagating: drop half shards silently
