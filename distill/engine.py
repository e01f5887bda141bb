"""The plain, iteration-based training loop shared by every student.

No hooks: :func:`train` runs ``max_iters`` steps of

    losses = loss_fn(model, batch)          # dict name -> weighted scalar loss
    sum(losses.values()).backward(); clip; optimizer.step(); scheduler.step()

with logging (tqdm bar, ``metrics.jsonl``, TensorBoard scalars), periodic
evaluation and atomic checkpoints. ``resume=True`` continues from the last
checkpoint and, on CPU with a fixed seed, reaches the same weights as an
uninterrupted run: the sampler is a pure function of (seed, iteration) and every
RNG state is checkpointed. Datasets that augment implement ``sample(index, generator)``
and draw from that generator, seeded per position of the run (:class:`Seeded`): the
same draws with any ``train.num_workers`` and after a resume. Build the model after
``seed_all(seed)``: torch seeds itself differently in every process.
Bit-identical also needs the same torch thread count (float sums are split across
threads); a resume with another count warns.

Distributed data parallel: launch the same command under ``torchrun``; each
rank reads its own slice of every global batch, gradients are averaged, and
only rank 0 writes files.

Checkpoint layout (``output_dir/checkpoints``)::

    iter_0000500/model.safetensors   weights (safetensors)
    iter_0000500/state.pt            optimizer, scheduler, iteration, RNG
                                     (plain tensors/containers: weights_only-safe)
    last_checkpoint                  name of the newest complete checkpoint

A checkpoint directory is written under a temporary name and renamed when
complete; ``last_checkpoint`` is replaced atomically afterwards, so a kill at
any moment leaves the previous checkpoint valid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from distill.config import ConfigError, OptimConfig, ScheduleConfig, TrainConfig, atomic_write

LossFn = Callable[[torch.nn.Module, Any], dict[str, torch.Tensor]]


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite; the message names the term and iteration."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the model."""


# --------------------------------------------------------------------------- distributed


def init_distributed(device: str = "cpu") -> tuple[int, int]:
    """Join the process group when launched by torchrun; returns (rank, world_size)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def resolve_device(name: str | torch.device) -> torch.device:
    """``train.device`` / ``teacher.device`` -> a device: a bare ``cuda`` is this process's own
    GPU (``LOCAL_RANK`` under torchrun, else 0)."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def to_device(obj: Any, device: torch.device | str) -> Any:
    """``obj`` with every tensor inside (dicts, lists, tuples, nested) moved to ``device``;
    other values as they are. A tensor already there is returned as is.

    Copies towards a CUDA device are asynchronous (``non_blocking``: the stream orders them
    before any kernel that reads them); copies towards the host are blocking, because the
    CPU may read a non-blocking device-to-host copy before it has landed (PyTorch's
    "pinned memory" notes), and predictions are read on the host at once."""
    device = torch.device(device)
    if isinstance(obj, torch.Tensor):
        return obj if obj.device == device else obj.to(device, non_blocking=device.type == "cuda")
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        moved = [to_device(v, device) for v in obj]
        return type(obj)(*moved) if hasattr(obj, "_fields") else type(obj)(moved)  # namedtuple
    return obj


