"""ONNX export of an exported segmenter, and an ONNX Runtime predictor.

The graph takes ``image`` (1, 3, H, W) float32 in [0, 1] (any H, W),
``text_embeddings`` (C, D) and ``threshold`` (a float32 scalar), and returns ``labels``
(1, H, W) int64: the student's per-pixel name scores (logits upsampled bilinearly to the
image; the training names baked in), the best name per pixel, -1 where its score is below
the threshold, as :meth:`SegmenterStudent.predict` does.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distill.export import ONNX_OPSET, Vocabulary, as_image_tensor, onnx_session
from distill.text_encoder import TypedNames
from segmentors.model import labels_at
from segmentors.predictor import SegmenterStudent, found_names, load_student


class _Graph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, text_embeddings: torch.Tensor,
                threshold: torch.Tensor) -> torch.Tensor:
        m = self.model
        m.text_embeddings = F.normalize(text_embeddings, dim=-1)
        logits = F.interpolate(m.score_logits(image), size=image.shape[-2:], mode="bilinear",
                               align_corners=False)
        return labels_at(m.name_scores(logits), threshold)


def export_onnx(student: SegmenterStudent, path: str | os.PathLike) -> Path:
    """Write the segmenter's graph to ``path`` (atomically)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    model = student.model.eval()
    saved = model.text_embeddings
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_Graph(model).eval(),
                              (torch.zeros(1, 3, 96, 96), student.vocabulary.embeddings.float(),
                               torch.tensor(0.5)),
                              str(tmp), dynamo=False, opset_version=ONNX_OPSET,
                              input_names=["image", "text_embeddings", "threshold"],
                              output_names=["labels"],
                              dynamic_axes={"image": {2: "height", 3: "width"},
                                            "text_embeddings": {0: "classes"},
                                            "labels": {1: "height", 2: "width"}})
        os.replace(tmp, path)
    finally:
        model.text_embeddings = saved
        tmp.unlink(missing_ok=True)
    return path


class OnnxSegmenter:
    """``predict`` as :class:`SegmenterStudent`'s, run by ONNX Runtime on ``model.onnx``."""

    def __init__(self, student_dir: str | os.PathLike, threads: int | None = None):
        self.student = load_student(student_dir)
        self.session = onnx_session(Path(student_dir) / "model.onnx", threads)
        # typed names: the export's text tower run by ONNX Runtime (text_encoder/text.onnx)
        self.typed = TypedNames(student_dir, self.student.config, self.student.vocabulary,
                                onnx=True)

    def predict(self, image, vocabulary: Vocabulary | str | os.PathLike | None = None,
                threshold: float | None = None, bgr: bool = False, names=None) -> dict:
        vocab = self.typed.for_call(vocabulary, names)
        vocab = self.student.vocabulary if vocab is None else (
            vocab if isinstance(vocab, Vocabulary) else Vocabulary.load(vocab))
        cut = self.student.threshold if threshold is None else threshold
        x = as_image_tensor(image, bgr)[None].float().numpy() / 255
        (labels,) = self.session.run(None, {"image": x.astype(np.float32),
                                            "text_embeddings": vocab.embeddings.float().numpy(),
                                            "threshold": np.asarray(cut, np.float32)})
        return found_names(labels[0], vocab)
