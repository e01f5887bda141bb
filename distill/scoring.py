"""Scores that mean the same with 3 names or 1000: ``reference`` scoring.

A student trained on a vocabulary keeps those names' text embeddings (its *reference*,
saved with the weights). At test time a name's score for a region or a pixel is its
softmax against the reference (and, for detectors, the learned background) and itself,
the name counted once when it is a reference name:

    p(name) = exp(l_name) / (sum_ref exp(l_ref) [+ exp(l_bg)] + [name not in ref] exp(l_name))

So the score depends on the region, that name and what the student learned, never on the
other names asked for: with 3 names, an object of a fourth class keeps its low score for
them because its own (training) name still competes. A reference name scores exactly as in
a softmax over the training vocabulary. Names are "the same" when their text embeddings'
cosine is at least :data:`SAME_NAME` (a synonym with its own wording is another name).
"""

from __future__ import annotations

import torch
from torch import Tensor

SAME_NAME = 1 - 1e-4


def cosine_logits(embeddings: Tensor, classifier: Tensor, temperature: float | Tensor,
                  maps: bool = False) -> Tensor:
    """``embeddings`` (R, D) -> (R, C), or with ``maps`` (B, D, h, w) -> (B, C, h, w): the dot
    products with ``classifier`` (C, D) over ``temperature``, in float32 also under autocast.
    At ViLD's temperature of 0.01 a logit is 100 x a cosine: a bfloat16 product (8 bits of
    mantissa) would round it by up to 0.4, a float16 one by 0.03."""
    dtype = torch.promote_types(embeddings.dtype, torch.float32)  # float64 stays float64
    with torch.autocast(embeddings.device.type, enabled=False):
        e, c = embeddings.to(dtype), classifier.to(dtype)
        out = torch.einsum("bdhw,cd->bchw", e, c) if maps else e @ c.T
        return out / temperature


def known_names(text: Tensor, reference: Tensor) -> Tensor:
    """(C,) bool: which of ``text`` (C, D) are reference names (``reference`` (A, D), A > 0)."""
    return (text @ reference.T).amax(-1) >= SAME_NAME


def reference_probs(names: Tensor, fixed: Tensor, known: Tensor, dim: int = -1) -> Tensor:
    """Each name's softmax against the ``fixed`` logits and itself, counted once where it is
    ``known`` (already among ``fixed``). ``names`` (..., C, ...) and ``fixed`` (..., A, ...)
    logits along ``dim``; ``known`` (C,) bool. Returns the shape of ``names``."""
    shifted = names - torch.logsumexp(fixed, dim, keepdim=True)
    shape = [1] * names.ndim
    shape[dim] = -1
    known = known.reshape(shape)
    return torch.where(known, torch.exp(shifted), torch.sigmoid(shifted))


def take_rows(module: torch.nn.Module, name: str, state_dict: dict, prefix: str) -> None:
    """Before ``module`` loads ``state_dict``: give its buffer ``name`` (empty in a fresh
    model, e.g. the reference names) the checkpoint's number of rows."""
    incoming, own = state_dict.get(prefix + name), getattr(module, name)
    if incoming is not None and incoming.shape != own.shape:
        setattr(module, name, torch.empty(incoming.shape, dtype=own.dtype, device=own.device))
