"""Training losses of ViLD-style students and student segmenters, as plain functions on
tensors, and :class:`WeightedLosses`, what each task's criterion shares: the detector's
(:class:`detectors.criterion.DetectionCriterion`: ViLD-text, ViLD-image, box, mask, RPN,
BARON's bags) and the segmenter's (:class:`segmentors.criterion.SegmentationCriterion`:
MaskCLIP+'s pixel distillation and pseudo-labels, the supervised base-class loss). A
criterion is called as ``criterion(outputs, targets)`` and returns the weighted losses, so
an exported student carries no training code. ``outputs`` is what the model computes, the
RoI labels and regression targets its own sampler drew included (as in torchvision);
``targets`` is what comes from the data or the teacher: cached teacher region embeddings
(``distill_targets``), dense targets, pseudo-label logits, label maps. A key may come from
either, never both.

Keys (R sampled RoIs over the batch, P cached proposals, C training vocabulary classes,
D embedding dim):

- ``region_embeddings`` (R, D) L2-normalised student embeddings (text branch)
- ``labels`` (R,) int64; 0 = background, k in 1..C = vocabulary class k-1
- ``box_regression`` (R, 4) class-agnostic deltas; ``regression_targets`` (R, 4)
- ``text_embeddings`` (C, D) frozen, L2-normalised
- ``background_embedding`` (D,) learned, L2-normalised
- ``temperature`` float or 0-d tensor (default 0.01: logits = cosine x 100)
- ``distill_embeddings`` (P, D) L2-normalised student embeddings (image branch)
- ``distill_targets`` (P, D) L2-normalised teacher embeddings of the same proposals
- ``rpn_losses`` (optional) {``loss_objectness``, ``loss_rpn_box_reg``}: 0-d tensors
- ``mask_logits`` (M, 1, S, S) class-agnostic mask logits of the M positive RoIs and
  ``mask_targets`` (M, S, S) their matched ground-truth masks cropped and resized to the
  RoI (in [0, 1]); only a student with a mask head returns them
- ``bag_embeddings`` (S, D) L2-normalised: the text tower's reading of the student's
  pseudo-words of S bags of regions (BARON, :mod:`distill.baron`); ``bag_targets`` (S, D)
  the teacher's embeddings of their enclosing boxes; ``bag_groups`` (S,) int64, bags with
  the same enclosing box share a group (none is the other's negative); ``bag_image_ids``
  (S,) the image of each bag (queued bags of that image are no negatives)

Segmenters (B images; student maps h x w, teacher maps and labels H x W; MaskCLIP+):

- ``pixel_embeddings`` (B, D, h, w) L2-normalised student pixel embeddings
- ``dense_targets`` (B, D, H, W) teacher dense embeddings (resized and normalised in the loss)
- ``dense_valid`` (optional) (B, H, W) bool, the image's pixels (False: padding), the only
  ones the pixel distillation and the pseudo-labels use
- ``pixel_logits`` (B, C, h, w) student per-pixel text logits
- ``teacher_pixel_logits`` (B, C, H, W) teacher dense text logits (pseudo-labels)
- ``seg_labels`` (B, H, W) int64 ground truth, 255 = ignore
- ``novel_ids`` (optional) class ids in 0..C-1 whose labels count as unlabelled

Empty inputs (R = 0, P = 0, no foreground RoI, no valid or labelled pixel) give an
exact 0 that stays in the autograd graph of the inputs (``x.sum() * 0``), never NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.scoring import cosine_logits

__all__ = [
    "MissingOutputError",
    "WeightedLosses",
    "bag_loss",
    "box_regression_loss",
    "mask_loss",
    "pixel_distill_loss",
    "pseudo_label_loss",
    "supervised_seg_loss",
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
    scoring: str = "softmax",
) -> Tensor:
    """ViLD-text: softmax cross-entropy over [background, C classes], mean over RoIs.

    region_embeddings (R, D), labels (R,) in 0..C, text_embeddings (C, D),
    background_embedding (D,); logits (R, 1 + C) = [e.bg, e.t_1 .. e.t_C] / temperature.
    ``scoring="pairwise"`` (``model.scoring``): each class name against the background alone,
    binary cross-entropy on (e.t_c - e.bg) / temperature (1 for the RoI's class, 0 for the
    others; background RoIs 0 everywhere), summed over the C classes and averaged over the
    RoIs (Detic's sigmoid loss). Returns a 0-d tensor; R = 0 gives 0.
    """
    classifier = torch.cat([background_embedding[None], text_embeddings], dim=0)
    logits = cosine_logits(region_embeddings, classifier, temperature)  # float32 under amp
    if labels.numel() == 0:
        return _zero(logits)
    if scoring == "pairwise":
        targets = F.one_hot(labels, logits.shape[1])[:, 1:].to(logits.dtype)
        pairs = logits[:, 1:] - logits[:, :1]
        return F.binary_cross_entropy_with_logits(pairs, targets, reduction="sum") / len(labels)
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


def mask_loss(mask_logits: Tensor, mask_targets: Tensor) -> Tensor:
    """torchvision maskrcnn_loss, class-agnostic: per-pixel binary cross-entropy (with
    logits) of the single channel against the RoI's resized ground-truth mask, mean over
    the M positive RoIs and S x S pixels.

    mask_logits (M, 1, S, S), mask_targets (M, S, S) in [0, 1] (detached). M = 0 gives 0.
    """
    if mask_logits.shape[0] == 0:
        return _zero(mask_logits)
    return F.binary_cross_entropy_with_logits(
        mask_logits[:, 0], mask_targets.detach().to(mask_logits.dtype))


def vild_image_loss(distill_embeddings: Tensor, distill_targets: Tensor) -> Tensor:
    """ViLD-image: L1 between student and teacher embeddings, summed over D, mean over P.

    distill_embeddings (P, D) student, distill_targets (P, D) teacher (both L2-normalised;
    the targets are detached). P = 0 gives 0.
    """
    if distill_embeddings.shape[0] == 0:
        return _zero(distill_embeddings)
    diff = distill_embeddings - distill_targets.detach().to(distill_embeddings.dtype)
    return diff.abs().sum(dim=-1).mean()


def bag_loss(
    student: Tensor,
    teacher: Tensor,
    groups: Tensor,
    image_ids: Tensor,
    student_queue: Tensor | None = None,
    teacher_queue: Tensor | None = None,
    temperature: float = 1 / 30,
) -> Tensor:
    """BARON's bag-of-regions loss: a symmetric InfoNCE between the student's bag embeddings
    and the teacher's embeddings of the same bags' enclosing boxes.

    student (S, D) and teacher (S, D) (detached) L2-normalised, row i the same bag. Student
    queries: logits (S, S + Q) = student . [teacher; teacher_queue]^T / temperature, target
    i; teacher queries the same against [student; student_queue]; the loss is the mean of
    the two cross-entropies. Not negatives (logit -inf): another bag of the same ``groups``
    id (the same boxes read in another order), and a queued bag of the query's image
    (``image_ids``). Queues are (Q, D + 1) rows [embedding, image id], detached (BARON's
    1024 of each side). S = 0 gives 0.
    """
    if student.shape[0] == 0:
        return _zero(student)
    teacher = teacher.detach().to(student.dtype)
    same = groups[:, None] == groups[None]
    same.fill_diagonal_(False)
    target = torch.arange(student.shape[0], device=student.device)

    def one_side(queries: Tensor, keys: Tensor, queue: Tensor | None) -> Tensor:
        logits = (queries @ keys.t() / temperature).masked_fill(same, float("-inf"))
        if queue is not None and queue.shape[0]:
            queue = queue.detach().to(queries.dtype)
            queued = (queries @ queue[:, :-1].t() / temperature).masked_fill(
                image_ids.to(queue.dtype)[:, None] == queue[None, :, -1], float("-inf"))
            logits = torch.cat([logits, queued], dim=1)
        return F.cross_entropy(logits, target)

    return 0.5 * one_side(student, teacher, teacher_queue) + \
        0.5 * one_side(teacher, student, student_queue)


def _resize_nearest(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """maps (B, H, W) of labels or flags -> (B, h, w) of the same dtype, nearest neighbour."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    resized = F.interpolate(maps[:, None].float(), size=size, mode="nearest")[:, 0]
    return resized.to(maps.dtype)


def _check_ignore_index(ignore_index: int, num_classes: int) -> None:
    if 0 <= ignore_index < num_classes:
        raise ValueError(f"ignore_index {ignore_index} is a class id (C = {num_classes})")


def pixel_distill_loss(
    student: Tensor, teacher: Tensor, mode: str = "l1", valid: Tensor | None = None,
    reduction: str = "sum",
) -> Tensor:
    """Dense distillation (MaskCLIP+): student pixel embeddings against the teacher's.

    student (B, D, h, w) L2-normalised; teacher (B, D, H, W), detached, resized to (h, w)
    (bilinear, align_corners=False) then L2-normalised along D. mode "l1": L1 over D,
    ``reduction`` "sum" (as :func:`vild_image_loss`) or "mean" (MaskCLIP+'s distillation
    variant, D times weaker); "cosine": 1 - cosine similarity. Mean over pixels;
    valid (B, H', W') bool (resized to (h, w), nearest) keeps only its True pixels.
    No valid pixel gives 0.
    """
    if mode not in ("l1", "cosine"):
        raise ValueError(f"mode must be 'l1' or 'cosine', got {mode!r}")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if student.dim() != 4 or teacher.dim() != 4 or student.shape[:2] != teacher.shape[:2]:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
                         "must be (B, D, h, w) and (B, D, H, W)")
    size = (student.shape[-2], student.shape[-1])
    if student.numel() == 0:
        return _zero(student)
    target = teacher.detach().to(student.dtype)
    if tuple(target.shape[-2:]) != size:
        target = F.interpolate(target, size=size, mode="bilinear", align_corners=False)
    target = F.normalize(target, dim=1)
    if mode == "l1":
        dist = (student - target).abs()
        dist = dist.sum(dim=1) if reduction == "sum" else dist.mean(dim=1)
    else:
        dist = 1.0 - F.cosine_similarity(student, target, dim=1)
    if valid is None:
        return dist.mean()
    if valid.dim() != 3 or valid.shape[0] != student.shape[0]:
        raise ValueError(f"valid {tuple(valid.shape)} must be (B, H, W) with B = {student.shape[0]}")
    mask = _resize_nearest(valid.to(device=dist.device, dtype=torch.bool), size)
    if not bool(mask.any()):
        return _zero(student)
    return dist[mask].mean()


