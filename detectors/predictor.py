"""Exported detector students for users: load, swap the vocabulary, predict.

    from detectors import load_student
    student = load_student("student/")
    found = student.predict("photo.jpg")   # boxes, scores, names (+ masks: mask_head),
                                           # at the export's score threshold
    found = student.predict("photo.jpg", names="bolt,star")  # names typed now: the export's
                                           # text encoder embeds them (--text-encoder)

Needs torch and torchvision only (no open_clip, no teacher), names typed at run time aside
(open_clip's tokenizer and text transformer, with the export's text tower); weights are
read from safetensors, never unpickled. One student may serve several threads.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

import torch

from detectors.builders import build_detector
from detectors.vild import ViLD, binary_masks
from distill.export import Vocabulary, as_image_tensor, load_model, vocabulary_for
from distill.text_encoder import TypedNames


class DetectorStudent:
    """An exported ViLD student with its vocabulary; :meth:`predict` finds its classes."""

    def __init__(self, model: ViLD, vocabulary: Vocabulary, config: dict,
                 directory: str | os.PathLike | None = None):
        self.model, self.config = model.eval(), config
        self.score_threshold = float(config.get("thresholds", {}).get("score", 0.3))
        self.vocabulary = vocabulary
        self.set_vocabulary(vocabulary)
        self.typed = TypedNames(directory, config, vocabulary)
        self.lock = threading.Lock()  # a vocabulary for one call is set on the shared model

    def set_vocabulary(self, vocabulary: Vocabulary | str | os.PathLike) -> None:
        """Classify with ``vocabulary`` (a :class:`Vocabulary` or a path written by
        ``tools/export.py``) from now on; the weights are untouched."""
        vocabulary = vocabulary_for(self.config, vocabulary)
        self.model.set_vocabulary(vocabulary.embeddings,
                                  torch.as_tensor(vocabulary.novel, dtype=torch.bool))
        self.vocabulary = vocabulary

    @torch.no_grad()
    def predict(self, image, vocabulary: Vocabulary | str | os.PathLike | None = None,
                score_threshold: float | None = None, bgr: bool = False,
                names: str | Sequence[str] | None = None) -> dict:
        """Detections in one image: ``boxes`` (N, 4) xyxy pixels, ``scores`` (N,), ``labels``
        (N,) indices into the vocabulary, ``names`` and ``novel`` per box; numpy / lists.
        A student with a mask head adds ``masks`` (N, H, W) bool (probability > 0.5).

        ``vocabulary`` applies to this call only, as do ``names`` (a comma-separated string
        or a list, synonyms joined by ``|``) embedded by the export's text encoder;
        ``score_threshold`` defaults to the export's (config.json ``thresholds.score``).
        """
        return self.predict_batch([image], vocabulary, score_threshold, bgr, names)[0]

    @torch.no_grad()
    def predict_batch(self, images, vocabulary=None, score_threshold: float | None = None,
                      bgr: bool = False, names: str | Sequence[str] | None = None) -> list[dict]:
        vocabulary = self.typed.for_call(vocabulary, names)
        images = [as_image_tensor(im, bgr) for im in images]
        thresh = self.score_threshold if score_threshold is None else score_threshold
        with self.lock:
            saved = self.vocabulary
            if vocabulary is not None:
                self.set_vocabulary(vocabulary)
            try:
                vocab = self.vocabulary
                device = self.model.roi_heads.background.device
                with self.model.scores_at_least(thresh):
                    out = self.model([im.to(device) for im in images])
                out = [{k: v.cpu() for k, v in det.items()} for det in out]
            finally:
                if vocabulary is not None:
                    self.set_vocabulary(saved)
        results = []
        for det in out:
            keep = det["scores"] >= thresh
            labels = (det["labels"][keep] - 1).tolist()
            found = {"boxes": det["boxes"][keep].numpy(),
                     "scores": det["scores"][keep].numpy(), "labels": labels,
                     "names": [vocab.names[k] for k in labels],
                     "novel": [bool(vocab.novel[k]) for k in labels]}
            if "masks" in det:
                found["masks"] = binary_masks(det["masks"][keep]).numpy()
            results.append(found)
        return results


def load_student(path: str | os.PathLike, device: str | torch.device = "cpu") -> DetectorStudent:
    """An exported detector directory (``tools/export.py``) -> :class:`DetectorStudent` on
    ``device`` (images go there; what ``predict`` returns is on the CPU, as numpy)."""
    model, vocabulary, config = load_model(path, "detection", build_detector, device)
    return DetectorStudent(model, vocabulary, config, path)
