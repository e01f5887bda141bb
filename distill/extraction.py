"""Teacher region (and dense) embeddings of a dataset split into the cache.

Writes ``cache.root/cache.name`` (distill/cache.py) for every image of
``cache.split``: proposals per ``cache.proposals`` (distill/data/proposals.py), their
teacher embeddings (``teacher.region_mode``) and, with ``cache.store_dense``, the
dense map. Resumable: a rerun computes only the images not stored yet. Ends with
``extract_summary.json`` and ``extract_config.yaml`` in the store directory; with
``data.on_error=skip``, ``skipped.json`` lists the annotation records and images left
out (which are not in the store's image list). Under torchrun each rank embeds its
share.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from distill.cache import EmbeddingCache
from distill.config import ExperimentConfig, atomic_write, save_config
from distill.data.coco import CocoDetection, collate, dataset_id, dataset_paths
from distill.data.proposals import ProposalSource, store_fingerprint
from distill.engine import barrier, get_world_size, init_distributed
from distill.teacher import Teacher

IMAGES_PER_CALL = 8  # images per teacher.regions call (crops are batched by teacher.batch_size)


def _all_reduce(values: list[float], device: str) -> list[float]:
    """Sum over ranks (identity without a process group)."""
    if get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64,
                     device=device if device.startswith("cuda") else "cpu")
    torch.distributed.all_reduce(t)
    return t.tolist()


def extract(cfg: ExperimentConfig, workers: int = 0, progress: bool = True) -> dict:
    """Embed every not yet stored image of ``cfg.cache.split`` into the cache; returns the
    run's summary (also ``extract_summary.json`` in the store)."""
    rank, world_size = init_distributed(cfg.teacher.device)
    instances, image_dir = dataset_paths(cfg, cfg.cache.split)
    dataset = CocoDetection(instances, image_dir, on_error=cfg.data.on_error)
    source = ProposalSource(cfg.cache)
    source.check_covers(dataset.ids)
    teacher = Teacher.from_config(cfg.teacher)
    store = Path(cfg.cache.root) / cfg.cache.name
    fingerprint = store_fingerprint(teacher.fingerprint, source, cfg.cache.store_dense)
    writer = EmbeddingCache.create_or_open(
        store, dataset.ids, fingerprint=fingerprint, dataset_id=dataset_id(instances),
        dim=teacher.embed_dim, dtype=cfg.cache.dtype, shard_size=cfg.cache.shard_size,
        rank=rank, world_size=world_size)
    if dataset.skipped and rank == 0:
        atomic_write(store / "skipped.json", json.dumps(dataset.skipped, indent=1) + "\n")
        print(f"data.on_error=skip: left out {len(dataset.skipped)} records or images, listed "
              f"in {store / 'skipped.json'}")

    todo = [dataset.index(i) for i in writer.missing()]
    loader = DataLoader(Subset(dataset, todo), batch_size=IMAGES_PER_CALL, collate_fn=collate,
                        num_workers=workers)
    bar = tqdm(total=len(todo), desc=f"extract {cfg.cache.name}", unit="img",
               disable=not progress or rank != 0)
    start, images, regions = time.perf_counter(), 0, 0
    with writer:
        for batch in loader:
            props = [source(s["image_id"], s["boxes"], s["height"], s["width"]) for s in batch]
            boxes = [torch.from_numpy(b) for b, _ in props]
            embs = teacher.regions([s["image"] for s in batch], boxes)
            for s, (b, sc), e in zip(batch, props, embs, strict=True):
                dense = teacher.dense(s["image"]) if cfg.cache.store_dense else None
                writer.add(s["image_id"], b, sc, e, dense)
                regions += len(b)
            images += len(batch)
            bar.update(len(batch))
            bar.set_postfix(regions_s=f"{regions / max(time.perf_counter() - start, 1e-9):.1f}")
    bar.close()
    seconds = time.perf_counter() - start
    images, regions = (int(v) for v in _all_reduce([images, regions], cfg.teacher.device))
    barrier()

    stored = EmbeddingCache.open(store, fingerprint=fingerprint)
    summary = {
        "store": str(store), "split": cfg.cache.split, "images": images, "regions": regions,
        "bytes_per_region": writer.bytes_per_region, "seconds": round(seconds, 3),
        "regions_per_s": round(regions / seconds, 1) if seconds > 0 and regions else 0.0,
        "stored_images": len(stored), "planned_images": stored.num_planned,
        "complete": stored.complete, "fingerprint": fingerprint, "dataset_id": stored.dataset_id,
        "world_size": world_size,
    }
    if rank == 0:
        for stale in [*store.glob(".extract_*.tmp"), *store.glob(".skipped.json.*.tmp")]:
            stale.unlink(missing_ok=True)  # left by a killed run
        atomic_write(store / "extract_summary.json", json.dumps(summary, indent=1) + "\n")
        save_config(cfg, store / "extract_config.yaml")
        print(f"extracted {images} images, {regions} regions ({summary['bytes_per_region']} B/region) "
              f"in {seconds:.1f} s ({summary['regions_per_s']} regions/s); store {store}: "
              f"{len(stored)}/{stored.num_planned} images{'' if stored.complete else ' (incomplete)'}")
    return summary
