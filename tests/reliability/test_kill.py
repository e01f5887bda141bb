"""SIGKILL at seeded random moments, and once right as a shard or checkpoint temporary file
appears: rerunning the same command ends with the cache bytes, weights and metrics of an
uninterrupted run, and what a reader accepts after any kill is what that run wrote."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distill.cache import EmbeddingCache
from distill.engine import last_checkpoint
from tests.reliability.conftest import REPO, files, temporaries
from tools import extract, train

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")]

SEED = 8
KILLS = 5  # the first right as a temporary appears, the others at random moments
TRAIN = ["train.max_iters=12", "train.checkpoint_period=3", "train.keep_checkpoints=10"]
# Runs ``python -m MODULE ARGS`` with every rename of a temporary held for a second, so the
# first kill lands while the temporary exists: without it the child may rename in the
# moment between the test seeing the temporary and the signal arriving (a loaded CI
# machine did), and the kill hits nothing.
HOLD_RENAMES = """
import os, runpy, sys, time
_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if ".tmp" in os.fspath(src):
        time.sleep(1.0)
    return _replace(src, dst, *args, **kwargs)
os.replace = replace
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def _env() -> dict[str, str]:
    """The reference ran in this process: same thread count, same float sums."""
    n = str(torch.get_num_threads())
    return {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "PYTHONPATH": str(REPO)}


def _has_temporary(directory: Path) -> bool:
    try:
        return any(".tmp" in name for name in os.listdir(directory))
    except FileNotFoundError:
        return False


def _run_and_kill(cmd: list[str], log: Path, banner: str, watch: Path,
                  delay: float | None) -> bool:
    """Start ``cmd``; once its progress bar (``banner``) shows, SIGKILL it ``delay`` seconds
    later, or (``delay`` None) as soon as a temporary file shows in ``watch``. Returns
    whether it was killed (False: it finished first)."""
    name = next(arg for arg in cmd if arg.startswith("tools."))
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 180
        while banner not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"{name} exited before working: {log.read_text()}"
            assert time.monotonic() < deadline, f"{name} never started working"
            time.sleep(0.01)
        end = time.monotonic() + (delay or 0)
        while proc.poll() is None and (
                not _has_temporary(watch) if delay is None else time.monotonic() < end):
            pass  # busy: a shard's temporary lives for milliseconds
        if proc.poll() is not None:
            assert proc.returncode == 0, log.read_text()
            return False
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _kill_chain(cmd: list[str], log: Path, banner: str, watch: Path, seconds: float,
                done_fraction, check) -> list[str]:
    """``KILLS`` kills, each at a seeded random moment of the work left, then one run to the
    end; ``check()`` after every kill. Returns what each kill hit."""
    rng, hits = random.Random(SEED), []
    held = [cmd[0], "-c", HOLD_RENAMES, *cmd[2:]]  # cmd is [python, -m, module, *args]
    for k in range(KILLS):
        delay = None if k == 0 else rng.uniform(0.05, 0.7) * seconds * (1 - done_fraction())
        assert _run_and_kill(held if k == 0 else cmd, log, banner, watch, delay), \
            f"kill {k} came after the end"
        hits.append("mid-write" if _has_temporary(watch) else f"{delay or 0:.2f} s in")
        check()
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return hits


def test_extraction_killed_five_times_ends_byte_identical(tiny, tmp_path):
    t = time.perf_counter()
    assert extract.main(["--no-progress", *tiny.extract("ref")]) == 0
    seconds = time.perf_counter() - t
    ref, store = tiny.root / "cache" / "ref", tiny.root / "cache" / "killed"
    ref_index = {e["shard"]: e for e in json.loads((ref / "index-rank0.json").read_text())["shards"]}
    cmd = [sys.executable, "-m", "tools.extract", *tiny.extract("killed")]

    def stored() -> float:
        if not (store / "meta.json").is_file():
            return 0.0
        cache = EmbeddingCache.open(store)
        return len(cache) / cache.num_planned

    def check() -> None:  # whatever a reader accepts is what the uninterrupted run wrote
        if not (store / "meta.json").is_file():
            return
        cache = EmbeddingCache.open(store)
        cache.verify()
        for entry in json.loads((store / "index-rank0.json").read_text())["shards"]:
            assert entry == ref_index[entry["shard"]]
            assert (store / entry["file"]).read_bytes() == (ref / entry["file"]).read_bytes()

    hits = _kill_chain(cmd, tmp_path / "stderr.txt", "extract killed:", store, seconds, stored,
                       check)
    assert hits[0] == "mid-write", hits
    print(f"extraction kills: {hits}")
    got = {k: v for k, v in files(store).items() if not k.startswith("extract_")}
    want = {k: v for k, v in files(ref).items() if not k.startswith("extract_")}
    assert got == want and not temporaries(store)
    assert EmbeddingCache.open(store).complete


def _records(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "time_per_iter"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _metrics(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.endswith("_per_s")}


def test_training_killed_five_times_ends_with_identical_weights_and_metrics(tiny, tmp_path):
    if not (tiny.root / "cache" / "ref" / "meta.json").is_file():
        assert extract.main(["--no-progress", *tiny.extract("ref")]) == 0
    ref, run = tmp_path / "ref", tmp_path / "run"
    t = time.perf_counter()
    assert train.main(["--no-progress", *tiny.train(ref, "ref", *TRAIN)]) == 0
    seconds = time.perf_counter() - t
    cmd = [sys.executable, "-m", "tools.train", *tiny.train(run, "ref", *TRAIN)]

    def progress() -> float:
        last = last_checkpoint(run)
        return int(last.name[len("iter_"):]) / 12 if last else 0.0

    def check() -> None:  # the checkpoint a resume would read is the uninterrupted run's
        last = last_checkpoint(run)
        if last is not None:
            assert ((last / "model.safetensors").read_bytes()
                    == (ref / "checkpoints" / last.name / "model.safetensors").read_bytes())
            state = torch.load(last / "state.pt", weights_only=True)
            assert state["iteration"] == int(last.name[len("iter_"):])

    hits = _kill_chain(cmd, tmp_path / "stderr.txt", "train:", run / "checkpoints", seconds,
                       progress, check)
    assert hits[0] == "mid-write", hits
    print(f"training kills: {hits}")
    assert (run / "model_final.safetensors").read_bytes() == (ref / "model_final.safetensors").read_bytes()
    for ckpt in (ref / "checkpoints").glob("iter_*"):
        assert (run / "checkpoints" / ckpt.name / "model.safetensors").read_bytes() == (
            ckpt / "model.safetensors").read_bytes()
    assert _records(run) == _records(ref)
    assert (run / "eval/results.json").read_bytes() == (ref / "eval/results.json").read_bytes()
    for name in ("eval/metrics.json", "eval/summary.json"):
        assert _metrics(run / name) == _metrics(ref / name)
    assert not temporaries(run)
