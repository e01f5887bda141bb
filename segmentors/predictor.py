"""Exported segmenter students for users: load, swap the vocabulary, predict a label map.

    from segmentors import load_student
    student = load_student("segmenter/")
    found = student.predict("photo.jpg")     # labels (H, W) vocabulary indices + names;
                                             # UNLABELLED (-1) where no name reaches the
                                             # export's thresholds.pixel
    found = student.predict("photo.jpg", names="sky,bolt")  # names typed now (--text-encoder)

Needs torch and torchvision only, names typed at run time aside (open_clip's tokenizer and
text transformer, with the export's text tower); weights are read from safetensors, never
unpickled. One student may serve several threads.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import numpy as np
import torch

from distill.export import Vocabulary, as_image_tensor, load_model, vocabulary_for
from distill.text_encoder import TypedNames
from segmentors.builders import build_segmenter
from segmentors.model import UNLABELLED, PixelEmbeddingSegmenter


class SegmenterStudent:
    """An exported student segmenter with its vocabulary."""

    def __init__(self, model: PixelEmbeddingSegmenter, vocabulary: Vocabulary, config: dict,
                 directory: str | os.PathLike | None = None):
        self.model, self.config = model.eval(), config
        self.threshold = float(config.get("thresholds", {}).get("pixel", 0.0))
        self.set_vocabulary(vocabulary)
        self.typed = TypedNames(directory, config, vocabulary)
        self.lock = threading.Lock()  # a vocabulary for one call is set on the shared model

    def set_vocabulary(self, vocabulary: Vocabulary | str | os.PathLike) -> None:
        """Segment with ``vocabulary`` (or a vocabulary directory) from now on."""
        vocabulary = vocabulary_for(self.config, vocabulary)
        self.model.set_vocabulary(vocabulary.embeddings)
        self.vocabulary = vocabulary

    @torch.no_grad()
    def predict(self, image, vocabulary: Vocabulary | str | os.PathLike | None = None,
                threshold: float | None = None, bgr: bool = False,
                names: str | Sequence[str] | None = None) -> dict:
        """``labels`` (H, W) int64 at the image's size: each pixel's best-scoring name (an
        index into the vocabulary), :data:`~segmentors.model.UNLABELLED` (-1) where that
        score is below ``threshold`` ("none of these"; default the export's
        ``thresholds.pixel``, chosen on val; 0 names every pixel); ``names`` (the
        vocabulary's), ``novel`` flags and ``present`` (names found, by area). A name's
        score does not depend on the other names given (distill/scoring.py). ``vocabulary``
        or ``names`` (typed now, embedded by the export's text encoder) apply to this call
        only."""
        vocabulary = self.typed.for_call(vocabulary, names)
        x = as_image_tensor(image, bgr)[None]
        cut = self.threshold if threshold is None else threshold
        with self.lock:
            saved = self.vocabulary
            if vocabulary is not None:
                self.set_vocabulary(vocabulary)
            try:
                vocab = self.vocabulary
                labels = self.model.predict(x.to(self.model.mean.device), cut)[0].cpu().numpy()
            finally:
                if vocabulary is not None:
                    self.set_vocabulary(saved)
        return found_names(labels, vocab)


def found_names(labels: np.ndarray, vocab: Vocabulary) -> dict:
    """``predict``'s result for a label map (H, W) over ``vocab``."""
    counts = np.bincount(labels[labels != UNLABELLED].ravel(), minlength=len(vocab))
    return {"labels": labels, "names": vocab.names, "novel": list(vocab.novel),
            "present": [vocab.names[k] for k in np.argsort(-counts, kind="stable")
                        if counts[k] > 0]}


def load_student(path: str | os.PathLike, device: str | torch.device = "cpu"
                 ) -> SegmenterStudent:
    """An exported segmenter directory (``tools/export.py``) -> :class:`SegmenterStudent` on
    ``device`` (the label maps ``predict`` returns are on the CPU, as numpy)."""
    model, vocabulary, config = load_model(path, "segmentation", build_segmenter, device)
    return SegmenterStudent(model, vocabulary, config, path)
