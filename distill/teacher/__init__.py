"""The frozen open_clip teacher: text(names), regions(image, boxes), dense(image).

    from distill.teacher import Teacher, build_teacher
    teacher = build_teacher(**dataclasses.asdict(cfg.teacher))
"""

from distill.teacher.clip import (
    REGION_MODES,
    Teacher,
    TeacherError,
    build_teacher,
    cut_crops,
    enlarge_boxes,
    load_clip,
    register_model_config,
)
from distill.teacher.dense import DENSE_MODES, DenseUnsupported, dense_features
from distill.teacher.prompts import TEMPLATE_SETS, fill, templates

__all__ = [
    "DENSE_MODES", "REGION_MODES", "TEMPLATE_SETS", "DenseUnsupported", "Teacher", "TeacherError",
    "build_teacher", "cut_crops", "dense_features", "enlarge_boxes", "fill", "load_clip",
    "register_model_config", "templates",
]
