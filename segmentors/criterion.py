"""The segmenter's training losses, weighted (MaskCLIP+): ``criterion(outputs, targets)``.

Built from the ``seg`` section (:meth:`SegmentationCriterion.from_config`); the losses
themselves are the functions of :mod:`distill.losses`, whose docstring lists the keys.

    criterion = SegmentationCriterion.from_config(cfg.seg)
    losses = criterion(model(images), {"seg_labels": labels, "dense_targets": dense, ...})
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill.config import ConfigError, SegmenterConfig
from distill.losses import (
    MissingOutputError,
    WeightedLosses,
    pixel_distill_loss,
    pseudo_label_loss,
    supervised_seg_loss,
)

# the loss settings of the ``seg`` section, passed to the criterion by the same names
SETTINGS = ("pixel_distill_mode", "pixel_distill_reduction", "pseudo_label_threshold",
            "pseudo_label_scope", "pseudo_label_upsample")


class SegmentationCriterion(WeightedLosses):
    """The weighted losses of a student segmenter: ``weights`` override :attr:`DEFAULTS`
    (``supervised_seg``, ``pixel_distill``, ``pseudo_label``: the ``seg`` section's
    ``supervised``, ``pixel_distill`` and ``pseudo_label``, base-only by default).

    ``pixel_distill_mode`` ("l1" | "cosine"), ``pixel_distill_reduction`` ("sum" | "mean"
    over D) and ``pseudo_label_threshold`` go to :func:`distill.losses.pixel_distill_loss`
    and :func:`distill.losses.pseudo_label_loss`; ``pseudo_label_upsample`` "bilinear" takes
    the pseudo-labels and the loss at the labels' resolution (MaskCLIP+), "nearest" at the
    student's. ``pseudo_label_scope`` "all" pseudo-labels every pixel over every class
    (MaskCLIP+ without annotations); "unlabeled" only the pixels whose ``seg_labels`` are 255
    or in ``novel_ids``, over the ``novel_ids`` classes (transductive zero-shot: base pixels
    keep their labels).
    """

    DEFAULTS = {"supervised_seg": 1.0, "pixel_distill": 0.0, "pseudo_label": 0.0}
    REQUIRED = {
        "supervised_seg": ("pixel_logits", "seg_labels"),
        "pixel_distill": ("pixel_embeddings", "dense_targets"),
        "pseudo_label": ("pixel_logits", "teacher_pixel_logits"),
    }

    def __init__(self, weights: dict[str, float] | None = None, pixel_distill_mode: str = "l1",
                 pixel_distill_reduction: str = "sum",
                 pseudo_label_threshold: float | None = None, pseudo_label_scope: str = "all",
                 pseudo_label_upsample: str = "nearest") -> None:
        super().__init__(weights)
        for name, value, valid in (("pixel_distill_mode", pixel_distill_mode, ("l1", "cosine")),
                                   ("pixel_distill_reduction", pixel_distill_reduction,
                                    ("sum", "mean")),
                                   ("pseudo_label_scope", pseudo_label_scope, ("all", "unlabeled")),
                                   ("pseudo_label_upsample", pseudo_label_upsample,
                                    ("nearest", "bilinear"))):
            if value not in valid:
                raise ValueError(f"{name} must be '{valid[0]}' or '{valid[1]}', got {value!r}")
        self.pixel_distill_mode = pixel_distill_mode
        self.pixel_distill_reduction = pixel_distill_reduction
        self.pseudo_label_threshold = pseudo_label_threshold
        self.pseudo_label_scope = pseudo_label_scope
        self.pseudo_label_upsample = pseudo_label_upsample

    @classmethod
    def from_config(cls, seg: SegmenterConfig) -> SegmentationCriterion:
        """From the ``seg`` section: its three loss weights and their settings; a bad setting
        raises :class:`distill.config.ConfigError` naming its key."""
        weights = {"supervised_seg": seg.supervised, "pixel_distill": seg.pixel_distill,
                   "pseudo_label": seg.pseudo_label}
        try:
            return cls(weights, **{k: getattr(seg, k) for k in SETTINGS})
        except ValueError as e:
            raise ConfigError(f"seg.{e}") from None

    def compute(self, name: str, outputs: dict) -> Tensor:
        self.require(outputs, name)
        o = outputs
        if name == "supervised_seg":
            return supervised_seg_loss(o["pixel_logits"], o["seg_labels"], o.get("novel_ids", ()))
        if name == "pixel_distill":
            return pixel_distill_loss(o["pixel_embeddings"], o["dense_targets"],
                                      self.pixel_distill_mode, o.get("dense_valid"),
                                      self.pixel_distill_reduction)
        return self.pseudo_labels(o)

    def pseudo_labels(self, o: dict) -> Tensor:
        """The pseudo-label loss over ``pseudo_label_scope``'s pixels and classes."""
        valid = o.get("dense_valid")
        label_size = None
        if self.pseudo_label_upsample == "bilinear":
            if "seg_labels" not in o:
                raise MissingOutputError("pseudo_label_upsample 'bilinear' needs "
                                         "'seg_labels' (the label resolution)")
            label_size = tuple(o["seg_labels"].shape[-2:])
        if self.pseudo_label_scope == "all":
            return pseudo_label_loss(o["pixel_logits"], o["teacher_pixel_logits"],
                                     self.pseudo_label_threshold, unlabeled=valid,
                                     label_size=label_size)
        if "seg_labels" not in o or not len(o.get("novel_ids", ())):
            raise MissingOutputError("pseudo_label_scope 'unlabeled' needs outputs "
                                     "'seg_labels' and a non-empty 'novel_ids'")
        labels, novel = o["seg_labels"], o["novel_ids"]
        unlabeled = (labels == 255) | torch.isin(
            labels, torch.as_tensor(novel, dtype=labels.dtype, device=labels.device))
        if valid is not None:
            unlabeled = unlabeled & valid.to(device=labels.device, dtype=torch.bool)
        return pseudo_label_loss(o["pixel_logits"], o["teacher_pixel_logits"],
                                 self.pseudo_label_threshold, classes=novel,
                                 unlabeled=unlabeled, label_size=label_size)
