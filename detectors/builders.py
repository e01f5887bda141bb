"""The student detectors' builders: one flat ``name -> builder`` dict.

    model = build_detector(**dataclasses.asdict(cfg.model), embed_dim=teacher.embed_dim)
"""

from __future__ import annotations

import difflib

from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from detectors.vild import RegionVLM, ViLD, build_vild
from distill.backbones import norm_layer, resnet_fpn
from distill.clip_trunk import AttentionPool, ClipResNetTrunk

SMALL_ANCHORS = (16, 32, 64, 128)  # strides 8-32 + pool, for tiny worlds


def _anchors(sizes, default) -> tuple[tuple[int, ...], ...]:
    """``model.anchor_sizes`` (one size per FPN map; empty: the builder's ``default``) in
    torchvision's form."""
    sizes = tuple(sizes) or default
    if len(sizes) != len(default):
        raise ValueError(f"model.anchor_sizes: one size per feature map ({len(default)} here, "
                         f"e.g. {list(default)}), got {list(sizes)}")
    return tuple((int(a),) for a in sizes)


def _trainable_layers(freeze_trunk: bool, vlm_fusion: bool, weights: str | None,
                      default: int = 5) -> int:
    """The ResNet students' ``trainable_layers``: 0 with ``model.freeze_trunk`` (ImageNet
    weights needed); F-VLM's region scores need the teacher's tower, refused here."""
    if vlm_fusion:
        raise ValueError("model.vlm_fusion: F-VLM scores boxes with the teacher's own tower; "
                         "set model.name=vild_clip_rn_fpn (a ResNet teacher)")
    if freeze_trunk and weights is None:
        raise ValueError("model.freeze_trunk: a frozen ResNet needs model.backbone_weights "
                         "(a random one would stay random)")
    return 0 if freeze_trunk else default


def _small_vild(depth: int, embed_dim: int, fpn_channels: int, norm: str,
                backbone_weights: str | None, image_size: int, fpn_norm: str = "none",
                freeze_trunk: bool = False, vlm_fusion: bool = False, anchor_sizes=(),
                **kwargs) -> ViLD:
    backbone = resnet_fpn(depth, (2, 3, 4), fpn_channels, norm, backbone_weights,
                          fpn_norm=fpn_norm, trainable_layers=_trainable_layers(
                              freeze_trunk, vlm_fusion, backbone_weights))
    return build_vild(backbone, embed_dim, min_size=image_size, max_size=image_size,
                      anchor_sizes=_anchors(anchor_sizes, SMALL_ANCHORS),
                      featmap_names=("0", "1", "2"), **kwargs)


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
                 fpn_norm: str = "none", freeze_trunk: bool = False, vlm_fusion: bool = False,
                 anchor_sizes=(), **kwargs) -> ViLD:
    """ViLD's R50-FPN student for COCO/LVIS: from scratch with trainable norms (ViLD's), or
    from ImageNet weights in a local file (stem and layer1 frozen, as detectron2)."""
    trainable = _trainable_layers(freeze_trunk, vlm_fusion, backbone_weights,
                                  3 if backbone_weights else 5)
    backbone = resnet_fpn(50, (1, 2, 3, 4), fpn_channels, norm, backbone_weights,
                          trainable_layers=trainable, fpn_norm=fpn_norm)
    return build_vild(backbone, embed_dim, min_size=image_size, max_size=image_size,
                      anchor_sizes=_anchors(anchor_sizes, (32, 64, 128, 256, 512)),
                      featmap_names=("0", "1", "2", "3"), **kwargs)


def vild_clip_rn_fpn(embed_dim: int, *, trunk_layers: list[int], trunk_width: int,
                     image_mean: list[float], image_std: list[float], pool_grid: int,
                     pool_heads: int, fpn_channels: int = 64, norm: str = "frozen_bn",
                     backbone_weights: str | None = None, image_size: int = 160,
                     fpn_norm: str = "none", freeze_trunk: bool = False,
                     vlm_fusion: bool = False, anchor_sizes=(), **kwargs) -> ViLD:
    """A ResNet teacher's image tower (open_clip ``ModifiedResNet(trunk_layers,
    trunk_width)``) as the trunk, FPN over its layers 2-4 (strides 8-32, + pool), with the
    teacher's input normalisation; detectors/recipe.py copies the tower's weights in.
    ``norm``: the tower's BatchNorm trainable (bn) or fixed (frozen_bn).
    ``freeze_trunk``: F-VLM's frozen trunk (only the FPN and heads train);
    ``vlm_fusion``: F-VLM's test-time fusion with the tower's own region scores
    (:class:`detectors.vild.RegionVLM`: the tower's attention pool, ``pool_grid`` x
    ``pool_grid`` with ``pool_heads`` heads, copied in too); ``anchor_sizes``: one per
    FPN map (empty: the embedded world's)."""
    if norm not in ("bn", "frozen_bn"):
        raise ValueError(f"model.norm: vild_clip_rn_fpn keeps the CLIP tower's BatchNorm, "
                         f"trainable (bn) or fixed (frozen_bn); got {norm!r}")
    if backbone_weights is not None:
        raise ValueError("model.backbone_weights: vild_clip_rn_fpn takes its trunk from the "
                         "teacher; leave it unset")
    if freeze_trunk and norm != "frozen_bn":
        raise ValueError("model.norm: a frozen trunk (model.freeze_trunk) keeps the tower's "
                         "statistics; set model.norm=frozen_bn")
    if vlm_fusion and not freeze_trunk:
        raise ValueError("model.vlm_fusion scores boxes with the tower as the teacher has it; "
                         "set model.freeze_trunk=true (F-VLM)")
    trunk = ClipResNetTrunk(trunk_layers, trunk_width,
                            FrozenBatchNorm2d if norm == "frozen_bn" else nn.BatchNorm2d)
    trunk.requires_grad_(not freeze_trunk)
    backbone = BackboneWithFPN(trunk, {"layer2": "0", "layer3": "1", "layer4": "2"},
                               trunk.channels[1:], fpn_channels, extra_blocks=LastLevelMaxPool(),
                               norm_layer=norm_layer(fpn_norm, "model.fpn_norm"))
    vlm = (RegionVLM(AttentionPool(pool_grid, trunk.channels[-1], pool_heads, embed_dim))
           if vlm_fusion else None)
    return build_vild(backbone, embed_dim, min_size=image_size, max_size=image_size,
                      anchor_sizes=_anchors(anchor_sizes, SMALL_ANCHORS),
                      featmap_names=("0", "1", "2"), image_mean=image_mean,
                      image_std=image_std, vlm=vlm, **kwargs)


# builders that start from the teacher's tower (detectors/recipe.py copies it in)
TOWER_BUILDERS = ("vild_clip_rn_fpn",)
BUILDERS = {"vild_r10_fpn": vild_r10_fpn, "vild_r18_fpn": vild_r18_fpn,
            "vild_r50_fpn": vild_r50_fpn, "vild_clip_rn_fpn": vild_clip_rn_fpn}


def build_detector(name: str, **kwargs) -> ViLD:
    if name not in BUILDERS:
        close = difflib.get_close_matches(name, BUILDERS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"model.name: unknown detector '{name}' "
                         f"(valid: {', '.join(BUILDERS)}){hint}")
    return BUILDERS[name](**kwargs)
