"""The detector's training losses, weighted (ViLD, BARON): ``criterion(outputs, targets)``.

Built from the ``loss`` section (:meth:`DetectionCriterion.from_config`); the losses
themselves are the functions of :mod:`distill.losses`, whose docstring lists the keys.

    criterion = DetectionCriterion.from_config(cfg.loss, words=build_bag_words(cfg, teacher))
    losses = criterion(model(images, targets, boxes), {"distill_targets": embeddings})
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from distill.baron import EmbeddingQueue
from distill.config import LossConfig
from distill.losses import (
    MissingOutputError,
    WeightedLosses,
    bag_loss,
    box_regression_loss,
    mask_loss,
    vild_image_loss,
    vild_text_loss,
)


class DetectionCriterion(WeightedLosses):
    """The weighted losses of a ViLD-style student: ``weights`` override :attr:`DEFAULTS`
    (``vild_text``, ``box_reg``, ``vild_image``, ``bag``, ``objectness``, ``rpn_box_reg``,
    ``mask``; the ``loss`` section's defaults); ``mask`` only when the outputs hold the mask
    head's ``mask_logits`` (a student without one trains as before).

    With ``bag`` on (BARON), ``words`` (:class:`distill.baron.PseudoWords`, trained with the
    student and checkpointed with the criterion) makes the student's pseudo-words; in
    training mode each step's bags are queued as negatives after the loss is computed
    (``bag_queue`` of each side, MoCo order); ``bag_temperature`` divides the logits.
    """

    DEFAULTS = {
        "vild_text": 1.0,
        "box_reg": 1.0,
        "vild_image": 0.5,
        "bag": 0.0,  # BARON's bag-of-regions alignment: off unless configured (BARON: 1.0)
        "objectness": 1.0,
        "rpn_box_reg": 1.0,
        "mask": 1.0,  # only for a student with a mask head (OPTIONAL)
    }
    REQUIRED = {
        "vild_text": ("region_embeddings", "labels", "text_embeddings", "background_embedding"),
        "box_reg": ("box_regression", "regression_targets", "labels"),
        "vild_image": ("distill_embeddings", "distill_targets"),
        "bag": ("bag_embeddings", "bag_targets", "bag_groups", "bag_image_ids"),
        "objectness": ("rpn_losses",),
        "rpn_box_reg": ("rpn_losses",),
        "mask": ("mask_logits", "mask_targets"),
    }
    OPTIONAL = frozenset({"mask"})

    def __init__(self, weights: dict[str, float] | None = None, bag_queue: int = 1024,
                 bag_temperature: float = 1 / 30, words: nn.Module | None = None) -> None:
        super().__init__(weights)
        self.bag_temperature = bag_temperature
        self.words = words
        # BARON's queues of past bags, rows [embedding, image id]: student and teacher sides
        self.student_bags = EmbeddingQueue(bag_queue)
        self.teacher_bags = EmbeddingQueue(bag_queue)

    @classmethod
    def from_config(cls, loss: LossConfig, words: nn.Module | None = None
                    ) -> DetectionCriterion:
        """From the ``loss`` section: its weights and its bags' queue and temperature;
        ``words``: the student's pseudo-word module when ``loss.bag`` is on
        (:func:`detectors.recipe.build_bag_words`)."""
        weights = {f.name: getattr(loss, f.name) for f in dataclasses.fields(loss)
                   if f.name in cls.DEFAULTS}
        return cls(weights, bag_queue=loss.bags.queue, bag_temperature=loss.bags.temperature,
                   words=words)

    def require(self, outputs: dict, name: str) -> None:
        super().require(outputs, name)
        if name in ("objectness", "rpn_box_reg") and f"loss_{name}" not in outputs["rpn_losses"]:
            raise MissingOutputError(
                f"loss '{name}' has weight {self.weights[name]} but outputs['rpn_losses'] lacks "
                f"'loss_{name}' (have {sorted(outputs['rpn_losses'])})"
            )

    def compute(self, name: str, outputs: dict) -> Tensor:
        self.require(outputs, name)
        o = outputs
        if name == "vild_text":
            return vild_text_loss(o["region_embeddings"], o["labels"], o["text_embeddings"],
                                  o["background_embedding"], o.get("temperature", 0.01),
                                  o.get("scoring", "softmax"))
        if name == "box_reg":
            return box_regression_loss(o["box_regression"], o["regression_targets"], o["labels"])
        if name == "vild_image":
            return vild_image_loss(o["distill_embeddings"], o["distill_targets"])
        if name == "mask":
            return mask_loss(o["mask_logits"], o["mask_targets"])
        if name == "bag":
            return bag_loss(o["bag_embeddings"], o["bag_targets"], o["bag_groups"],
                            o["bag_image_ids"], self.student_bags.contents(),
                            self.teacher_bags.contents(), self.bag_temperature)
        return o["rpn_losses"][f"loss_{name}"]

    def forward(self, outputs: dict, targets: dict | None = None) -> dict[str, Tensor]:
        losses = super().forward(outputs, targets)
        if "loss_bag" in losses and self.training:
            o = {**outputs, **(targets or {})}
            ids = o["bag_image_ids"].to(o["bag_targets"].dtype)[:, None]
            self.student_bags.enqueue(torch.cat([o["bag_embeddings"].detach(), ids], 1))
            self.teacher_bags.enqueue(torch.cat([o["bag_targets"], ids], 1))
        return losses
