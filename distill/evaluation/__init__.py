"""Evaluation: COCO / COCO-OV and LVIS detection metrics; semantic-segmentation mIoU.

``LVISEvaluator`` is imported on first use: ``import lvis`` pulls in cv2 and pyplot
and configures the root logger.
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