def pseudo_label_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    threshold: float | None = None,
    ignore_index: int = 255,
    classes: Sequence[int] | None = None,
    unlabeled: Tensor | None = None,
    label_size: tuple[int, int] | None = None,
) -> Tensor:
    """MaskCLIP+ pseudo-label cross-entropy.

    teacher_logits (B, C, H, W), detached: labels = argmax over C (over the class indices
    ``classes`` only, when given); pixels whose max softmax probability (over the same
    classes) is below ``threshold`` get ``ignore_index``.

    - ``label_size`` None: the argmax at the teacher's (H, W), the label map resized to the
      student's (h, w) with nearest, the loss there.
    - ``label_size`` (H', W') (MaskCLIP+): the teacher's logits upsampled bilinearly
      (align_corners=False) to it, the argmax there, and the student's logits upsampled
      bilinearly to it too: the loss at label resolution.

    ``unlabeled`` (B, H', W') bool, any resolution (nearest to the loss's), keeps
    pseudo-labels only where it is true: the image's pixels (padding left out), or the
    transductive zero-shot recipe (ZS5Net, MaskCLIP+'s zero-shot setting), which gives the
    pixels without a base-class label the teacher's best novel class. student_logits
    (B, C, h, w); mean cross-entropy over the labelled pixels. No labelled pixel gives 0.
    """
    if (student_logits.dim() != 4 or teacher_logits.dim() != 4
            or student_logits.shape[:2] != teacher_logits.shape[:2]):
        raise ValueError(f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} must be (B, C, h, w) and (B, C, H, W)")
    _check_ignore_index(ignore_index, student_logits.shape[1])
    if label_size is not None:
        size = (int(label_size[0]), int(label_size[1]))
        if tuple(student_logits.shape[-2:]) != size:
            student_logits = F.interpolate(student_logits, size=size, mode="bilinear",
                                           align_corners=False)
    size = (student_logits.shape[-2], student_logits.shape[-1])
    with torch.no_grad():
        t = teacher_logits.detach().float()
        if label_size is not None and tuple(t.shape[-2:]) != size:
            t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
        index = None
        if classes is not None:
            index = torch.as_tensor(classes, dtype=torch.long, device=t.device).reshape(-1)
            if not index.numel() or bool(((index < 0) | (index >= t.shape[1])).any()):
                raise ValueError(f"pseudo-label classes {index.tolist()} must be a non-empty "
                                 f"subset of 0..{t.shape[1] - 1}")
            t = t[:, index]
        labels = t.argmax(dim=1)
        if threshold is not None:
            labels[t.softmax(dim=1).amax(dim=1) < threshold] = ignore_index
        if index is not None:
            labels = torch.where(labels == ignore_index, ignore_index,
                                 index[labels.clamp(max=len(index) - 1)])
        labels = _resize_nearest(labels, size).to(student_logits.device)
        if unlabeled is not None:
            if unlabeled.dim() != 3 or unlabeled.shape[0] != labels.shape[0]:
                raise ValueError(f"unlabeled {tuple(unlabeled.shape)} must be (B, H, W) with "
                                 f"B = {labels.shape[0]}")
            keep = _resize_nearest(unlabeled.to(device=labels.device, dtype=torch.bool), size)
            labels = torch.where(keep, labels, ignore_index)
    if not bool((labels != ignore_index).any()):
        return _zero(student_logits)
    return F.cross_entropy(student_logits, labels, ignore_index=ignore_index)


