"""Evaluation: COCO / COCO-OV and LVIS detection metrics; semantic-segmentation mIoU.

``LVISEvaluator`` (on faster-coco-eval) is imported on first use: its C++ extension
and cv2 load only when LVIS is evaluated. The official ``lvis`` package serves as the
reference in tests and bench/eval.py only (``distill.evaluation.reference``).
"""

from __future__ import annotations

from typing import Any

from distill.evaluation.coco import OVCocoEvaluator, encode_masks, xyxy_to_xywh
from distill.evaluation.sem_seg import SemSegEvaluator

__all__ = ["LVISEvaluator", "OVCocoEvaluator", "SemSegEvaluator", "encode_masks", "xyxy_to_xywh"]


def __getattr__(name: str) -> Any:
    if name == "LVISEvaluator":
        from distill.evaluation.lvis import LVISEvaluator

        return LVISEvaluator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
