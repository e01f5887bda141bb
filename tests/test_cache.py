import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from distill.cache import CacheError, CacheWriter, EmbeddingCache, bytes_per_region
from tests.cache_writer import DATASET, FINGERPRINT, synthetic_plan, synthetic_record, write

ROOT = Path(__file__).resolve().parents[1]


def snapshot(store: Path) -> dict[str, bytes]:
    """Every file of a store (temporary ones included) -> its bytes."""
    return {p.name: p.read_bytes() for p in sorted(store.iterdir())}


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def small_store(tmp_path: Path, dtype: str, dim: int = 512) -> tuple[Path, dict[int, dict]]:
    """Five images, shard size 2 (a tail shard of one): ids 10..14, id 12 has no regions,
    id 13 and 12 have dense maps."""
    rng = np.random.default_rng(0)
    plan, records = [10, 11, 12, 13, 14], {}
    for i, image_id in enumerate(plan):
        n = 0 if image_id == 12 else 40 + i
        xy = rng.uniform(0, 200, (n, 2)).astype(np.float32)
        records[image_id] = {
            "boxes": np.concatenate([xy, xy + 10.5], axis=1),
            "scores": rng.uniform(0, 1, n).astype(np.float32),
            "embeddings": unit_rows(rng, n, dim),
            "dense": rng.standard_normal((dim, 3, 5)).astype(np.float32) if image_id in (12, 13) else None,
        }
    path = tmp_path / f"store_{dtype}"
    with EmbeddingCache.create_or_open(path, plan, fingerprint="fp-A", dataset_id="ds-A",
                                       dim=dim, dtype=dtype, shard_size=2) as w:
        assert w.missing() == plan
        for image_id in plan:
            w.add(image_id, **records[image_id])
        assert w.missing() == [] and w.complete
    return path, records


def test_float16_round_trip_zero_regions_and_dense(tmp_path):
    path, records = small_store(tmp_path, "float16")
    cache = EmbeddingCache.open(path, fingerprint="fp-A", dataset_id="ds-A")
    assert len(cache) == 5 and cache.complete and cache.ids() == [10, 11, 12, 13, 14]
    assert 12 in cache and 99 not in cache and cache.dim == 512 and cache.dtype == "float16"
    for image_id, rec in records.items():
        got = cache.get(image_id)
        np.testing.assert_array_equal(got["boxes"], rec["boxes"])
        np.testing.assert_array_equal(got["scores"], rec["scores"])
        assert got["embeddings"].dtype == np.float32
        np.testing.assert_array_equal(got["embeddings"], rec["embeddings"].astype(np.float16).astype(np.float32))
        if rec["dense"] is None:
            assert got["dense"] is None
        else:
            np.testing.assert_array_equal(got["dense"], rec["dense"].astype(np.float16).astype(np.float32))
    empty = cache.get(12)
    assert empty["embeddings"].shape == (0, 512) and empty["boxes"].shape == (0, 4) and empty["scores"].shape == (0,)
    assert cache.bytes_per_region == 512 * 2 + 16 + 4 == bytes_per_region(512, "float16")
    # shard 0 = images 10, 11: 40 + 41 regions, no dense maps -> exactly the region bytes + padding
    assert 81 * cache.bytes_per_region <= cache.shard_files()[0].stat().st_size < 81 * cache.bytes_per_region + 3 * 64
    with pytest.raises(KeyError, match="image 99 is not in cache"):
        cache.get(99)
    assert sorted(p.name for p in path.iterdir()) == [
        "index-rank0.json", "meta.json", "shard-00000.bin", "shard-00001.bin", "shard-00002.bin"]


