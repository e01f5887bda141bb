"""Writes a deterministic synthetic store (the kill/resume test runs it in a subprocess).

    python -m tests.cache_writer STORE [--num 50] [--shard-size 8] [--sleep 0.02] ...
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from distill.cache import EmbeddingCache

FINGERPRINT = "teacher:tiny|weights:0123abcd|templates:openai|crop:1.0+1.5|proposals:gt"
DATASET = "shapes:train:seed0"


def synthetic_plan(num: int, seed: int = 0) -> list[int]:
    """``num`` distinct, non-contiguous image ids in a seeded order."""
    ids = 1000 + 7 * np.arange(num)
    return np.random.default_rng(seed).permutation(ids).tolist()


def synthetic_record(image_id: int, dim: int, seed: int = 0) -> dict[str, np.ndarray | None]:
    """boxes (N, 4), scores (N,), embeddings (N, D) L2-normalised, dense (D, h, w) or None;
    N = 0 for every fifth id, a dense map for every third."""
    rng = np.random.default_rng([seed, image_id])
    n = 0 if image_id % 5 == 0 else int(rng.integers(1, 7))
    xy = rng.uniform(0, 100, (n, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + rng.uniform(1, 50, (n, 2)).astype(np.float32)], axis=1)
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    dense = None
    if image_id % 3 == 0:
        dense = rng.standard_normal((dim, int(rng.integers(2, 6)), int(rng.integers(2, 6))))
    return {"boxes": boxes, "scores": rng.uniform(0, 1, n).astype(np.float32),
            "embeddings": emb, "dense": dense}


def write(store: str | Path, num: int = 50, shard_size: int = 8, dim: int = 32,
          dtype: str = "float16", sleep: float = 0.0, rank: int = 0, world_size: int = 1,
          seed: int = 0, fingerprint: str = FINGERPRINT, dataset_id: str = DATASET) -> None:
    plan = synthetic_plan(num, seed)
    with EmbeddingCache.create_or_open(store, plan, fingerprint=fingerprint, dataset_id=dataset_id,
                                       dim=dim, dtype=dtype, shard_size=shard_size, rank=rank,
                                       world_size=world_size) as writer:
        for image_id in writer.missing():
            time.sleep(sleep)  # stands in for the teacher's forward pass
            writer.add(image_id, **synthetic_record(image_id, dim, seed))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("store")
    p.add_argument("--num", type=int, default=50)
    p.add_argument("--shard-size", type=int, default=8)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    write(a.store, a.num, a.shard_size, a.dim, a.dtype, a.sleep, a.rank, a.world_size, a.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
