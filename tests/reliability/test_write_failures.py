"""A disk that fills up mid-write, a read-only output folder, a log line torn by a kill: the
cache's shards and the last checkpoint written before stay valid, the error is one line, and
the same command finishes the job once there is room."""

from __future__ import annotations

import builtins
import errno
import json
import os
from pathlib import Path

import pytest
import torch

import distill.cache
import distill.engine
from detectors import recipe as detection
from distill.cache import EmbeddingCache
from distill.config import load_config
from distill.engine import MetricsLog, last_checkpoint, load_checkpoint
from distill.teacher import Teacher
from tests.reliability.conftest import files, temporaries
from tools import extract, train

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

FULL = os.strerror(errno.ENOSPC)


def _one_error_line(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


class _FullDisk:
    """A file that takes ``room`` bytes, then fails every write with ENOSPC."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if n > self.room:
            self.f.write(memoryview(data).cast("B")[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, FULL)
        self.room -= n
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def _read_only(directory: Path) -> None:
    """chmod a-w ``directory``; skips the test where that does not stop writes (root)."""
    directory.chmod(0o555)
    probe = directory / "probe"
    try:
        probe.touch()
    except PermissionError:
        return
    probe.unlink()
    directory.chmod(0o755)
    pytest.skip("chmod does not stop this user (root) from writing: read-only case not testable")


@pytest.fixture(scope="module")
def reference(tiny) -> Path:
    assert extract.main(["--no-progress", *tiny.extract("full_ref")]) == 0
    return tiny.root / "cache" / "full_ref"


def test_disk_full_mid_shard_keeps_earlier_shards(tiny, reference, monkeypatch, capsys):
    def full_open(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        return _FullDisk(f, 100) if Path(path).name == ".shard-00002.bin.tmp" else f

    monkeypatch.setattr(distill.cache, "open", full_open, raising=False)
    args = ["--no-progress", *tiny.extract("full")]
    store = tiny.root / "cache" / "full"
    assert extract.main(args) == 2
    _one_error_line(capsys, f"cannot write {store / 'shard-00002.bin'}: {FULL}",
                    "the shards stored before are intact")
    cache = EmbeddingCache.open(store)
    cache.verify()
    assert len(cache) == 4 and not temporaries(store)
    monkeypatch.undo()

    (store / "shard-00002.bin").write_bytes(b"not indexed: never read")  # e.g. a stray file
    assert extract.main(args) == 0  # room again: the same command finishes the store
    keep = lambda d: {k: v for k, v in files(d).items() if not k.startswith("extract_")}  # noqa: E731
    assert keep(store) == keep(reference)


def test_read_only_cache_folder(tiny, capsys):
    args = ["--no-progress", *tiny.extract("read_only")]
    store = tiny.root / "cache" / "read_only"
    store.mkdir(parents=True)
    _read_only(store)
    try:
        assert extract.main(args) == 2
    finally:
        store.chmod(0o755)
    _one_error_line(capsys, str(store), os.strerror(errno.EACCES))


def _train_args(tiny, run: Path) -> list[str]:
    if not (tiny.root / "cache" / "full_ref" / "meta.json").is_file():
        assert extract.main(["--no-progress", *tiny.extract("full_ref")]) == 0
    return ["--no-progress", *tiny.train(run, "full_ref", "train.max_iters=3",
                                         "train.checkpoint_period=1")]


@pytest.mark.parametrize("failing", ["checkpoint", "final weights"])
def test_disk_full_mid_checkpoint_keeps_the_last_one(failing, tiny, tmp_path, monkeypatch,
                                                     capsys):
    run = tmp_path / "run"
    real_save, real_save_model = torch.save, distill.engine.save_model

    def fill(path) -> None:
        Path(path).write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, FULL)

    if failing == "checkpoint":  # the second checkpoint's training state
        monkeypatch.setattr(distill.engine.torch, "save", lambda obj, path: fill(path)
                            if "iter_0000002" in str(path) else real_save(obj, path))
        broken, intact = run / "checkpoints/iter_0000002", run / "checkpoints/iter_0000001"
    else:
        monkeypatch.setattr(distill.engine, "save_model", lambda model, path: fill(path)
                            if "model_final" in str(path) else real_save_model(model, path))
        broken, intact = run / "model_final.safetensors", run / "checkpoints/iter_0000003"
    args = _train_args(tiny, run)
    assert train.main(args) == 2
    _one_error_line(capsys, f"cannot write {broken}: {FULL}; the last complete checkpoint "
                            f"({intact}) is intact")
    assert last_checkpoint(run) == intact and not temporaries(run)
    cfg = load_config(run / "config.yaml")
    model = detection.build_student(cfg, Teacher.from_config(cfg.teacher))
    assert load_checkpoint(intact, model) == int(intact.name[len("iter_"):])
    monkeypatch.undo()

    assert train.main(args) == 0  # room again: the same command resumes and finishes
    assert f"resumed from {intact}" in capsys.readouterr().out
    assert last_checkpoint(run).name == "iter_0000003"
    assert (run / "model_final.safetensors").is_file()


def test_read_only_checkpoint_folder(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    args = _train_args(tiny, run)
    (run / "checkpoints").mkdir(parents=True)
    _read_only(run / "checkpoints")
    try:
        assert train.main(args) == 2
    finally:
        (run / "checkpoints").chmod(0o755)
    _one_error_line(capsys, f"cannot write {run / 'checkpoints/iter_0000001'}: "
                            f"{os.strerror(errno.EACCES)}")


def test_metrics_line_torn_by_a_kill_is_dropped_on_resume(tmp_path):
    records = [{"iter": i, "loss": 1.0 / i} for i in (1, 2, 3)]
    text = "".join(json.dumps(r) + "\n" for r in records)
    (tmp_path / "metrics.jsonl").write_text(text + '{"iter": 4, "lo')  # killed mid-append
    MetricsLog(tmp_path, start_iter=2, tensorboard=False).close()
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(
        json.dumps(r) + "\n" for r in records[:2])
