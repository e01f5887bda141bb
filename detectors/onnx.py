"""ONNX export of an exported detector student, and an ONNX Runtime predictor.

    export_onnx(load_student("student/"), "student/model.onnx")
    OnnxDetector("student/").predict("photo.jpg")     # same output as DetectorStudent.predict

The graph (torchvision's ONNX path: legacy TorchScript exporter, opset 17) holds
the backbone, the RPN, the RoI heads and the post-processing (class-wise NMS) for
one preprocessed image: input ``image`` (1, 3, S, S) float32, the picture resized
(longer side S, as the student's transform does), normalised and zero-padded to
S x S; outputs ``boxes`` (N, 4) xyxy in that frame, ``scores`` (N,), ``labels``
(N,) 1-based vocabulary indices; a student with a mask head adds ``masks``
(N, 1, 28, 28), each box's class-agnostic mask probabilities. The vocabulary's text
embeddings are a second input (``text_embeddings`` (C, D)), so a vocabulary swap
needs no re-export; the third, ``score_threshold`` (a float32 scalar), is the lowest
class score post-processed (the predictor passes the float32 just below its threshold,
so that the per-class NMS skips what it would drop). The predictor does the
resize/pad in torch, maps the boxes back to the picture and pastes the masks there
(as the student's transform does).

Boxes are clipped to S x S inside the graph (the PyTorch student clips to the
resized picture): the two agree exactly on square pictures; on others they differ
only for proposals reaching into the padding.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.transform import resize_boxes

from detectors.predictor import DetectorStudent, load_student
from detectors.vild import ViLD, below, binary_masks
from distill.export import ONNX_OPSET, Vocabulary, as_image_tensor, onnx_session
from distill.text_encoder import TypedNames


class _Graph(nn.Module):
    """(1, 3, S, S) preprocessed image + (C, D) text embeddings -> boxes, scores, labels
    (+ masks (N, 1, 28, 28) probabilities with a mask head)."""

    def __init__(self, model: ViLD, size: int):
        super().__init__()
        self.model, self.size = model, size

    def forward(self, image: torch.Tensor, text_embeddings: torch.Tensor,
                score_threshold: torch.Tensor):
        m = self.model
        m.roi_heads.text_embeddings = F.normalize(text_embeddings, dim=-1)
        m.roi_heads.score_thresh = score_threshold
        images = ImageList(image, [(self.size, self.size)])
        features, vlm_features = m.features(image)
        proposals, _ = m.rpn(images, features)
        det = m.roi_heads(features, proposals, images.image_sizes, vlm_features=vlm_features)[0]
        return tuple(det[k] for k in output_names(m))


def output_names(model: ViLD) -> list[str]:
    """The graph's outputs, in order: ``masks`` only for a student with a mask head."""
    return ["boxes", "scores", "labels"] + (["masks"] if model.roi_heads.has_mask() else [])


def preprocess(model: ViLD, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """(3, H, W) uint8 -> ((1, 3, S, S) normalised and padded, resized (h, w), original (H, W))."""
    image_list, _, original = model._prepare([image])
    x = image_list.tensors
    size = model.transform.max_size
    x = F.pad(x, (0, size - x.shape[-1], 0, size - x.shape[-2]))
    return x, image_list.image_sizes[0], original[0]


def export_onnx(student: DetectorStudent, path: str | os.PathLike) -> Path:
    """Write the student's graph to ``path`` (atomically); returns the path."""
    model = student.model.eval()
    size = model.transform.max_size
    if model.transform.min_size[0] != size:
        raise ValueError("ONNX export needs a student resized to a square size "
                         "(model.image_size sets both sides)")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    example = torch.zeros(1, 3, size, size)
    text = student.vocabulary.embeddings.float()
    saved = model.roi_heads.text_embeddings, model.roi_heads.score_thresh
    outputs = output_names(model)
    try:
        # the tracer warns about every Python-side shape; tests/test_export.py checks that the
        # graph still follows the proposal count and vocabulary size of each input
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(_Graph(model, size).eval(),
                              (example, text, torch.tensor(model.roi_heads.score_thresh)),
                              str(tmp), dynamo=False, opset_version=ONNX_OPSET,
                              input_names=["image", "text_embeddings", "score_threshold"],
                              output_names=outputs,
                              dynamic_axes={"text_embeddings": {0: "classes"},
                                            **{k: {0: "n"} for k in outputs}})
        os.replace(tmp, path)
    finally:
        model.roi_heads.text_embeddings, model.roi_heads.score_thresh = saved
        tmp.unlink(missing_ok=True)
    return path


class OnnxDetector:
    """``predict`` as :class:`DetectorStudent`'s, run by ONNX Runtime on ``model.onnx``."""

    def __init__(self, student_dir: str | os.PathLike, onnx_path: str | os.PathLike | None = None,
                 threads: int | None = None):
        self.student = load_student(student_dir)  # preprocessing, vocabulary, thresholds
        self.session = onnx_session(onnx_path or Path(student_dir) / "model.onnx", threads)
        self.inputs = {i.name for i in self.session.get_inputs()}
        # typed names: the export's text tower run by ONNX Runtime (text_encoder/text.onnx)
        self.typed = TypedNames(student_dir, self.student.config, self.student.vocabulary,
                                onnx=True)

    def predict(self, image, vocabulary: Vocabulary | str | os.PathLike | None = None,
                score_threshold: float | None = None, bgr: bool = False, names=None) -> dict:
        vocab = self.typed.for_call(vocabulary, names)
        vocab = self.student.vocabulary if vocab is None else (
            vocab if isinstance(vocab, Vocabulary) else Vocabulary.load(vocab))
        x, resized, original = preprocess(self.student.model, as_image_tensor(image, bgr))
        thresh = self.student.score_threshold if score_threshold is None else score_threshold
        inputs = {"image": x.numpy(), "text_embeddings": vocab.embeddings.float().numpy()}
        if "score_threshold" in self.inputs:  # graphs exported before it was an input lack it
            inputs["score_threshold"] = np.array(
                max(self.student.model.roi_heads.score_thresh, below(thresh)), dtype=np.float32)
        out = dict(zip(output_names(self.student.model), self.session.run(None, inputs),
                       strict=True))
        boxes = resize_boxes(torch.from_numpy(out["boxes"]), resized, original).numpy()
        h, w = original
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        scores = out["scores"]
        keep = scores >= thresh
        labels = (out["labels"][keep] - 1).tolist()
        found = {"boxes": boxes[keep], "scores": scores[keep].astype(np.float32),
                 "labels": labels, "names": [vocab.names[k] for k in labels],
                 "novel": [bool(vocab.novel[k]) for k in labels]}
        if "masks" in out:
            probs = paste_masks_in_image(torch.from_numpy(out["masks"][keep]),
                                         torch.from_numpy(boxes[keep]), original)
            found["masks"] = binary_masks(probs).numpy()
        return found
