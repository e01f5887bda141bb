"""A tiny regression problem for the engine tests (also run under torchrun)."""

from __future__ import annotations

import sys

import torch
from torch.utils.data import Dataset

from distill.config import TrainConfig


class Points(Dataset):
    """y = x @ w_true + noise, 64 samples of 8 features."""

    def __init__(self, n: int = 64):
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x @ torch.randn(8, 1, generator=g) + 0.01 * torch.randn(n, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    # dropout makes the run depend on the global RNG, which resume must restore
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                               torch.nn.Linear(16, 1))


def mse(model, batch):
    x, y = batch
    return {"loss_mse": torch.nn.functional.mse_loss(model(x), y)}


def small_cfg(**kw) -> TrainConfig:
    cfg = TrainConfig(max_iters=20, batch_size=4, checkpoint_period=5, log_period=5,
                      keep_checkpoints=3)
    cfg.optim.lr = 0.01
    cfg.schedule.warmup_iters = 3
    cfg.schedule.name = "cosine"
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


if __name__ == "__main__":  # torchrun --nproc_per_node 2 tests/engine_fixtures.py OUT BATCH
    from safetensors.torch import save_model

    from distill.engine import get_rank, train

    out, batch = sys.argv[1], int(sys.argv[2])
    model = make_model()
    cfg = small_cfg(batch_size=batch)
    cfg.optim.name = "sgd"
    cfg.optim.momentum = 0.0
    cfg.optim.weight_decay = 0.0
    model[2].p = 0.0  # no dropout: compare against a single process with the global batch
    train(model, mse, Points(), cfg, out, tensorboard=False, progress=False)
    save_model(model.module if hasattr(model, "module") else model,
               f"{out}/rank{get_rank()}.safetensors")
