import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from distill.config import ConfigError, ScheduleConfig, TrainConfig
from distill.engine import (
    CheckpointError,
    IterationSampler,
    NonFiniteLossError,
    last_checkpoint,
    load_checkpoint,
    load_weights,
    lr_factor,
    train,
)
from tests.engine_fixtures import Points, make_model, mse, small_cfg

ROOT = Path(__file__).resolve().parents[1]


def test_sampler_is_a_function_of_position_and_shards_ranks():
    full = IterationSampler(10, batch_size=3, seed=1)
    it = iter(full)
    stream = [next(it) for _ in range(30)]
    # each block of 10 is a permutation (one epoch)
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    late = iter(IterationSampler(10, batch_size=3, seed=1, start_iter=4))
    assert [next(late) for _ in range(6)] == stream[12:18]
    r0 = iter(IterationSampler(10, batch_size=2, seed=1, rank=0, world_size=2))
    r1 = iter(IterationSampler(10, batch_size=2, seed=1, rank=1, world_size=2))
    a, b = [next(r0) for _ in range(4)], [next(r1) for _ in range(4)]
    glob = iter(IterationSampler(10, batch_size=4, seed=1))
    g = [next(glob) for _ in range(8)]
    assert a[:2] + b[:2] == g[:4] and a[2:] + b[2:] == g[4:]


def test_lr_schedule_warmup_step_cosine_and_poly():
    s = ScheduleConfig(name="step", warmup_iters=10, warmup_factor=0.1, steps=[20, 30], gamma=0.1)
    assert lr_factor(0, s, 40) == pytest.approx(0.1)
    assert lr_factor(5, s, 40) == pytest.approx(0.1 * 0.5 + 0.5)
    assert lr_factor(10, s, 40) == 1.0
    assert lr_factor(25, s, 40) == pytest.approx(0.1)
    assert lr_factor(35, s, 40) == pytest.approx(0.01)
    c = ScheduleConfig(name="cosine", warmup_iters=0, min_lr_factor=0.0)
    assert lr_factor(50, c, 100) == pytest.approx(0.5)
    assert lr_factor(100, c, 100) == pytest.approx(0.0)
    # poly, as mmseg's PolyLR: (1 - 0.75) ** 0.9 = 0.28717..., from 1 down to min_lr_factor
    p = ScheduleConfig(name="poly", warmup_iters=0, power=0.9, min_lr_factor=0.01)
    assert lr_factor(0, p, 100) == pytest.approx(1.0)
    assert lr_factor(75, p, 100) == pytest.approx(0.294303, abs=1e-6)  # 0.01 + 0.99 x 0.287175
    assert lr_factor(100, p, 100) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="unknown schedule 'linear' .valid: step, cosine, poly."):
        lr_factor(0, ScheduleConfig(name="linear"), 10)


def test_train_writes_metrics_checkpoints_and_learns(tmp_path):
    model = make_model()
    before = mse(model.eval(), (Points().x, Points().y))["loss_mse"].item()
    metrics = train(model, mse, Points(), small_cfg(max_iters=40, clip_grad_norm=5.0), tmp_path, progress=False,
                    evaluate=lambda m: {"mse": mse(m, (Points().x, Points().y))["loss_mse"].item()})
    assert metrics["mse"] < 0.5 * before
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_iters = [r["iter"] for r in records if "loss_mse" in r]
    assert train_iters == [5, 10, 15, 20, 25, 30, 35, 40]
    assert records[-1] == {"iter": 40, "eval/mse": metrics["mse"]}
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").glob("iter_*"))
    assert ckpts == ["iter_0000030", "iter_0000035", "iter_0000040"]  # keep_checkpoints=3
    assert last_checkpoint(tmp_path).name == "iter_0000040"
    assert list((tmp_path / "tensorboard").glob("events.*"))
    final = load_file(tmp_path / "model_final.safetensors")
    assert torch.equal(final["3.weight"], model[3].weight.detach())
    state = torch.load(tmp_path / "checkpoints/iter_0000040/state.pt", weights_only=True)
    assert state["iteration"] == 40


class Crash(Exception):
    pass


def test_resume_equals_uninterrupted(tmp_path):
    full = make_model()
    train(full, mse, Points(), small_cfg(), tmp_path / "full", progress=False)

    calls = {"n": 0}

    def crashing(model, batch):  # dies during iteration 13, after checkpoint 10
        calls["n"] += 1
        if calls["n"] == 13:
            raise Crash
        return mse(model, batch)

    part = make_model()
    with pytest.raises(Crash):
        train(part, crashing, Points(), small_cfg(), tmp_path / "part", progress=False)
    assert last_checkpoint(tmp_path / "part").name == "iter_0000010"
    resumed = make_model(seed=99)  # different init: everything must come from the checkpoint
    train(resumed, mse, Points(), small_cfg(), tmp_path / "part", resume=True, progress=False)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    lines = lambda d: (tmp_path / d / "metrics.jsonl").read_text().splitlines()  # noqa: E731
    strip = lambda ls: [{k: v for k, v in json.loads(x).items() if k != "time_per_iter"}  # noqa: E731
                        for x in ls]
    assert strip(lines("full")) == strip(lines("part"))


