"""Student segmenters: their builders (``segmentors/builders.py``, one flat ``name -> builder``
dict) and exported segmenters loaded to ``predict`` (``segmentors/predictor.py``).

    model = build_segmenter(**seg_model_kwargs, embed_dim=teacher.embed_dim)
    student = load_student("exported/segmenter")
"""

from segmentors.builders import BUILDERS, build_segmenter
from segmentors.model import PixelEmbeddingSegmenter
from segmentors.predictor import load_student

__all__ = ["BUILDERS", "PixelEmbeddingSegmenter", "build_segmenter", "load_student"]
