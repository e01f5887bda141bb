"""Student segmenters: a ResNet/FPN backbone and a per-pixel embedding head.

The head fuses the FPN maps (each upsampled to the finest, summed: semantic-FPN
style), then 3x3 conv -> GroupNorm -> ReLU -> 1x1 conv to the teacher's dimension
D, L2-normalised per pixel. The classifier is the text embeddings of the current
vocabulary: logits = cosine / temperature, so any list of names can be segmented
at test time (:meth:`PixelEmbeddingSegmenter.set_vocabulary`).

    model = build_segmenter("seg_r18_fpn", embed_dim=128)
    model.set_vocabulary(teacher.text(names))
    out = model(images)              # images (B, 3, H, W) uint8 or float in [0, 1]
    out["pixel_embeddings"]          # (B, D, H/8, W/8), out["pixel_logits"] (B, C, H/8, W/8)
    labels = model.predict(images)   # (B, H, W) int64 vocabulary indices
    labels = model.predict(images, threshold=0.5)  # UNLABELLED (-1) where no name reaches 0.5

A trained segmenter keeps its training names (``reference_embeddings``, saved with the
weights): a pixel's score for a name is its softmax against them and itself
(distill/scoring.py), so it does not depend on the other names given, and a pixel whose
best name scores below a threshold is left unlabelled ("none of these").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.scoring import cosine_logits, known_names, reference_probs, take_rows

UNLABELLED = -1  # predict()'s label of a pixel no name reaches the threshold on


class PixelEmbeddingSegmenter(nn.Module):
    """Backbone (FPN maps '0', '1', ... finest first, ``out_channels`` each) + embedding head."""

    def __init__(self, backbone: nn.Module, embed_dim: int, temperature: float = 0.05,
                 hidden: int = 128, image_mean=(0.485, 0.456, 0.406),
                 image_std=(0.229, 0.224, 0.225)):
        super().__init__()
        c = backbone.out_channels
        self.backbone, self.temperature = backbone, temperature
        self.head = nn.Sequential(nn.Conv2d(c, hidden, 3, padding=1, bias=False),
                                  nn.GroupNorm(min(32, hidden // 8), hidden), nn.ReLU(inplace=True),
                                  nn.Conv2d(hidden, embed_dim, 1))
        self.register_buffer("mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("text_embeddings", torch.zeros(0, embed_dim), persistent=False)
        # the training vocabulary (A, D), saved with the weights (set_training_vocabulary)
        self.register_buffer("reference_embeddings", torch.zeros(0, embed_dim))

    @property
    def embed_dim(self) -> int:
        return self.head[-1].out_channels

    def set_vocabulary(self, text_embeddings: Tensor) -> None:
        """Classify with ``text_embeddings`` (C, D) (normalised here) from now on."""
        if text_embeddings.ndim != 2 or text_embeddings.shape[1] != self.embed_dim:
            raise ValueError(f"text embeddings of shape {tuple(text_embeddings.shape)} do not fit "
                             f"a segmenter of embedding dimension {self.embed_dim}")
        if len(text_embeddings) == 0:
            raise ValueError("the vocabulary is empty")
        self.text_embeddings = F.normalize(text_embeddings.detach().float(), dim=-1).to(
            self.mean.device)

    def set_training_vocabulary(self, text_embeddings: Tensor) -> None:
        """Train on ``text_embeddings`` (C, D): the vocabulary, and the reference names every
        name is scored against from now on (saved with the weights)."""
        self.set_vocabulary(text_embeddings)
        self.reference_embeddings = self.text_embeddings.clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        take_rows(self, "reference_embeddings", state_dict, prefix)  # any number of names
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """images (B, 3, H, W) -> ``pixel_embeddings`` (B, D, h, w) and ``pixel_logits``
        (B, C, h, w) at the finest FPN stride, plus ``temperature``."""
        if len(self.text_embeddings) == 0:
            raise ValueError("no vocabulary set: call set_vocabulary(text_embeddings) first")
        x = images.float() / 255 if images.dtype == torch.uint8 else images
        x = (x - self.mean) / self.std
        maps = [v for k, v in self.backbone(x).items() if k != "pool"]
        size = maps[0].shape[-2:]
        fused = maps[0]
        for m in maps[1:]:
            fused = fused + F.interpolate(m, size=size, mode="bilinear", align_corners=False)
        emb = F.normalize(self.head(fused), dim=1)
        logits = cosine_logits(emb, self.text_embeddings, self.temperature, maps=True)
        return {"pixel_embeddings": emb, "pixel_logits": logits, "temperature": self.temperature}

    def score_logits(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, C + A, h, w): the vocabulary's logits, then the reference
        names' (what :meth:`name_scores` takes, after any resizing)."""
        out = self(images)
        reference = cosine_logits(out["pixel_embeddings"], self.reference_embeddings,
                                  self.temperature, maps=True)
        return torch.cat([out["pixel_logits"], reference], 1)

    def name_scores(self, logits: Tensor) -> Tensor:
        """(B, C + A, H, W) logits of :meth:`score_logits` -> (B, C, H, W) scores: each
        vocabulary name's softmax against the reference names and itself (a segmenter without
        reference names: the softmax over the vocabulary)."""
        c = len(self.text_embeddings)
        names, reference = logits[:, :c], logits[:, c:]
        if reference.shape[1] == 0:
            return names.softmax(1)
        return reference_probs(names, reference,
                               known_names(self.text_embeddings, self.reference_embeddings), 1)

    @torch.no_grad()
    def predict(self, images: Tensor, threshold: float = 0.0) -> Tensor:
        """(B, 3, H, W) -> (B, H, W) int64 vocabulary indices: the best-scoring name of each
        pixel (logits upsampled bilinearly to the input), :data:`UNLABELLED` where its score
        is below ``threshold``."""
        logits = F.interpolate(self.score_logits(images), size=images.shape[-2:],
                               mode="bilinear", align_corners=False)
        return labels_at(self.name_scores(logits), threshold)


def labels_at(scores: Tensor, threshold: float | Tensor) -> Tensor:
    """(B, C, H, W) name scores -> (B, H, W) int64: the best name, :data:`UNLABELLED` where
    its score is below ``threshold``."""
    best, labels = scores.max(1)
    return torch.where(best >= threshold, labels, torch.full_like(labels, UNLABELLED))
