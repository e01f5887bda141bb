"""Student detectors: one flat ``name -> builder`` dict.

    model = build_detector(**dataclasses.asdict(cfg.model), embed_dim=teacher.embed_dim)
"""

from __future__ import annotations

import difflib

from detectors.vild import ViLD, build_vild
from distill.backbones import resnet_fpn


def _small_vild(depth: int, embed_dim: int, fpn_channels: int, norm: str,
                backbone_weights: str | None, image_size: int, fpn_norm: str = "none",
                **kwargs) -> ViLD:
    backbone = resnet_fpn(depth, (2, 3, 4), fpn_channels, norm, backbone_weights,
                          fpn_norm=fpn_norm)
    return build_vild(backbone, embed_dim, min_size=image_size, max_size=image_size,
                      anchor_sizes=((16,), (32,), (64,), (128,)), featmap_names=("0", "1", "2"),
                      **kwargs)


def vild_r18_fpn(embed_dim: int, *, fpn_channels: int = 64, norm: str = "gn",
                 backbone_weights: str | None = None, image_size: int = 160, **kwargs) -> ViLD:
    """Small ResNet-18/FPN ViLD student for the embedded world (strides 8-32 + pool, from scratch)."""
    return _small_vild(18, embed_dim, fpn_channels, norm, backbone_weights, image_size, **kwargs)


def vild_r10_fpn(embed_dim: int, *, fpn_channels: int = 64, norm: str = "gn",
                 backbone_weights: str | None = None, image_size: int = 160, **kwargs) -> ViLD:
    """As :func:`vild_r18_fpn` with one BasicBlock per stage (ResNet-10): half the backbone cost."""
    return _small_vild(10, embed_dim, fpn_channels, norm, backbone_weights, image_size, **kwargs)


def vild_r50_fpn(embed_dim: int, *, fpn_channels: int = 256, norm: str = "bn",
                 backbone_weights: str | None = None, image_size: int = 1024,
                 fpn_norm: str = "none", **kwargs) -> ViLD:
    """ViLD's R50-FPN student for COCO/LVIS: from scratch with trainable norms (ViLD's), or
    from ImageNet weights in a local file (stem and layer1 frozen, as detectron2)."""
    backbone = resnet_fpn(50, (1, 2, 3, 4), fpn_channels, norm, backbone_weights,
                          trainable_layers=3 if backbone_weights else 5, fpn_norm=fpn_norm)
    return build_vild(backbone, embed_dim, min_size=image_size, max_size=image_size,
                      anchor_sizes=((32,), (64,), (128,), (256,), (512,)),
                      featmap_names=("0", "1", "2", "3"), **kwargs)


BUILDERS = {"vild_r10_fpn": vild_r10_fpn, "vild_r18_fpn": vild_r18_fpn,
            "vild_r50_fpn": vild_r50_fpn}


def build_detector(name: str, **kwargs) -> ViLD:
    if name not in BUILDERS:
        close = difflib.get_close_matches(name, BUILDERS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"model.name: unknown detector '{name}' "
                         f"(valid: {', '.join(BUILDERS)}){hint}")
    return BUILDERS[name](**kwargs)


def load_student(path):
    """An exported detector (``tools/export.py``) ready to ``predict``: see detectors.predictor."""
    from detectors.predictor import load_student as load

    return load(path)


__all__ = ["BUILDERS", "ViLD", "build_detector", "load_student"]
