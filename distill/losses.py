"""Training losses for ViLD-style students; they live outside the model.

Each loss is a plain function on tensors; :class:`Criterion` (DETR-style, with a
weight dict) reads the student's training ``outputs`` dict and returns the
weighted losses, so an exported student carries no training code.

``outputs`` keys (R sampled RoIs over the batch, P cached proposals, C training
vocabulary classes, D embedding dim):

- ``region_embeddings`` (R, D) L2-normalised student embeddings (text branch)
- ``labels`` (R,) int64; 0 = background, k in 1..C = vocabulary class k-1
- ``box_regression`` (R, 4) class-agnostic deltas; ``regression_targets`` (R, 4)
- ``text_embeddings`` (C, D) frozen, L2-normalised
- ``background_embedding`` (D,) learned, L2-normalised
- ``temperature`` float or 0-d tensor (default 0.01: logits = cosine x 100)
- ``distill_embeddings`` (P, D) L2-normalised student embeddings (image branch)
- ``distill_targets`` (P, D) L2-normalised teacher embeddings of the same proposals
- ``rpn_losses`` (optional) {``loss_objectness``, ``loss_rpn_box_reg``}: 0-d tensors

Empty inputs (R = 0, P = 0, no foreground RoI) give an exact 0 that stays in the
autograd graph of the inputs (``x.sum() * 0``), never NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DEFAULT_WEIGHTS",
    "Criterion",
    "EmbeddingQueue",
    "MissingOutputError",
    "box_regression_loss",
    "build_criterion",
    "ensemble_scores",
    "region_word_loss",
    "vild_image_loss",
    "vild_text_loss",
]


# --------------------------------------------------------------------------- losses


def _zero(*tensors: Tensor) -> Tensor:
    """An exact 0-d zero connected to the graph of every tensor given (for empty inputs)."""
    return sum(t.sum() * 0.0 for t in tensors)  # type: ignore[return-value]


def vild_text_loss(
    region_embeddings: Tensor,
    labels: Tensor,
    text_embeddings: Tensor,
    background_embedding: Tensor,
    temperature: float | Tensor = 0.01,
) -> Tensor:
    """ViLD-text: softmax cross-entropy over [background, C classes], mean over RoIs.

    region_embeddings (R, D), labels (R,) in 0..C, text_embeddings (C, D),
    background_embedding (D,); logits (R, 1 + C) = [e.bg, e.t_1 .. e.t_C] / temperature.
    Returns a 0-d tensor; R = 0 gives 0.
    """
    classifier = torch.cat([background_embedding[None], text_embeddings], dim=0)
    logits = region_embeddings @ classifier.to(region_embeddings.dtype).t() / temperature
    if labels.numel() == 0:
        return _zero(logits)
    return F.cross_entropy(logits, labels)


def box_regression_loss(
    box_regression: Tensor, regression_targets: Tensor, labels: Tensor, beta: float = 1 / 9
) -> Tensor:
    """torchvision fastrcnn_loss box term: smooth L1 (beta 1/9) summed over positive RoIs
    (labels > 0), divided by the number of RoIs R.

    box_regression (R, 4) class-agnostic deltas, regression_targets (R, 4), labels (R,).
    R = 0 gives 0; R > 0 with no positive gives 0 (the sum over none).
    """
    if labels.numel() == 0:
        return _zero(box_regression)
    pos = labels > 0
    loss = F.smooth_l1_loss(
        box_regression[pos], regression_targets[pos].to(box_regression.dtype),
        beta=beta, reduction="sum",
    )
    return loss / labels.numel()


def vild_image_loss(distill_embeddings: Tensor, distill_targets: Tensor) -> Tensor:
    """ViLD-image: L1 between student and teacher embeddings, summed over D, mean over P.

    distill_embeddings (P, D) student, distill_targets (P, D) teacher (both L2-normalised;
    the targets are detached). P = 0 gives 0.
    """
    if distill_embeddings.shape[0] == 0:
        return _zero(distill_embeddings)
    diff = distill_embeddings - distill_targets.detach().to(distill_embeddings.dtype)
    return diff.abs().sum(dim=-1).mean()


def region_word_loss(
    region_embeddings: Tensor,
    labels: Tensor,
    text_embeddings: Tensor,
    queue: Tensor | None = None,
    temperature: float = 0.02,
) -> Tensor:
    """Region-word InfoNCE (RegionCLIP/BARON): each foreground RoI against its class word.

    For RoIs with labels > 0: logits (F, C + Q) = e . [text_embeddings (C, D); queue (Q, D)]^T
    / temperature, target = label - 1; mean cross-entropy. Negatives are the other
    vocabulary classes and the queued (detached) past teacher region embeddings.
    region_embeddings (R, D), labels (R,). No foreground RoI gives 0.
    """
    keys = text_embeddings if queue is None else torch.cat([text_embeddings, queue.detach()], 0)
    fg = labels > 0
    if not bool(fg.any()):
        return _zero(region_embeddings)
    logits = region_embeddings[fg] @ keys.to(region_embeddings.dtype).t() / temperature
    return F.cross_entropy(logits, labels[fg] - 1)


class EmbeddingQueue(nn.Module):
    """FIFO of the last ``size`` embeddings (detached), as a persistent ring buffer.

    The dimension is taken from the first :meth:`enqueue` (or from a loaded state dict).
    :meth:`contents` returns (n, D), n <= size, oldest first.
    """

    def __init__(self, size: int = 1024, dim: int | None = None) -> None:
        super().__init__()
        if size < 0:
            raise ValueError(f"queue size must be >= 0, got {size}")
        self.size = size
        self.register_buffer("buffer", torch.zeros(size if dim else 0, dim or 0))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # next slot to write
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # filled slots

    def __len__(self) -> int:
        return int(self.count)

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor) -> None:
        """Append embeddings (N, D), dropping the oldest beyond ``size``."""
        if self.size == 0 or embeddings.shape[0] == 0:
            return
        x = embeddings.detach()[-self.size:]
        if self.buffer.shape[0] == 0:
            self.buffer = torch.zeros(self.size, x.shape[1], dtype=torch.float32, device=x.device)
        elif x.shape[1] != self.buffer.shape[1]:
            raise ValueError(f"queue holds {self.buffer.shape[1]}-d embeddings, got {x.shape[1]}-d")
        idx = (int(self.ptr) + torch.arange(x.shape[0], device=x.device)) % self.size
        self.buffer[idx] = x.to(self.buffer)
        self.ptr.fill_((int(self.ptr) + x.shape[0]) % self.size)
        self.count.fill_(min(int(self.count) + x.shape[0], self.size))

    def contents(self) -> Tensor:
        """(n, D) queued embeddings, oldest first."""
        n, p = int(self.count), int(self.ptr)
        if n < self.size:
            return self.buffer[:n]
        return torch.cat([self.buffer[p:], self.buffer[:p]], dim=0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        saved = state_dict.get(prefix + "buffer")
        if saved is not None and saved.shape != self.buffer.shape:  # lazily sized buffer
            self.buffer = torch.zeros_like(saved, device=self.buffer.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# --------------------------------------------------------------------------- criterion


DEFAULT_WEIGHTS: dict[str, float] = {
    "vild_text": 1.0,
    "box_reg": 1.0,
    "vild_image": 0.5,
    "region_word": 0.0,  # off unless configured (BARON single-region weight: 0.1)
    "objectness": 1.0,
    "rpn_box_reg": 1.0,
}

# weight name -> outputs keys it needs
_REQUIRED: dict[str, tuple[str, ...]] = {
    "vild_text": ("region_embeddings", "labels", "text_embeddings", "background_embedding"),
    "box_reg": ("box_regression", "regression_targets", "labels"),
    "vild_image": ("distill_embeddings", "distill_targets"),
    "region_word": ("region_embeddings", "labels", "text_embeddings"),
    "objectness": ("rpn_losses",),
    "rpn_box_reg": ("rpn_losses",),
}


class MissingOutputError(KeyError):
    """A loss with a nonzero weight needs an output the model did not return."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class Criterion(nn.Module):
    """Weighted training losses from the student's ``outputs`` dict (see module doc).

    ``weights`` override :data:`DEFAULT_WEIGHTS` by short name (``vild_text``, ``box_reg``,
    ``vild_image``, ``region_word``, ``objectness``, ``rpn_box_reg``); an unknown name
    raises ``KeyError``. :meth:`forward` returns ``{"loss_<name>": weight * loss}`` for the
    nonzero weights only. In training mode with ``region_word`` on, ``distill_targets`` are
    pushed into the negative queue after the loss is computed (MoCo order).
    """

    def __init__(
        self,
        weights: dict[str, float] | None = None,
        queue_size: int = 1024,
        region_word_temperature: float = 0.02,
    ) -> None:
        super().__init__()
        unknown = sorted(set(weights or {}) - set(DEFAULT_WEIGHTS))
        if unknown:
            raise KeyError(f"unknown loss weight(s) {unknown}; valid: {sorted(DEFAULT_WEIGHTS)}")
        self.weights = {**DEFAULT_WEIGHTS, **(weights or {})}
        self.region_word_temperature = region_word_temperature
        self.queue = EmbeddingQueue(queue_size)

    def _require(self, outputs: dict, name: str) -> None:
        for key in _REQUIRED[name]:
            if key not in outputs:
                raise MissingOutputError(
                    f"loss '{name}' has weight {self.weights[name]} but outputs lack '{key}' "
                    f"(have {sorted(outputs)}); set its weight to 0 or return '{key}'"
                )
        if name in ("objectness", "rpn_box_reg") and f"loss_{name}" not in outputs["rpn_losses"]:
            raise MissingOutputError(
                f"loss '{name}' has weight {self.weights[name]} but outputs['rpn_losses'] lacks "
                f"'loss_{name}' (have {sorted(outputs['rpn_losses'])})"
            )

    def compute(self, name: str, outputs: dict) -> Tensor:
        """The unweighted loss ``name`` (a short weight name) from ``outputs``."""
        self._require(outputs, name)
        o = outputs
        if name == "vild_text":
            return vild_text_loss(o["region_embeddings"], o["labels"], o["text_embeddings"],
                                  o["background_embedding"], o.get("temperature", 0.01))
        if name == "box_reg":
            return box_regression_loss(o["box_regression"], o["regression_targets"], o["labels"])
        if name == "vild_image":
            return vild_image_loss(o["distill_embeddings"], o["distill_targets"])
        if name == "region_word":
            queue = self.queue.contents() if len(self.queue) else None
            return region_word_loss(o["region_embeddings"], o["labels"], o["text_embeddings"],
                                    queue, self.region_word_temperature)
        return o["rpn_losses"][f"loss_{name}"]

    def forward(self, outputs: dict) -> dict[str, Tensor]:
        active = [n for n, w in self.weights.items() if w != 0]
        for name in active:  # fail before computing anything
            self._require(outputs, name)
        if "region_word" in active and self.training and self.queue.size > 0:
            if "distill_targets" not in outputs:
                raise MissingOutputError("loss 'region_word' fills its queue from outputs "
                                         "'distill_targets', which is missing")
        losses = {f"loss_{n}": self.weights[n] * self.compute(n, outputs) for n in active}
        if "region_word" in active and self.training and self.queue.size > 0:
            self.queue.enqueue(outputs["distill_targets"])
        return losses