def test_int8_round_trip(tmp_path):
    path, records = small_store(tmp_path, "int8")
    cache = EmbeddingCache.open(path)
    assert cache.bytes_per_region == 512 + 4 + 16 + 4
    cosines = []
    for image_id, rec in records.items():
        got = cache.get(image_id)
        np.testing.assert_array_equal(got["boxes"], rec["boxes"])
        np.testing.assert_array_equal(got["scores"], rec["scores"])
        x, y = rec["embeddings"], got["embeddings"]
        assert y.shape == x.shape
        step = np.abs(x).max(axis=1, keepdims=True) / 127  # per-row quantisation step
        assert np.all(np.abs(y - x) <= step * 0.5 + 1e-6)
        cosines += list((x * y).sum(1) / np.linalg.norm(y, axis=1))
        if rec["dense"] is not None:
            d = rec["dense"]
            assert np.all(np.abs(got["dense"] - d) <= np.abs(d).max(axis=0) / 127 * 0.5 + 1e-6)
    assert len(cosines) == 40 + 41 + 43 + 44
    assert np.mean(cosines) >= 0.995 and np.min(cosines) >= 0.99


def test_fingerprint_dataset_and_dtype_mismatch(tmp_path):
    path, _ = small_store(tmp_path, "float16", dim=8)
    with pytest.raises(CacheError) as e:
        EmbeddingCache.open(path, fingerprint="fp-B")
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "fp-A" in msg and "fp-B" in msg
    assert "teacher fingerprint" in msg and "cache.name" in msg
    with pytest.raises(CacheError, match=r"dataset ds-A, this run's is ds-B"):
        EmbeddingCache.open(path, fingerprint="fp-A", dataset_id="ds-B")
    plan = [10, 11, 12, 13, 14]
    kw = dict(fingerprint="fp-A", dataset_id="ds-A", dim=8, dtype="float16", shard_size=2)
    for key, value in [("fingerprint", "fp-B"), ("dataset_id", "ds-B"), ("dtype", "int8"),
                       ("dim", 16), ("shard_size", 3)]:
        with pytest.raises(CacheError, match=str(path)):
            EmbeddingCache.create_or_open(path, plan, **{**kw, key: value})
    with pytest.raises(CacheError, match="another image list"):
        EmbeddingCache.create_or_open(path, plan[::-1], **kw)
    # long hash fingerprints are shortened where they differ
    long_a, long_b = "a" * 30 + "1" + "f" * 33, "a" * 30 + "2" + "f" * 33
    with pytest.raises(CacheError) as e:
        EmbeddingCache.create_or_open(tmp_path / "h", [1], **{**kw, "fingerprint": long_a}).close()
        EmbeddingCache.open(tmp_path / "h", fingerprint=long_b)
    assert "a" * 30 + "1" in str(e.value) and "a" * 30 + "2" in str(e.value)
    with pytest.raises(CacheError, match="no cache at"):
        EmbeddingCache.open(tmp_path / "nothing")


def test_writer_checks_inputs_and_incomplete_close(tmp_path):
    w = EmbeddingCache.create_or_open(tmp_path / "s", [1, 2, 3], fingerprint="f", dataset_id="d",
                                      dim=4, shard_size=2)
    with pytest.raises(CacheError, match="not in the extraction plan"):
        w.add(7, np.zeros((0, 4)), np.zeros(0), np.zeros((0, 4)))
    with pytest.raises(CacheError, match=r"embeddings \(N, 4\)"):
        w.add(1, np.zeros((2, 4)), np.zeros(2), np.zeros((2, 5)))
    with pytest.raises(CacheError, match="non-finite"):
        w.add(1, np.zeros((1, 4)), np.zeros(1), np.full((1, 4), np.nan))
    w.add(1, np.zeros((1, 4)), np.ones(1), np.ones((1, 4)))
    with pytest.raises(CacheError, match="already added"):
        w.add(1, np.zeros((1, 4)), np.ones(1), np.ones((1, 4)))
    assert w.missing() == [2, 3] and w.missing([3, 1]) == [3]
    with pytest.raises(CacheError, match=r"shard 0: 1 of 2 images"):
        w.close()
    assert not EmbeddingCache.open(tmp_path / "s").complete and len(EmbeddingCache.open(tmp_path / "s")) == 0