class NoisyPoints(Points):
    """Points with augmentation: noise drawn from the engine's per-sample generator."""

    def sample(self, i, generator):
        x, y = self[i]
        return x + 0.5 * torch.randn(x.shape, generator=generator), y


def test_augmentation_is_per_sample_seeded_so_workers_and_resume_change_nothing(tmp_path):
    """The same weights from 0 loader workers, 2 workers, and 2 workers killed at iteration
    13 and resumed: augmentation comes from a generator seeded by the sample's position."""
    def run(out, workers, crash_at=None, resume=False):
        calls = {"n": 0}

        def loss_fn(model, batch):
            calls["n"] += 1
            if calls["n"] == crash_at:
                raise Crash
            return mse(model, batch)

        model = make_model()
        train(model, loss_fn, NoisyPoints(), small_cfg(num_workers=workers), out,
              resume=resume, progress=False, tensorboard=False)
        return model

    alone = run(tmp_path / "alone", 0)
    workers = run(tmp_path / "workers", 2)
    with pytest.raises(Crash):
        run(tmp_path / "part", 2, crash_at=13)
    resumed = run(tmp_path / "part", 2, resume=True)
    plain = make_model()  # without the augmentation the weights differ: it was applied
    train(plain, mse, Points(), small_cfg(), tmp_path / "plain", progress=False,
          tensorboard=False)
    for a, b, c in zip(alone.state_dict().values(), workers.state_dict().values(),
                       resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert not all(torch.equal(a, d) for a, d in zip(alone.state_dict().values(),
                                                     plain.state_dict().values(), strict=True))


def test_the_criterions_state_is_checkpointed_and_resumed(tmp_path):
    """A criterion with state (BARON/MoCo's queue of past targets) resumes where it was: the
    killed-and-resumed run's queue is the uninterrupted one's, bit for bit."""
    from distill.baron import EmbeddingQueue

    def run(out, queue, crash_at=None, resume=False):
        calls = {"n": 0}

        def loss_fn(model, batch):
            calls["n"] += 1
            if calls["n"] == crash_at:
                raise Crash
            queue.enqueue(batch[0])
            return mse(model, batch)

        train(make_model(), loss_fn, Points(), small_cfg(), out, criterion=queue, resume=resume,
              progress=False, tensorboard=False)

    full = EmbeddingQueue(size=10)
    run(tmp_path / "full", full)
    with pytest.raises(Crash):
        run(tmp_path / "part", EmbeddingQueue(size=10), crash_at=13)  # after checkpoint 10
    resumed = EmbeddingQueue(size=10)
    run(tmp_path / "part", resumed, resume=True)
    assert int(full.ptr) == int(resumed.ptr) == (20 * 4) % 10 and len(full) == 10
    assert torch.equal(full.contents(), resumed.contents())
    saved = torch.load(tmp_path / "full/checkpoints/iter_0000020/state.pt", weights_only=True)
    assert torch.equal(saved["criterion"]["buffer"], full.buffer)


def test_amp_on_cpu_is_refused_in_one_line(tmp_path):
    from distill.config import ConfigError

    with pytest.raises(ConfigError, match=r"^train.amp=true needs a CUDA device \(train.device: "
                                          r"cpu\); on CPU train in float32: set train.amp=false$"):
        train(make_model(), mse, Points(), small_cfg(amp=True), tmp_path, progress=False)
    assert not (tmp_path / "checkpoints").exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    calls = {"n": 0}

    def nan_at_7(model, batch):
        calls["n"] += 1
        out = mse(model, batch)
        if calls["n"] == 7:
            out["loss_box"] = torch.tensor(float("nan"))
        return out

    model = make_model()
    with pytest.raises(NonFiniteLossError) as e:
        train(model, nan_at_7, Points(), small_cfg(), tmp_path, progress=False)
    msg = str(e.value)
    assert "'loss_box'" in msg and "iteration 7" in msg and "iter_0000005" in msg
    assert "\n" not in msg
    ckpt = last_checkpoint(tmp_path)
    assert ckpt.name == "iter_0000005"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")] == []
    fresh = make_model(seed=5)
    assert load_checkpoint(ckpt, fresh) == 5


def test_load_weights_rejects_other_architecture_and_pickles(tmp_path):
    model = make_model()
    train(model, mse, Points(), small_cfg(max_iters=5), tmp_path, progress=False,
          tensorboard=False)
    other = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    with pytest.raises(CheckpointError, match="model_final.safetensors: does not fit Sequential"):
        load_weights(other, tmp_path / "model_final.safetensors")
    fake = tmp_path / "evil.safetensors"
    torch.save({"a": torch.zeros(1)}, fake)  # a pickle posing as a checkpoint
    with pytest.raises(CheckpointError, match="evil.safetensors: not a safetensors checkpoint"):
        load_weights(model, fake)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_weights(model, tmp_path / "nope.safetensors")


@pytest.mark.slow
def test_ddp_two_processes_on_cpu_match_single_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", "29517", str(ROOT / "tests/engine_fixtures.py"), str(tmp_path / "ddp"),
           "2"]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, timeout=300, capture_output=True)
    r0 = load_file(tmp_path / "ddp/rank0.safetensors")
    r1 = load_file(tmp_path / "ddp/rank1.safetensors")
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    # the same optimisation in one process with the global batch (2 ranks x 2)
    single = [sys.executable, str(ROOT / "tests/engine_fixtures.py"), str(tmp_path / "one"), "4"]
    subprocess.run(single, check=True, env=env, cwd=ROOT, timeout=300, capture_output=True)
    one = load_file(tmp_path / "one/rank0.safetensors")
    init = make_model().state_dict()
    for k in r0:
        assert torch.allclose(r0[k], one[k], atol=1e-5), k
        assert not torch.equal(r0[k], init[k])