def shard(n: int) -> range:
    """This rank's contiguous slice of ``n`` items (evaluation, proposals): rank ``r`` of ``w``
    takes ``[r * n // w, (r + 1) * n // w)``, so the slices in rank order are the items in
    order and every item is in exactly one slice; ``range(n)`` in one process."""
    rank, world = get_rank(), get_world_size()
    return range(rank * n // world, (rank + 1) * n // world)


_HOST_GROUP: tuple[Any, Any] = (None, None)  # (the default group it was made for, the group)


def host_group():
    """The process group for Python objects and CPU tensors: the default one under gloo, and
    beside NCCL a gloo group over the same processes (made once, by every rank at its first
    use), as detectron2 does, so the detections gathered for an evaluation (LVIS: GBs of
    masks as RLE) stay in host memory instead of passing through each GPU."""
    global _HOST_GROUP
    if dist.get_backend() != "nccl":
        return None
    world = dist.group.WORLD
    if _HOST_GROUP[0] is not world:  # none yet, or the default group was made anew
        _HOST_GROUP = (world, dist.new_group(backend="gloo"))
    return _HOST_GROUP[1]


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's ``obj`` on rank 0, in rank order (None on the other ranks); ``[obj]`` in one
    process. Objects travel pickled over :func:`host_group`."""
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size() if get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0, group=host_group())
    return out


def reduce_over_ranks(*tensors: torch.Tensor, op: str = "sum") -> None:
    """Each CPU tensor summed (``op="sum"``: sharded counts, a segmenter's confusion matrix)
    or maxed (``"max"``) over every rank, in place, over :func:`host_group`; nothing in one
    process."""
    if get_world_size() == 1:
        return
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
    for t in tensors:
        dist.all_reduce(t, op=reduce_op, group=host_group())


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` itself in one process), over :func:`host_group`."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=host_group())
    return box[0]


def check_amp(cfg: TrainConfig, device: torch.device) -> None:
    """``train.amp`` is for CUDA (bf16 autocast, or fp16 with a gradient scaler): refused in
    one line elsewhere (bf16 on this project's CPUs runs about 6x slower than float32)."""
    if not cfg.amp:
        return
    if device.type != "cuda":
        raise ConfigError(f"train.amp=true needs a CUDA device (train.device: {cfg.device}); "
                          f"on CPU train in float32: set train.amp=false")
    if cfg.amp_dtype not in ("bfloat16", "float16"):
        raise ConfigError(f"train.amp_dtype: {cfg.amp_dtype!r} (valid: bfloat16, float16)")


def sync_batch_norm(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` with its trainable BatchNorm layers made ``SyncBatchNorm`` (in place; the same
    parameters, buffers and state_dict keys) when it trains on CUDA, where DDP's NCCL group
    averages their batch statistics over every process (ViLD's synchronised BN); as it is
    on the CPU (gloo has no SyncBatchNorm: each process normalises its own batch)."""
    if device.type != "cuda":
        return model
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in DistributedDataParallel whenever a process group exists (world size 1
    included), pinned to ``device`` on CUDA with synchronised batch norm
    (:func:`sync_batch_norm`); the model itself otherwise."""
    if not (dist.is_available() and dist.is_initialized()):
        return model
    if device.type == "cuda":
        model = sync_batch_norm(model, device)
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index],
                                                         output_device=device.index)
    return torch.nn.parallel.DistributedDataParallel(model)


# --------------------------------------------------------------------------- seeding / RNG


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": np_state[2],
                  "has_gauss": np_state[3], "cached_gaussian": np_state[4]},
        "python": list(random.getstate()[1]) + [random.getstate()[0]],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[-1], tuple(py[:-1]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- data


def sample_seed(seed: int, position: int) -> int:
    """The augmentation seed of the sample at ``position`` of a run's global stream: a pure
    function of (run seed, position), so a resumed run and any number of loader workers draw
    what an uninterrupted single-process run draws."""
    return (seed * 1_000_003 + position * 7_919 + 12_345) % 2**62


class Seeded(Dataset):
    """``dataset`` read at the sampler's ``(index, sample_seed)`` keys: a dataset with
    ``sample(index, generator)`` draws its augmentation from a generator seeded for that
    position (never from the global RNG); any other dataset is read as ``dataset[index]``."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        if hasattr(self.dataset, "sample"):
            return self.dataset.sample(index, torch.Generator().manual_seed(seed))
        return self.dataset[index]


class IterationSampler(Sampler[int]):
    """Endless stream of dataset indices, a pure function of (seed, position).

    Epoch ``e`` is ``randperm(n)`` drawn from a generator seeded with
    ``seed + e``. The global stream is cut into batches of
    ``batch_size * world_size``; rank ``r`` reads items ``r*batch_size ..`` of
    each, so starting at ``start_iter`` reproduces exactly what an
    uninterrupted run would have read from that iteration on. With ``seeded`` it yields
    ``(index, sample_seed)``: the seed of that position's augmentation (:class:`Seeded`).
    """

    def __init__(self, size: int, batch_size: int, seed: int = 0, start_iter: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 seeded: bool = False):
        if size <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start_iter, self.rank, self.world_size, self.shuffle = (
            start_iter, rank, world_size, shuffle)
        self.seeded = seeded

    def _global_index(self, pos: int) -> int:
        epoch, offset = divmod(pos, self.size)
        if not self.shuffle:
            return offset
        if getattr(self, "_epoch", None) != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm, self._epoch = torch.randperm(self.size, generator=g).tolist(), epoch
        return self._perm[offset]

    def __iter__(self) -> Iterator[int]:
        it = self.start_iter
        global_batch = self.batch_size * self.world_size
        while True:
            base = it * global_batch + self.rank * self.batch_size
            for k in range(self.batch_size):
                index = self._global_index(base + k)
                yield (index, sample_seed(self.seed, base + k)) if self.seeded else index
            it += 1


def build_loader(dataset: Dataset, cfg: TrainConfig, start_iter: int = 0,
                 collate_fn: Callable | None = None) -> DataLoader:
    sampler = IterationSampler(len(dataset), cfg.batch_size, cfg.seed, start_iter,
                               get_rank(), get_world_size(), seeded=True)
    return DataLoader(Seeded(dataset), batch_size=cfg.batch_size, sampler=sampler,
                      num_workers=cfg.num_workers, collate_fn=collate_fn,
                      # page-locked batches: the copy to the GPU runs beside the compute
                      pin_memory=resolve_device(cfg.device).type == "cuda"
                      and torch.cuda.is_available(),
                      persistent_workers=cfg.num_workers > 0,
                      # its own generator: creating the iterator must not consume the
                      # global RNG, or a resumed run's dropout/augmentation would drift
                      generator=torch.Generator().manual_seed(cfg.seed + start_iter))


# --------------------------------------------------------------------------- optimisation


def scale_to_batch(cfg: TrainConfig, world_size: int) -> tuple[TrainConfig, str]:
    """``cfg`` for a run of ``world_size`` processes x ``cfg.batch_size`` images, and one line
    saying what was scaled. With ``cfg.reference_batch`` = R > 0 and a total batch B: lr x B/R;
    max_iters, the step iterations, warm-up, eval and checkpoint periods x R/B (rounded, at
    least 1 where they were), so the images seen at each point of the schedule stay the
    reference's. R = 0 or B = R: ``cfg`` as it is."""
    total = world_size * cfg.batch_size
    ref = cfg.reference_batch
    if ref < 0:
        raise ConfigError(f"train.reference_batch must be >= 0 (0: no scaling), got {ref}")
    if ref == 0:
        return cfg, ""
    if total == ref:
        return cfg, (f"train.reference_batch {ref} = {world_size} process(es) x "
                     f"{cfg.batch_size} images: lr and schedule as configured")
    factor = total / ref

    def iters(n: int) -> int:
        return max(1, round(n / factor)) if n > 0 else n

    schedule = dataclasses.replace(cfg.schedule, warmup_iters=iters(cfg.schedule.warmup_iters),
                                   steps=[iters(s) for s in cfg.schedule.steps])
    scaled = dataclasses.replace(
        cfg, max_iters=iters(cfg.max_iters), eval_period=iters(cfg.eval_period),
        checkpoint_period=iters(cfg.checkpoint_period), schedule=schedule,
        optim=dataclasses.replace(cfg.optim, lr=cfg.optim.lr * factor))
    return scaled, (
        f"train.reference_batch {ref} -> total batch {total} ({world_size} process(es) x "
        f"{cfg.batch_size} images): lr {cfg.optim.lr:g} -> {scaled.optim.lr:g}, max_iters "
        f"{cfg.max_iters} -> {scaled.max_iters}, warm-up {cfg.schedule.warmup_iters} -> "
        f"{schedule.warmup_iters}, steps {list(cfg.schedule.steps)} -> {schedule.steps}")


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas),
                                 weight_decay=cfg.weight_decay)
    raise ValueError(f"train.optim.name: unknown optimizer '{cfg.name}' (valid: sgd, adamw)")


def lr_factor(it: int, cfg: ScheduleConfig, max_iters: int) -> float:
    """Multiplier of the base lr at iteration ``it`` (0-based): linear warm-up, then step,
    cosine or poly (mmseg's: ``(1 - it / max_iters) ** power`` from 1 down to
    ``min_lr_factor``)."""
    t = min(it / max(max_iters, 1), 1.0)
    if cfg.name == "step":
        factor = cfg.gamma ** sum(it >= s for s in cfg.steps)
    elif cfg.name == "cosine":
        factor = cfg.min_lr_factor + (1 - cfg.min_lr_factor) * 0.5 * (1 + math.cos(math.pi * t))
    elif cfg.name == "poly":
        factor = cfg.min_lr_factor + (1 - cfg.min_lr_factor) * (1 - t) ** cfg.power
    else:
        raise ValueError(f"train.schedule.name: unknown schedule '{cfg.name}' "
                         f"(valid: step, cosine, poly)")
    if it < cfg.warmup_iters:
        alpha = it / cfg.warmup_iters
        factor *= cfg.warmup_factor * (1 - alpha) + alpha
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    lr_factor(0, cfg.schedule, cfg.max_iters)  # validate the name now, not mid-run
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(it, cfg.schedule, cfg.max_iters))


# --------------------------------------------------------------------------- checkpoints


def _ckpt_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def last_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint directory, or None."""
    root = _ckpt_root(output_dir)
    pointer = root / "last_checkpoint"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "model.safetensors").is_file() or not (path / "state.pt").is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is incomplete or missing")
    return path


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def _write_failed(what: Path, e: Exception, intact: Path | None) -> CheckpointError:
    why = e.strerror if isinstance(e, OSError) and e.strerror else _one_line(e)
    return CheckpointError(f"cannot write {what}: {why}; the last complete checkpoint "
                           f"({intact if intact else 'none written yet'}) is intact")


def remove_temporaries(output_dir: Path) -> None:
    """Delete what killed runs left half-written (``.<name>...tmp...``) in ``output_dir``,
    its checkpoints/ and eval/; nothing ever reads those."""
    for folder in (output_dir, output_dir / "checkpoints", output_dir / "eval"):
        for stale in folder.glob(".*.tmp*"):
            with contextlib.suppress(OSError):  # a read-only folder fails later, with a message
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()


def save_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """``model``'s weights to ``path`` (safetensors) via a temporary file + fsync + rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_model(unwrap(model), str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise _write_failed(path, e, last_checkpoint(path.parent)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_checkpoint(output_dir, model, optimizer, scheduler, iteration: int, keep: int = 2,
                    extra: dict | None = None) -> Path:
    """Write ``checkpoints/iter_XXXXXXX`` atomically and point ``last_checkpoint`` at it.

    A failed write (disk full, read-only directory) raises :class:`CheckpointError` and
    leaves the previous checkpoint as it was. ``extra``: more state dicts to keep in
    ``state.pt`` (the criterion's, the gradient scaler's), restored by :func:`load_checkpoint`."""
    root = _ckpt_root(output_dir)
    name = f"iter_{iteration:07d}"
    final, tmp = root / name, root / f".{name}.tmp-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        save_model(unwrap(model), str(tmp / "model.safetensors"))
        state = {"iteration": iteration, "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "rng": _rng_state(),
                 "threads": torch.get_num_threads(), **(extra or {})}
        torch.save(state, tmp / "state.pt")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write(root / "last_checkpoint", name + "\n")
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(final, e, last_checkpoint(output_dir)) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    done = sorted(p for p in root.glob("iter_*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_weights(model: torch.nn.Module, path: str | os.PathLike, strict: bool = True) -> None:
    """Load safetensors weights into ``model``; a mismatch names the file and the keys."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    kind = type(unwrap(model)).__name__
    try:  # reads the header only: a pickle (or anything else) is never unpickled
        with safe_open(str(path), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a safetensors checkpoint ({_one_line(e)}); "
                              f"pickled checkpoints are refused") from None
    own = {k: tuple(v.shape) for k, v in unwrap(model).state_dict().items()}
    # an empty buffer (0 rows, e.g. a detector's training names) takes the file's rows
    differ = [k for k in shapes if k in own and shapes[k] != own[k]
              and not (own[k][:1] == (0,) and own[k][1:] == shapes[k][1:])]
    if differ:
        k = differ[0]
        raise CheckpointError(
            f"{path}: does not fit {kind}: {len(differ)} tensors differ in shape, e.g. {k} is "
            f"{shapes[k]} in the file and {own[k]} in the model (another model config, or a "
            f"teacher with another embedding size?)")
    missing, unexpected = load_model(unwrap(model), str(path), strict=False)
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{path}: does not fit {kind}: missing keys "
            f"{sorted(missing)[:3]}, unexpected keys {sorted(unexpected)[:3]}")


def final_weights(output_dir: str | os.PathLike) -> Path:
    """A run's ``model_final.safetensors``, else its last checkpoint's weights."""
    output_dir = Path(output_dir)
    final = output_dir / "model_final.safetensors"
    if final.is_file():
        return final
    last = last_checkpoint(output_dir)
    if last is None:
        raise FileNotFoundError(f"no trained weights in {output_dir}")
    return last / "model.safetensors"


def load_checkpoint(path: Path, model, optimizer=None, scheduler=None,
                    extra: dict | None = None) -> int:
    """Restore a checkpoint directory; returns the iteration it was written at. ``extra``:
    name -> object with ``load_state_dict`` (what :func:`save_checkpoint` kept as ``extra``)."""
    load_weights(model, path)
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - weights_only: a pickle with code is refused here
        raise CheckpointError(f"{path / 'state.pt'}: unreadable training state "
                              f"({_one_line(e)[:150]})") from None
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    for name, obj in (extra or {}).items():
        if name in state:
            obj.load_state_dict(state[name])
    _set_rng_state(state["rng"])
    if state.get("threads", torch.get_num_threads()) != torch.get_num_threads():
        tqdm.write(f"warning: {path} was written with {state['threads']} torch threads, this run "
                   f"has {torch.get_num_threads()}: float sums may differ from an uninterrupted run")
    return int(state["iteration"])


# --------------------------------------------------------------------------- logging


def _record_iter(line: str) -> float:
    """The iteration of a ``metrics.jsonl`` line; inf for a torn one (a kill mid-append)."""
    try:
        return json.loads(line).get("iter", 0)
    except (json.JSONDecodeError, AttributeError):
        return math.inf


class MetricsLog:
    """``metrics.jsonl`` (one JSON record per line) plus TensorBoard scalars; rank 0 only."""

    def __init__(self, output_dir: Path, start_iter: int, enabled: bool = True,
                 tensorboard: bool = True):
        self.enabled = enabled
        self.path = output_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if self.path.exists():  # drop records a killed run wrote after its last checkpoint
            kept = [line for line in self.path.read_text().splitlines()
                    if _record_iter(line) <= start_iter]
            atomic_write(self.path, "".join(line + "\n" for line in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_iter + 1)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k != "iter" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, record["iter"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# --------------------------------------------------------------------------- the loop


def _reduce_losses(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    values = torch.stack([v.detach().float() for v in losses.values()])
    if get_world_size() > 1:
        dist.all_reduce(values)
        values /= get_world_size()
    return dict(zip(losses.keys(), values.tolist(), strict=True))


def train(
    model: torch.nn.Module,
    loss_fn: LossFn,
    dataset: Dataset,
    cfg: TrainConfig,
    output_dir: str | os.PathLike,
    *,
    criterion: torch.nn.Module | None = None,
    collate_fn: Callable | None = None,
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    resume: bool = False,
    tensorboard: bool = True,
    progress: bool = True,
) -> dict[str, float]:
    """Train ``model`` for ``cfg.max_iters`` iterations on ``cfg.device``; returns the last
    evaluation.

    Each batch from the loader is moved to the device (:func:`to_device`: every tensor in
    it), then ``loss_fn(model, batch)`` returns a dict of already-weighted scalar losses,
    summed for the backward pass. ``criterion`` (the module ``loss_fn`` calls, if it holds
    state such as a queue) is moved to the device and checkpointed with the model.
    ``evaluate(model)`` (called on every rank with the unwrapped model in eval mode, on the
    device: each rank scores its :func:`shard` of the val images and every rank gets the
    metrics) returns metrics, logged and written to ``output_dir/metrics.json`` at the end.
    Under a process group the model is wrapped in DDP (``device_ids`` on CUDA);
    ``cfg.amp`` autocasts on CUDA (bf16, or fp16 with a gradient scaler).
    ``cfg.reference_batch`` scales lr and the schedule to this run's total batch
    (:func:`scale_to_batch`, printed at the start).

    Raises :class:`NonFiniteLossError` naming the term and iteration when a loss
    is NaN/inf; nothing is written for that iteration, so the last checkpoint
    stays the last good state.
    """
    output_dir = Path(output_dir)
    rank, world = init_distributed(cfg.device)
    cfg, scaled = scale_to_batch(cfg, world)
    if rank == 0 and scaled:
        tqdm.write(scaled)
    device = resolve_device(cfg.device)
    check_amp(cfg, device)
    seed_all(cfg.seed)  # identical initial weights on every rank
    model.to(device).train()
    if criterion is not None:
        criterion.to(device).train()
    # a criterion's own trainable parts (BARON's pseudo-word map) train with the model
    own = [p for p in criterion.parameters() if p.requires_grad] if criterion is not None else []
    params = [*model.parameters(), *own]
    optimizer = build_optimizer(params, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg)
    dtype = getattr(torch, cfg.amp_dtype)
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and dtype == torch.float16)
    extra = {"scaler": scaler, **({"criterion": criterion} if criterion is not None else {})}

    start_iter = 0
    if resume:
        ckpt = last_checkpoint(output_dir)
        if ckpt is not None:
            start_iter = load_checkpoint(ckpt, model, optimizer, scheduler, extra)
            if criterion is not None:
                criterion.to(device)  # a loaded queue may arrive on the CPU
            if rank == 0:
                tqdm.write(f"resumed from {ckpt} (iteration {start_iter})")
    model = wrap_ddp(model, device)
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_temporaries(output_dir)
    barrier()
    log = MetricsLog(output_dir, start_iter, enabled=rank == 0, tensorboard=tensorboard)

    amp = torch.autocast(device.type, dtype=dtype, enabled=cfg.amp)
    loader = iter(build_loader(dataset, cfg, start_iter, collate_fn))
    bar = tqdm(range(start_iter, cfg.max_iters), initial=start_iter, total=cfg.max_iters,
               disable=not progress or rank != 0, desc="train", dynamic_ncols=True)
    metrics: dict[str, float] = {}
    t_last = time.perf_counter()
    try:
        for it in bar:
            batch = to_device(next(loader), device)
            with amp:
                losses = loss_fn(model, batch)
            values = _reduce_losses(losses)
            for name, value in values.items():
                if not math.isfinite(value):
                    last = last_checkpoint(output_dir)
                    raise NonFiniteLossError(
                        f"loss term '{name}' is {value} at iteration {it + 1}; stopped. "
                        f"Last good checkpoint: {last if last else 'none written yet'}")
            total = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            if own and world > 1:  # DDP averages the model's gradients, not the criterion's
                for p in own:
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad)
                        p.grad /= world
            if cfg.clip_grad_norm > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            done = it + 1

            if done % cfg.log_period == 0 or done == cfg.max_iters:
                now = time.perf_counter()
                record = {"iter": done, "lr": optimizer.param_groups[0]["lr"],
                          "loss": sum(values.values()), **values,
                          "time_per_iter": (now - t_last) / cfg.log_period}
                t_last = now
                log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
            if evaluate is not None and (
                    (cfg.eval_period and done % cfg.eval_period == 0) or done == cfg.max_iters):
                metrics = _evaluate(model, evaluate)
                log.write({"iter": done, **{f"eval/{k}": v for k, v in metrics.items()}})
                if rank == 0 and metrics:
                    tqdm.write(f"iter {done}: " + ", ".join(
                        f"{k}={v:.4f}" for k, v in metrics.items()))
            if done % cfg.checkpoint_period == 0 or done == cfg.max_iters:
                if rank == 0:
                    save_checkpoint(output_dir, model, optimizer, scheduler, done,
                                    cfg.keep_checkpoints,
                                    {k: v.state_dict() for k, v in extra.items()})
                barrier()  # no rank runs ahead of a checkpoint it could be resumed from
    finally:
        bar.close()
        log.close()
    if evaluate is not None and start_iter >= cfg.max_iters:  # resumed a finished run
        metrics = _evaluate(model, evaluate)
    same_buffers(model)  # what every rank evaluates next is the model saved here
    if rank == 0:
        save_weights(model, output_dir / "model_final.safetensors")
        if metrics:
            atomic_write(output_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def same_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers on every rank (nothing in one process). DDP hands rank 0's buffers to
    every rank at the start of each forward, and each rank then updates them from its own
    batch: after the last step the batch-norm running statistics differ per rank, and a
    sharded evaluation would score each shard with another model."""
    if get_world_size() == 1:
        return
    for buffer in unwrap(model).buffers():
        dist.broadcast(buffer, src=0)


def _evaluate(model: torch.nn.Module, evaluate: Callable) -> dict[str, float]:
    """``evaluate`` on every rank (each scores its shard; the metrics reach every rank)."""
    same_buffers(model)
    inner = unwrap(model)
    inner.eval()
    with torch.no_grad():
        metrics = evaluate(inner)
    inner.train()
    return metrics