def test_add_order_does_not_change_bytes(tmp_path):
    write(tmp_path / "ref", num=20, shard_size=6)
    plan = synthetic_plan(20)
    with EmbeddingCache.create_or_open(tmp_path / "rev", plan, fingerprint=FINGERPRINT, dataset_id=DATASET,
                                       dim=32, shard_size=6) as w:
        for image_id in reversed(w.missing()):
            w.add(image_id, **synthetic_record(image_id, 32))
    assert snapshot(tmp_path / "rev") == snapshot(tmp_path / "ref")


def test_resume_after_kill_equals_uninterrupted_run(tmp_path):
    write(tmp_path / "ref", num=50, shard_size=8)
    ref = snapshot(tmp_path / "ref")
    assert len([n for n in ref if n.startswith("shard-")]) == 7 and not any(n.startswith(".") for n in ref)
    store, rng = tmp_path / "killed", np.random.default_rng(1234)
    cmd = [sys.executable, "-m", "tests.cache_writer", str(store), "--sleep", "0.02"]
    shards_before, kills = 0, 0
    for _ in range(3):
        proc = subprocess.Popen(cmd, cwd=ROOT)
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:  # until a new shard exists
            if len(list(store.glob("shard-*.bin"))) > shards_before:
                break
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.2))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        shards_before = len(list(store.glob("shard-*.bin")))
    assert kills >= 2  # the test must really interrupt the writer
    done = subprocess.run(cmd, cwd=ROOT, timeout=60)
    assert done.returncode == 0
    assert snapshot(store) == ref
    cache = EmbeddingCache.open(store, fingerprint=FINGERPRINT, dataset_id=DATASET)
    assert cache.complete and cache.ids() == synthetic_plan(50)
    rec, want = cache.get(synthetic_plan(50)[3]), synthetic_record(synthetic_plan(50)[3], 32)
    np.testing.assert_array_equal(rec["boxes"], want["boxes"])


def test_crash_between_shard_rename_and_index_update(tmp_path, monkeypatch):
    write(tmp_path / "ref", num=20, shard_size=6)
    store = tmp_path / "crashed"
    original, calls = CacheWriter._write_index, []

    def dies_after_second_shard(self):
        calls.append(1)
        if len(calls) == 3:  # 1: at creation, 2: after shard 0, 3: after shard 1
            raise KeyboardInterrupt("simulated kill")
        original(self)

    monkeypatch.setattr(CacheWriter, "_write_index", dies_after_second_shard)
    with pytest.raises(KeyboardInterrupt):
        write(store, num=20, shard_size=6)
    monkeypatch.setattr(CacheWriter, "_write_index", original)
    assert (store / "shard-00001.bin").is_file()  # written, but not in the index
    assert EmbeddingCache.open(store).ids() == synthetic_plan(20)[:6]
    (store / ".shard-00002.bin.tmp").write_bytes(b"half a shard")  # killed mid-write
    write(store, num=20, shard_size=6)
    assert snapshot(store) == snapshot(tmp_path / "ref")


def test_corrupt_and_truncated_shards_are_detected_and_rewritten(tmp_path):
    write(tmp_path / "ref", num=50, shard_size=8)
    store = tmp_path / "s"
    write(store, num=50, shard_size=8)
    plan = synthetic_plan(50)
    flipped, cut = store / "shard-00002.bin", store / "shard-00004.bin"
    data = bytearray(flipped.read_bytes())
    data[100] ^= 0xFF
    flipped.write_bytes(bytes(data))
    cache = EmbeddingCache.open(store)
    cache.get(plan[0])  # intact shards still read
    with pytest.raises(CacheError, match=r"shard-00002\.bin is corrupt .*rerun extraction"):
        cache.get(plan[16])
    with pytest.raises(CacheError, match=r"shard-00002\.bin is corrupt"):
        cache.get(plan[17])  # still never read after the first failure
    with pytest.raises(CacheError, match=r"shard-00002\.bin"):
        EmbeddingCache.open(store).verify()
    cut.write_bytes(cut.read_bytes()[:-10])
    with pytest.raises(CacheError, match=r"shard-00004\.bin is truncated .*rerun extraction"):
        EmbeddingCache.open(store)
    stamps = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in store.glob("shard-*.bin")}
    write(store, num=50, shard_size=8)
    changed = {p.name for p in store.glob("shard-*.bin")
               if (p.stat().st_mtime_ns, p.stat().st_ino) != stamps[p.name]}
    assert changed == {"shard-00002.bin", "shard-00004.bin"}
    assert snapshot(store) == snapshot(tmp_path / "ref")
    EmbeddingCache.open(store).verify()