class _Copies(TorchDispatchMode):
    """Records every tensor copy between devices: (target device, non_blocking)."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and "device" in kwargs:
            self.seen.append((torch.device(kwargs["device"]).type,
                              bool(kwargs.get("non_blocking", False))))
        return func(*args, **kwargs)


def test_copies_to_the_host_are_blocking_and_to_the_gpu_asynchronous():
    """Predictions are read on the host as soon as ``to_device(..., "cpu")`` returns: a
    non-blocking GPU -> CPU copy may not have landed then (issue 33, item 1)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from distill.engine import to_device

    with FakeTensorMode(allow_non_fake_inputs=True):
        on_gpu = {"boxes": torch.zeros(3, 4, device="cuda"), "n": 3,
                  "masks": [torch.zeros(2, 5, 5, device="cuda")]}
        batch = [torch.zeros(2, 2)]
        with _Copies() as copies:
            back = to_device(on_gpu, "cpu")
            to_device(batch, "cuda")
    assert back["n"] == 3 and back["boxes"].device.type == "cpu"
    assert copies.seen == [("cpu", False), ("cpu", False), ("cuda", True)]


def test_the_schedule_is_scaled_from_the_reference_batch():
    """A real config (total batch 16) run by one process of 2 images: lr / 8, every iteration
    count x 8, said in one line; 8 processes run it as written; 0 leaves it alone."""
    from distill.config import load_config
    from distill.engine import scale_to_batch

    cfg = load_config(ROOT / "configs/coco_ov/vild.yaml").train
    assert (cfg.reference_batch, cfg.batch_size, cfg.optim.lr) == (16, 2, 0.02)
    one, line = scale_to_batch(cfg, 1)
    assert one.optim.lr == pytest.approx(0.0025) and one.max_iters == 8 * 2_880_000
    assert one.schedule.warmup_iters == 8000 and one.schedule.steps == [8 * 2_592_000,
                                                                        8 * 2_736_000]
    assert one.checkpoint_period == 80_000 and cfg.optim.lr == 0.02  # cfg itself unchanged
    assert line == ("train.reference_batch 16 -> total batch 2 (1 process(es) x 2 images): "
                    "lr 0.02 -> 0.0025, max_iters 2880000 -> 23040000, warm-up 1000 -> 8000, "
                    "steps [2592000, 2736000] -> [20736000, 21888000]")
    eight, line = scale_to_batch(cfg, 8)
    assert eight == cfg and "lr and schedule as configured" in line
    four = scale_to_batch(dataclasses.replace(cfg, batch_size=8), 4)[0]  # total 32: halved
    assert four.optim.lr == pytest.approx(0.04) and four.max_iters == 1_440_000
    plain = TrainConfig(max_iters=7)
    assert scale_to_batch(plain, 4) == (plain, "")
    with pytest.raises(ConfigError, match="train.reference_batch must be >= 0"):
        scale_to_batch(TrainConfig(reference_batch=-1), 1)


def test_the_engine_prints_the_scaling_and_trains_the_scaled_schedule(tmp_path, capsys):
    cfg = small_cfg(reference_batch=16, max_iters=8, checkpoint_period=4, log_period=4)
    train(make_model(), mse, Points(), cfg, tmp_path, progress=False, tensorboard=False)
    assert "train.reference_batch 16 -> total batch 4" in capsys.readouterr().out
    iters = [json.loads(line)["iter"] for line in (tmp_path / "metrics.jsonl").open()]
    assert iters == [4, 8, 12, 16, 20, 24, 28, 32]  # 8 iterations of 16 = 32 of 4
