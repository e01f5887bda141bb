"""ResNet + FPN backbones for the students (torchvision parts, composed explicitly)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

_CHANNELS = {10: [64, 128, 256, 512], 18: [64, 128, 256, 512], 34: [64, 128, 256, 512],
             50: [256, 512, 1024, 2048]}


def norm_layer(name: str, key: str = "model.norm", valid=("gn", "bn", "none")):
    """A norm layer class (or factory) for ``name``, one of ``valid``: "gn" (GroupNorm, 32
    groups at most, for training from scratch with small batches), "bn" (trainable
    BatchNorm; the engine makes it ``SyncBatchNorm`` under DDP on CUDA), "frozen_bn" (for
    ImageNet weights only) or "none" (None); ``key`` names the setting in the error."""
    norms = {"gn": lambda c: nn.GroupNorm(min(32, c // 8), c), "bn": nn.BatchNorm2d,
             "frozen_bn": FrozenBatchNorm2d, "none": None}
    if name not in valid:
        raise ValueError(f"{key}: unknown norm '{name}' (valid: {', '.join(valid)})")
    return norms[name]


def body_norm(norm: str, weights: str | None, section: str = "model"):
    """The norm layer of a ResNet body (gn | bn | frozen_bn); frozen norms on random weights
    (no ``weights``) are refused: they would stay identities."""
    layer = norm_layer(norm, f"{section}.norm", valid=("gn", "bn", "frozen_bn"))
    if norm == "frozen_bn" and weights is None:
        raise ValueError(f"{section}.norm: frozen_bn with no {section}.backbone_weights would "
                         f"train a random ResNet whose norms are fixed identities; set "
                         f"{section}.backbone_weights (an ImageNet state_dict) or "
                         f"{section}.norm=bn (trainable; SyncBatchNorm under DDP on CUDA)")
    return layer


def resnet_fpn(depth: int = 18, returned_layers=(2, 3, 4), fpn_channels: int = 64,
               norm: str = "gn", weights: str | None = None,
               trainable_layers: int = 5, fpn_norm: str = "none",
               section: str = "model") -> BackboneWithFPN:
    """torchvision ResNet-``depth`` + FPN with ``fpn_channels`` outputs ('0', '1', ... + 'pool').

    ``norm``: the ResNet's (:func:`body_norm`); ``fpn_norm``: the FPN's convolutions'
    (default none, as torchvision). ``weights``: a local torchvision ResNet state_dict
    (.pth/.safetensors) or a detectron2 model-zoo ``.pkl`` (distill/detectron2.py), loaded
    safely; None trains from scratch. ``section``: the config section errors name.
    """
    if depth not in _CHANNELS:
        raise ValueError(f"{section}.depth: unsupported ResNet depth {depth} (valid: 10, 18, 34, 50)")
    layer = body_norm(norm, weights, section)
    if depth == 10:  # ResNet-18 with one BasicBlock per stage: half its cost, for tiny worlds
        body = resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], norm_layer=layer)
    else:
        body = getattr(resnet, f"resnet{depth}")(weights=None, norm_layer=layer)
    if weights is not None:
        _load_body(body, Path(weights))
    layers = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    for name, p in body.named_parameters():
        p.requires_grad_(any(name.startswith(layer) for layer in layers))
    return_layers = {f"layer{k}": str(i) for i, k in enumerate(returned_layers)}
    in_channels = [_CHANNELS[depth][k - 1] for k in returned_layers]
    return BackboneWithFPN(body, return_layers, in_channels, fpn_channels,
                           extra_blocks=LastLevelMaxPool(),
                           norm_layer=norm_layer(fpn_norm, f"{section}.fpn_norm"))


class ASPP(nn.Module):
    """DeepLabv2's atrous spatial pyramid pooling: parallel 3 x 3 convolutions at ``rates``
    over one map, summed (``out_channels`` outputs)."""

    def __init__(self, in_channels: int, out_channels: int, rates=(6, 12, 18, 24)):
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(in_channels, out_channels, 3, padding=r,
                                                dilation=r) for r in rates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(branch(x) for branch in self.branches)


class DeepLabV2(nn.Module):
    """DeepLabv2 (Chen et al. 2017) as a backbone: a torchvision ResNet-``depth`` whose layers
    3 and 4 are dilated (output stride 8), then :class:`ASPP` on layer 4; ``forward`` gives
    ``{"0": (B, out_channels, H/8, W/8)}``. ``weights``: a torchvision ResNet state_dict
    (mmseg's deep-stem V1c weights do not fit torchvision's stem), loaded safely."""

    def __init__(self, depth: int = 101, out_channels: int = 512, norm: str = "bn",
                 weights: str | None = None, section: str = "seg"):
        super().__init__()
        body = getattr(resnet, f"resnet{depth}")(
            weights=None, replace_stride_with_dilation=[False, True, True],
            norm_layer=body_norm(norm, weights, section))
        if weights is not None:
            _load_body(body, Path(weights))
        del body.fc, body.avgpool
        self.body, self.aspp, self.out_channels = body, ASPP(2048, out_channels), out_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        b = self.body
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        x = b.layer4(b.layer3(b.layer2(b.layer1(x))))
        return {"0": self.aspp(x)}


def _load_body(body: nn.Module, path: Path) -> None:
    """Load ``path`` into the ResNet ``body``; every backbone tensor must be there (the
    classifier ``fc`` may be absent or extra), or ValueError names the missing ones."""
    state = {k: v for k, v in _load_state_dict(path).items() if not k.startswith("fc.")}
    own = body.state_dict()
    shaped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if shaped:
        k = shaped[0]
        raise ValueError(f"{path}: not weights of this ResNet ({len(shaped)} tensors of "
                         f"another shape, e.g. {k} {tuple(state[k].shape)} here "
                         f"{tuple(own[k].shape)})")
    missing, unexpected = body.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.") and
               not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"{path}: not weights of this ResNet "
                         f"({len(missing)} tensors missing, e.g. {missing[:2]}; "
                         f"{len(unexpected)} unexpected, e.g. {unexpected[:2]})")


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """torchvision ResNet keys from a .pth / .safetensors state_dict or a detectron2 .pkl."""
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights not found: {path}")
    if path.suffix == ".pkl":
        from distill.detectron2 import torchvision_resnet_state_dict

        return torchvision_resnet_state_dict(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickles with code are refused
        raise ValueError(f"{path}: not a plain state_dict ({str(e).splitlines()[0][:120]})") from None