def test_two_ranks_merge_to_the_single_writer_content(tmp_path):
    write(tmp_path / "one", num=30, shard_size=4)
    plan, dim = synthetic_plan(30), 32
    kw = dict(fingerprint=FINGERPRINT, dataset_id=DATASET, dim=dim, shard_size=4, world_size=2)
    w0 = EmbeddingCache.create_or_open(tmp_path / "two", plan, rank=0, **kw)
    w1 = EmbeddingCache.create_or_open(tmp_path / "two", plan, rank=1, **kw)
    assert w0.missing() == [i for p, i in enumerate(plan) if (p // 4) % 2 == 0]
    assert sorted(w0.missing() + w1.missing()) == sorted(plan)
    with pytest.raises(CacheError, match="which rank 1 writes"):
        w0.add(plan[4], **synthetic_record(plan[4], dim))
    for p, image_id in enumerate(plan):  # interleaved, as concurrent ranks would be
        (w0 if (p // 4) % 2 == 0 else w1).add(image_id, **synthetic_record(image_id, dim))
    w0.close()
    w1.close()
    one, two = snapshot(tmp_path / "one"), snapshot(tmp_path / "two")
    assert set(two) == set(one) | {"index-rank1.json"}
    assert all(two[n] == one[n] for n in one if n.startswith("shard-") or n == "meta.json")
    parts = [json.loads(two[f"index-rank{r}.json"])["shards"] for r in (0, 1)]
    assert [e["shard"] for e in parts[0]] == [0, 2, 4, 6] and [e["shard"] for e in parts[1]] == [1, 3, 5, 7]
    a, b = EmbeddingCache.open(tmp_path / "one"), EmbeddingCache.open(tmp_path / "two")
    assert a.ids() == b.ids() == plan and b.complete
    for image_id in plan:
        ra, rb = a.get(image_id), b.get(image_id)
        for key in ("boxes", "scores", "embeddings"):
            np.testing.assert_array_equal(ra[key], rb[key])
        assert (ra["dense"] is None) == (rb["dense"] is None)


def test_resume_with_another_world_size(tmp_path):
    """Rank 1 of 2 never ran; one process finishes the store."""
    write(tmp_path / "one", num=30, shard_size=4)
    store = tmp_path / "s"
    write(store, num=30, shard_size=4, rank=0, world_size=2)
    assert len(EmbeddingCache.open(store)) == 16
    write(store, num=30, shard_size=4)
    cache = EmbeddingCache.open(store)
    assert cache.complete and cache.ids() == synthetic_plan(30)
    one = snapshot(tmp_path / "one")
    assert all(p.read_bytes() == one[p.name] for p in store.glob("shard-*.bin"))
    assert not any(n.startswith(".") or n.endswith(".tmp") for n in os.listdir(store))


def test_reader_pickles_without_memory_maps(tmp_path):
    import pickle

    path, records = small_store(tmp_path, "float16", dim=8)
    cache = EmbeddingCache.open(path)
    cache.verify()
    clone = pickle.loads(pickle.dumps(cache))
    assert clone._verified == {0, 1, 2} and clone._maps == {}
    np.testing.assert_array_equal(clone.get(13)["scores"], records[13]["scores"])
