"""Exported detector students for users: load, swap the vocabulary, predict.

    from detectors import load_student
    student = load_student("student/")
    found = student.predict("photo.jpg", score_threshold=0.3)   # boxes, scores, names
                                                                 # (+ masks: mask_head)

Needs torch and torchvision only (no open_clip, no teacher); weights are read from
safetensors, never unpickled.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from detectors import build_detector
from detectors.vild import ViLD, binary_masks
from distill.export import Vocabulary, load_model, vocabulary_for


def as_image_tensor(image, bgr: bool = False) -> torch.Tensor:
    """A path, a PIL image or a numpy array (H, W, 3) uint8 -> (3, H, W) uint8 RGB tensor.

    Numpy arrays are RGB unless ``bgr=True`` (as OpenCV's ``cv2.imread`` returns them);
    grey (H, W) arrays and RGBA images are converted.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        try:
            with Image.open(path) as im:
                image = np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{path}: not a readable image ({e})") from None
    elif isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    elif isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"image array of shape {image.shape}: expected (H, W, 3)")
        image = image[..., :3]
        if bgr:
            image = image[..., ::-1]
        if image.dtype != np.uint8:
            if image.dtype.kind == "f" and image.max() <= 1.0:
                image = image * 255
            image = np.clip(image, 0, 255).astype(np.uint8)
    else:
        raise TypeError(f"cannot read an image from {type(image).__name__}: give a path, "
                        f"a PIL image or an (H, W, 3) numpy array")
    image = np.ascontiguousarray(image)
    if not image.flags.writeable:  # PIL's arrays are read-only; torch wants to own one
        image = image.copy()
    return torch.from_numpy(image).permute(2, 0, 1)


class DetectorStudent:
    """An exported ViLD student with its vocabulary; :meth:`predict` finds its classes."""

    def __init__(self, model: ViLD, vocabulary: Vocabulary, config: dict):
        self.model, self.config = model.eval(), config
        self.score_threshold = float(config.get("thresholds", {}).get("score", 0.3))
        self.vocabulary = vocabulary
        self.set_vocabulary(vocabulary)

    def set_vocabulary(self, vocabulary: Vocabulary | str | os.PathLike) -> None:
        """Classify with ``vocabulary`` (a :class:`Vocabulary` or a path written by
        ``tools/export.py``) from now on; the weights are untouched."""
        vocabulary = vocabulary_for(self.config, vocabulary)
        self.model.set_vocabulary(vocabulary.embeddings,
                                  torch.as_tensor(vocabulary.novel, dtype=torch.bool))
        self.vocabulary = vocabulary

    @torch.no_grad()
    def predict(self, image, vocabulary: Vocabulary | str | os.PathLike | None = None,
                score_threshold: float | None = None, bgr: bool = False) -> dict:
        """Detections in one image: ``boxes`` (N, 4) xyxy pixels, ``scores`` (N,), ``labels``
        (N,) indices into the vocabulary, ``names`` and ``novel`` per box; numpy / lists.
        A student with a mask head adds ``masks`` (N, H, W) bool (probability > 0.5).

        ``vocabulary`` applies to this call only; ``score_threshold`` defaults to the
        export's (config.json ``thresholds.score``).
        """
        return self.predict_batch([image], vocabulary, score_threshold, bgr)[0]

    @torch.no_grad()
    def predict_batch(self, images, vocabulary=None, score_threshold: float | None = None,
                      bgr: bool = False) -> list[dict]:
        saved = self.vocabulary
        if vocabulary is not None:
            self.set_vocabulary(vocabulary)
        try:
            vocab = self.vocabulary
            thresh = self.score_threshold if score_threshold is None else score_threshold
            with self.model.scores_at_least(thresh):
                out = self.model([as_image_tensor(im, bgr) for im in images])
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


def load_student(path: str | os.PathLike) -> DetectorStudent:
    """An exported detector directory (``tools/export.py``) -> :class:`DetectorStudent`."""
    model, vocabulary, config = load_model(path, "detection", build_detector)
    return DetectorStudent(model, vocabulary, config)
