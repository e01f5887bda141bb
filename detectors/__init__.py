"""Student detectors: their builders (``detectors/builders.py``, one flat ``name -> builder``
dict) and exported detectors loaded to ``predict`` (``detectors/predictor.py``).

    model = build_detector(**dataclasses.asdict(cfg.model), embed_dim=teacher.embed_dim)
    student = load_student("exported/vild")
"""

from detectors.builders import BUILDERS, TOWER_BUILDERS, build_detector
from detectors.predictor import load_student
from detectors.vild import ViLD

__all__ = ["BUILDERS", "TOWER_BUILDERS", "ViLD", "build_detector", "load_student"]