def supervised_seg_loss(
    logits: Tensor, labels: Tensor, novel_ids: Sequence[int] = (), ignore_index: int = 255
) -> Tensor:
    """Cross-entropy on base classes: labels of ``novel_ids`` count as unlabelled.

    logits (B, C, h, w), upsampled to the labels' (H, W) (bilinear, align_corners=False,
    as mmseg does); labels (B, H, W) int64 in 0..C-1 or ``ignore_index``. Mean over the
    labelled pixels; none gives 0.
    """
    if logits.dim() != 4 or labels.dim() != 3 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} "
                         "must be (B, C, h, w) and (B, H, W)")
    _check_ignore_index(ignore_index, logits.shape[1])
    labels = labels.to(device=logits.device, dtype=torch.long)
    novel = torch.as_tensor(novel_ids, dtype=torch.long, device=labels.device).reshape(-1)
    if novel.numel():
        labels = torch.where(torch.isin(labels, novel), ignore_index, labels)
    if not bool((labels != ignore_index).any()):
        return _zero(logits)
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits, labels, ignore_index=ignore_index)


# --------------------------------------------------------------------------- weighting


class MissingOutputError(KeyError):
    """A loss with a nonzero weight needs an output the model did not return."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class WeightedLosses(nn.Module):
    """What both tasks' criteria share (DETR's ``SetCriterion`` with its weight dict): a
    subclass names its losses in ``DEFAULTS`` (name -> weight, in the order they are summed),
    the output keys each needs in ``REQUIRED``, the losses of optional heads in ``OPTIONAL``
    (skipped, whatever the weight, when the outputs lack their first key), and computes one
    unweighted loss in :meth:`compute`. ``weights`` override ``DEFAULTS`` by name; an unknown
    name raises ``KeyError``. ``criterion(outputs, targets)`` checks every active loss's keys
    before computing any and returns ``{"loss_<name>": weight * loss}`` for the nonzero
    weights.
    """

    DEFAULTS: ClassVar[dict[str, float]] = {}
    REQUIRED: ClassVar[dict[str, tuple[str, ...]]] = {}
    OPTIONAL: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, weights: dict[str, float] | None = None) -> None:
        super().__init__()
        unknown = sorted(set(weights or {}) - set(self.DEFAULTS))
        if unknown:
            raise KeyError(f"unknown loss weight(s) {unknown}; valid: {sorted(self.DEFAULTS)}")
        self.weights = {**self.DEFAULTS, **(weights or {})}

    def require(self, outputs: dict, name: str) -> None:
        """Raise :class:`MissingOutputError` when ``outputs`` lack a key loss ``name`` needs."""
        for key in self.REQUIRED[name]:
            if key not in outputs:
                raise MissingOutputError(
                    f"loss '{name}' has weight {self.weights[name]} but outputs lack '{key}' "
                    f"(have {sorted(outputs)}); set its weight to 0 or return '{key}'"
                )

    def compute(self, name: str, outputs: dict) -> Tensor:
        """The unweighted loss ``name`` from ``outputs`` (model outputs and targets)."""
        raise NotImplementedError

    def active(self, outputs: dict) -> list[str]:
        """The losses to compute: nonzero weight, and the optional heads' only when present."""
        return [n for n, w in self.weights.items()
                if w != 0 and not (n in self.OPTIONAL and self.REQUIRED[n][0] not in outputs)]

    def forward(self, outputs: dict, targets: dict | None = None) -> dict[str, Tensor]:
        both = sorted(set(outputs) & set(targets or {}))
        if both:
            raise ValueError(f"{both} given both as model outputs and as targets")
        outputs = {**outputs, **(targets or {})}
        active = self.active(outputs)
        for name in active:  # fail before computing anything
            self.require(outputs, name)
        return {f"loss_{n}": self.weights[n] * self.compute(n, outputs) for n in active}
