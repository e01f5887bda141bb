"""Exported segmenter students for users: load, swap the vocabulary, predict a label map.

    from segmentors import load_student
    student = load_student("segmenter/")
    found = student.predict("photo.jpg")     # labels (H, W) vocabulary indices + names

Needs torch and torchvision only; weights are read from safetensors, never unpickled.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from distill.export import Vocabulary, as_image_tensor, load_model, vocabulary_for
from segmentors import build_segmenter
from segmentors.model import PixelEmbeddingSegmenter


class SegmenterStudent:
    """An exported student segmenter with its vocabulary."""

    def __init__(self, model: PixelEmbeddingSegmenter, vocabulary: Vocabulary, config: dict):
        self.model, self.config = model.eval(), config
        self.set_vocabulary(vocabulary)

    def set_vocabulary(self, vocabulary: Vocabulary | str | os.PathLike) -> None:
        """Segment with ``vocabulary`` (or a vocabulary directory) from now on."""
        vocabulary = vocabulary_for(self.config, vocabulary)
        self.model.set_vocabulary(vocabulary.embeddings)
        self.vocabulary = vocabulary

    @torch.no_grad()
    def predict(self, image, vocabulary: Vocabulary | str | os.PathLike | None = None,
                bgr: bool = False) -> dict:
        """``labels`` (H, W) int64 indices into the vocabulary at the image's size, ``names``
        (the vocabulary's), ``novel`` flags and ``present`` (names found, by area)."""
        saved = self.vocabulary
        if vocabulary is not None:
            self.set_vocabulary(vocabulary)
        try:
            vocab = self.vocabulary
            x = as_image_tensor(image, bgr)[None].to(self.model.mean.device)
            labels = self.model.predict(x)[0].cpu().numpy()
        finally:
            if vocabulary is not None:
                self.set_vocabulary(saved)
        counts = np.bincount(labels.ravel(), minlength=len(vocab))
        return {"labels": labels, "names": vocab.names, "novel": list(vocab.novel),
                "present": [vocab.names[k] for k in np.argsort(-counts) if counts[k] > 0]}


def load_student(path: str | os.PathLike, device: str | torch.device = "cpu"
                 ) -> SegmenterStudent:
    """An exported segmenter directory (``tools/export.py``) -> :class:`SegmenterStudent` on
    ``device`` (the label maps ``predict`` returns are on the CPU, as numpy)."""
    model, vocabulary, config = load_model(path, "segmentation", build_segmenter, device)
    return SegmenterStudent(model, vocabulary, config)