# --------------------------------------------------------------------------- config


def build_criterion(
    queue_size: int = 1024, region_word_temperature: float = 0.02, distill_per_image: int = 0,
    **weights: float,
) -> Criterion:
    """``build_criterion(**dataclasses.asdict(cfg.loss))``; ``distill_per_image`` is read by
    the training set (how many cached proposals an image contributes), not the criterion."""
    return Criterion(weights, queue_size=queue_size,
                     region_word_temperature=region_word_temperature)


# --------------------------------------------------------------------------- inference


def ensemble_scores(
    text_probs: Tensor, image_probs: Tensor, novel_mask: Tensor, lam: float = 2 / 3
) -> Tensor:
    """ViLD-ensemble scores: base text^lam * image^(1-lam), novel text^(1-lam) * image^lam.

    text_probs, image_probs (N, C) or (N, 1 + C) with background in column 0 (torchvision
    order); novel_mask (C,) bool over the classes. With a background column, the result
    keeps the text branch's background probability there. Returns the shape of text_probs.
    (Used at inference; a pure function, movable to detectors/.)
    """
    if text_probs.shape != image_probs.shape:
        raise ValueError(f"text_probs {tuple(text_probs.shape)} != image_probs "
                         f"{tuple(image_probs.shape)}")
    num_classes = novel_mask.shape[0]
    extra = text_probs.shape[-1] - num_classes
    if extra not in (0, 1):
        raise ValueError(f"probs have {text_probs.shape[-1]} columns; expected C={num_classes} "
                         f"or C+1 with novel_mask of length C")
    t, i = text_probs[..., extra:], image_probs[..., extra:]
    novel = novel_mask.to(device=t.device, dtype=torch.bool)
    w_text = torch.where(novel, 1.0 - lam, lam).to(t.dtype)
    scores = t.pow(w_text) * i.pow(1.0 - w_text)
    if extra:
        scores = torch.cat([text_probs[..., :1], scores], dim=-1)
    return scores
