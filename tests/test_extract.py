"""tools/extract.py on a tiny synthetic world with a tiny random teacher."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.cache import EmbeddingCache
from distill.config import CacheConfig, WorldConfig, load_config
from distill.data.coco import CocoDetection
from distill.data.proposals import (
    ProposalsError,
    ProposalSource,
    jitter_boxes,
    load_proposals,
    save_proposals,
)
from distill.data.synthetic import World, generate_world
from distill.teacher import Teacher
from tools import extract

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "shapes" / "extract.yaml"
TINY = dict(num_train=8, num_val=4, image_size=96)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[World, Path, list[str]]:
    root = tmp_path_factory.mktemp("x")
    world = generate_world(WorldConfig(root=str(root / "world"), **TINY), progress=False, workers=1)
    overrides = [f"world.root={root / 'world'}", *(f"world.{k}={v}" for k, v in TINY.items()),
                 f"cache.root={root / 'cache'}", "cache.shard_size=3",
                 f"teacher.model_config={REPO / 'configs/shapes/teacher/tiny_vit.json'}",
                 "teacher.model=tiny_vit", "teacher.pretrained=null", "teacher.templates=shapes",
                 "teacher.dense_short_side=0"]
    return world, root / "cache", overrides


@pytest.fixture(scope="module")
def teacher(setup) -> Teacher:
    cfg = load_config(CONFIG, setup[2])
    return Teacher.from_config(cfg.teacher)


def _extract(setup, *extra: str) -> int:
    return extract.main(["--config", str(CONFIG), "--no-progress", *setup[2], *extra])


def _store_bytes(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in store.iterdir() if not p.name.startswith("extract_")}


def _fp16_close(a: np.ndarray, b: torch.Tensor) -> None:
    np.testing.assert_allclose(a, b.numpy(), atol=5e-4, rtol=0)


def test_gt_store_matches_teacher_and_rerun_is_noop(setup, teacher, capsys):
    world, cache_root, _ = setup
    assert _extract(setup, "cache.proposals=gt", "cache.name=gt") == 0
    assert "extracted 8 images" in capsys.readouterr().out
    store = cache_root / "gt"
    ds = CocoDetection(world.instances["train"], world.images["train"])
    cache = EmbeddingCache.open(store)
    assert cache.complete and cache.ids() == ds.ids and cache.dim == teacher.embed_dim == 128
    assert cache.fingerprint.startswith(teacher.fingerprint + "|proposals=gt,n=")
    total = 0
    for i, image_id in enumerate(ds.ids):
        s, rec = ds[i], cache.get(image_id)
        assert np.array_equal(rec["boxes"], s["boxes"].numpy())
        assert np.array_equal(rec["scores"], np.ones(len(s["boxes"]), np.float32))
        assert rec["embeddings"].shape == (len(s["boxes"]), 128) and rec["dense"] is None
        _fp16_close(rec["embeddings"], teacher.regions(s["image"], s["boxes"]))
        total += len(s["boxes"])
    summary = json.loads((store / "extract_summary.json").read_text())
    assert summary["images"] == 8 and summary["regions"] == total and summary["complete"]
    assert summary["bytes_per_region"] == 128 * 2 + 20
    assert load_config(store / "extract_config.yaml").cache.proposals == "gt"

    before = _store_bytes(store)
    assert _extract(setup, "cache.proposals=gt", "cache.name=gt") == 0
    assert "extracted 0 images, 0 regions" in capsys.readouterr().out
    assert _store_bytes(store) == before
    assert json.loads((store / "extract_summary.json").read_text())["images"] == 0


def test_jitter_proposals_deterministic(setup, teacher):
    world, cache_root, _ = setup
    assert _extract(setup, "cache.name=jit", "cache.num_proposals=16", "cache.jitter=0.2") == 0
    ds = CocoDetection(world.instances["train"], world.images["train"])
    cache = EmbeddingCache.open(cache_root / "jit")
    assert "|proposals=jitter(j=0.2,seed=0),n=16" in cache.fingerprint
    for i, image_id in enumerate(ds.ids):
        gt, rec = ds.targets(i)["boxes"].numpy(), cache.get(image_id)
        want = jitter_boxes(gt, image_id, 96, 96, 16, 0.2)
        assert np.array_equal(rec["boxes"], want[0]) and np.array_equal(rec["scores"], want[1])
        assert len(rec["boxes"]) <= 16 and np.array_equal(rec["boxes"][:len(gt)], gt)
        assert (rec["boxes"] >= 0).all() and (rec["boxes"] <= 96).all()
        assert (rec["scores"] > 0.3).all() and (rec["scores"] <= 1).all()  # IoU with the source
    s = ds[0]
    _fp16_close(cache.get(s["image_id"])["embeddings"],
                teacher.regions(s["image"], torch.from_numpy(cache.get(s["image_id"])["boxes"])))
    gt = np.array([[10, 10, 40, 50], [50, 20, 90, 60]], np.float32)
    a, b, c = (jitter_boxes(gt, i, 96, 96, 30, 0.1) for i in (7, 7, 8))
    assert np.array_equal(a[0], b[0]) and not np.array_equal(a[0], c[0]) and len(a[0]) == 30
    assert jitter_boxes(np.zeros((0, 4)), 7, 96, 96, 30, 0.1)[0].shape == (0, 4)


def test_proposals_file_and_dense(setup, tmp_path):
    world, cache_root, _ = setup
    ds = CocoDetection(world.instances["val"], world.images["val"])
    rng = np.random.default_rng(0)
    props = {}
    for image_id in ds.ids:
        xy = rng.uniform(0, 60, (5, 2))
        props[image_id] = (np.concatenate([xy, xy + rng.uniform(4, 30, (5, 2))], 1),
                           torch.tensor(rng.uniform(0, 1, 5)))  # numpy or torch
    path = tmp_path / "rpn.safetensors"
    save_proposals(path, props, metadata={"model": "test"})
    loaded = load_proposals(path)
    assert list(loaded) == ds.ids
    for image_id, (b, s) in props.items():
        assert np.array_equal(loaded[image_id][0], b.astype(np.float32))
        assert np.array_equal(loaded[image_id][1], s.numpy().astype(np.float32))
    assert _extract(setup, "cache.split=val", "cache.name=file", f"cache.proposals={path}",
                    "cache.num_proposals=2", "cache.store_dense=true") == 0
    cache = EmbeddingCache.open(cache_root / "file")
    for image_id, (b, s) in loaded.items():
        rec, top = cache.get(image_id), np.argsort(-s)[:2]
        assert np.array_equal(rec["boxes"], b[top]) and np.array_equal(rec["scores"], s[top])
        assert rec["embeddings"].shape == (2, 128) and rec["dense"].shape == (128, 12, 12)
    src = ProposalSource(CacheConfig(proposals=str(path)))
    with pytest.raises(ProposalsError, match="no proposals for 1 of 5 images"):
        src.check_covers(ds.ids + [12345])
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ProposalsError, match="junk.safetensors: not a proposals file"):
        load_proposals(tmp_path / "junk.safetensors")



def test_training_checks_sizes_and_verify_hashes_on_request(setup, capsys):
    """A student's start checks the store cheaply (sizes, fingerprint, completeness: no
    shard is hashed); ``tools.extract --verify`` hashes every shard and names a corrupt one."""
    from distill.cache import open_cache

    assert _extract(setup, "cache.name=verify") == 0
    cfg = load_config(CONFIG, [*setup[2], "cache.name=verify"])
    store = Path(cfg.cache.root) / "verify"
    assert _extract(setup, "cache.name=verify", "--verify") == 0
    assert "every sha256 as indexed" in capsys.readouterr().out
    shard = sorted(store.glob("shard-*.bin"))[1]
    data = bytearray(shard.read_bytes())
    data[40] ^= 0xFF
    shard.write_bytes(bytes(data))
    teacher_fp = EmbeddingCache.open(store).fingerprint.split("|")[0]
    instances = generate_world(cfg.world, progress=False).instances["train"]
    cache = open_cache(cfg, teacher_fp, instances)  # no hash: the flipped byte passes
    assert cache.complete and not cache._verified
    assert _extract(setup, "cache.name=verify", "--verify") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{shard} is corrupt" in err
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(Exception, match=r"is truncated"):
        open_cache(cfg, teacher_fp, instances)
