"""The student segmenters' builders: one flat ``name -> builder`` dict.

    model = build_segmenter(**seg_model_kwargs, embed_dim=teacher.embed_dim)
"""

from __future__ import annotations

import difflib

from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from distill.backbones import DeepLabV2, resnet_fpn
from distill.clip_trunk import ClipResNetTrunk
from segmentors.model import PixelEmbeddingSegmenter


def _seg(depth: int, embed_dim: int, fpn_channels: int, norm: str, temperature: float,
         backbone_weights: str | None = None) -> PixelEmbeddingSegmenter:
    # strides 8, 16, 32 (ResNet layers 2-4): the embedded world's 160 px -> 20 x 20 pixels
    return PixelEmbeddingSegmenter(resnet_fpn(depth, (2, 3, 4), fpn_channels, norm,
                                              backbone_weights, section="seg"),
                                   embed_dim, temperature)


def seg_r18_fpn(embed_dim: int, *, fpn_channels: int = 64, norm: str = "gn",
                temperature: float = 0.05,
                backbone_weights: str | None = None) -> PixelEmbeddingSegmenter:
    """ResNet-18/FPN pixel-embedding segmenter, trained from scratch (GroupNorm)."""
    return _seg(18, embed_dim, fpn_channels, norm, temperature, backbone_weights)


def seg_r10_fpn(embed_dim: int, *, fpn_channels: int = 64, norm: str = "gn",
                temperature: float = 0.05,
                backbone_weights: str | None = None) -> PixelEmbeddingSegmenter:
    """As :func:`seg_r18_fpn` with one BasicBlock per stage: half the backbone cost."""
    return _seg(10, embed_dim, fpn_channels, norm, temperature, backbone_weights)


def seg_r50_fpn(embed_dim: int, *, fpn_channels: int = 256, norm: str = "gn",
                temperature: float = 0.05,
                backbone_weights: str | None = None) -> PixelEmbeddingSegmenter:
    """ResNet-50/FPN for ADE20k (ImageNet backbone weights from a local file)."""
    return _seg(50, embed_dim, fpn_channels, norm, temperature, backbone_weights)


def seg_clip_rn_fpn(embed_dim: int, *, trunk_layers: list[int], trunk_width: int,
                    image_mean: list[float], image_std: list[float], fpn_channels: int = 64,
                    norm: str = "bn", temperature: float = 0.05,
                    backbone_weights: str | None = None) -> PixelEmbeddingSegmenter:
    """A ResNet teacher's image tower (open_clip ``ModifiedResNet(trunk_layers,
    trunk_width)`` without its attention pool) + FPN over layers 2-4 + embedding head,
    with the teacher's input normalisation. segmentors/recipe.py copies the teacher's tower
    weights in before training."""
    if norm != "bn":
        raise ValueError(f"seg.norm: seg_clip_rn_fpn keeps the CLIP tower's BatchNorm; set "
                         f"seg.norm=bn (got {norm!r})")
    if backbone_weights is not None:
        raise ValueError("seg.backbone_weights: seg_clip_rn_fpn takes its trunk from the "
                         "teacher; leave it unset")
    trunk = ClipResNetTrunk(trunk_layers, trunk_width)
    backbone = BackboneWithFPN(trunk, {"layer2": "0", "layer3": "1", "layer4": "2"},
                               trunk.channels[1:], fpn_channels, extra_blocks=LastLevelMaxPool())
    return PixelEmbeddingSegmenter(backbone, embed_dim, temperature, image_mean=image_mean,
                                   image_std=image_std)


def seg_deeplabv2_r101(embed_dim: int, *, fpn_channels: int = 512, norm: str = "bn",
                       temperature: float = 0.05,
                       backbone_weights: str | None = None) -> PixelEmbeddingSegmenter:
    """MaskCLIP+'s student: DeepLabv2 on a dilated ResNet-101 (output stride 8, ASPP with
    rates 6-24 to ``fpn_channels``), then the embedding head; ImageNet weights from a local
    torchvision ResNet-101 state_dict (MaskCLIP+ uses mmseg's ResNet-101-V1c)."""
    return PixelEmbeddingSegmenter(DeepLabV2(101, fpn_channels, norm, backbone_weights),
                                   embed_dim, temperature)


BUILDERS = {"seg_r10_fpn": seg_r10_fpn, "seg_r18_fpn": seg_r18_fpn, "seg_r50_fpn": seg_r50_fpn,
            "seg_clip_rn_fpn": seg_clip_rn_fpn, "seg_deeplabv2_r101": seg_deeplabv2_r101}


def build_segmenter(name: str, **kwargs) -> PixelEmbeddingSegmenter:
    if name not in BUILDERS:
        close = difflib.get_close_matches(name, BUILDERS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"seg.name: unknown segmenter '{name}' "
                         f"(valid: {', '.join(BUILDERS)}){hint}")
    return BUILDERS[name](**kwargs)
