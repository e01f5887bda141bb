"""Exported segmenter students for users: load, swap the vocabulary, predict a label map.

    from segmentors import load_student
    student = load_student("segmenter/")
    found = student.predict("photo.jpg")     # labels (H, W) vocabulary indices + names

Needs torch and torchvision only; weights are read from safetensors, never unpickled.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from detectors.predictor import as_image_tensor
from distill.export import ExportError, Vocabulary, read_student
from segmentors import build_segmenter
from segmentors.model import PixelEmbeddingSegmenter


class SegmenterStudent:
    """An exported student segmenter with its vocabulary."""

    def __init__(self, model: PixelEmbeddingSegmenter, vocabulary: Vocabulary, config: dict):
        self.model, self.config = model.eval(), config
        self.set_vocabulary(vocabulary)

    def set_vocabulary(self, vocabulary: Vocabulary | str | os.PathLike) -> None:
        """Segment with ``vocabulary`` (or a vocabulary directory) from now on."""
        if not isinstance(vocabulary, Vocabulary):
            vocabulary = Vocabulary.load(vocabulary)
        want = self.config.get("teacher", {}).get("fingerprint")
        if want and vocabulary.teacher_fingerprint and vocabulary.teacher_fingerprint != want:
            raise ExportError(f"vocabulary embedded by teacher {vocabulary.teacher_fingerprint}, "
                              f"student distilled from teacher {want}: re-embed the names with "
                              f"tools/export.py --vocabulary")
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
            labels = self.model.predict(as_image_tensor(image, bgr)[None])[0].numpy()
        finally:
            if vocabulary is not None:
                self.set_vocabulary(saved)
        counts = np.bincount(labels.ravel(), minlength=len(vocab))
        return {"labels": labels, "names": vocab.names, "novel": list(vocab.novel),
                "present": [vocab.names[k] for k in np.argsort(-counts) if counts[k] > 0]}


def load_student(path: str | os.PathLike) -> SegmenterStudent:
    """An exported segmenter directory (``tools/export.py``) -> :class:`SegmenterStudent`."""
    config, state, vocabulary = read_student(path)
    if config.get("task") != "segmentation":
        raise ExportError(f"{Path(path) / 'config.json'}: task {config.get('task')!r}, "
                          f"not a segmenter (detectors.load_student reads detectors)")
    model = build_segmenter(**config["model"], embed_dim=int(config["embed_dim"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(f"{Path(path) / 'model.safetensors'}: does not fit "
                          f"{config['model'].get('name')}: missing {sorted(missing)[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]}")
    return SegmenterStudent(model, vocabulary, config)
