"""The trunk of open_clip's ``ModifiedResNet`` (CLIP's ResNet image tower) without open_clip.

A student segmenter may start from its ResNet teacher's image tower (``seg_clip_rn_fpn``):
this module has the tower's layers under the same parameter names, so the teacher's
``visual`` state dict loads into it at training time, and an exported student loads
with torch and torchvision only. The attention pool is left out: the FPN takes layers
2-4 (strides 8, 16, 32).

    trunk = ClipResNetTrunk(layers=[1, 1, 1, 1], width=16)
    load_tower(trunk, teacher.model.visual)   # every trunk tensor, or ValueError
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn


class Bottleneck(nn.Module):
    """CLIP's anti-aliased Bottleneck: strided blocks average-pool after the 3x3 conv and
    before the 1x1 shortcut conv instead of striding a convolution."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion))]))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.avgpool(self.relu(self.bn2(self.conv2(out))))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ClipResNetTrunk(nn.Module):
    """Stem (three 3x3 convs, 2x2 average pool) and layers 1-4 of ``ModifiedResNet(layers,
    width)``; children in forward order, so torchvision's ``IntermediateLayerGetter`` can
    take any layer's output. ``channels[k]``: layer k+1's output channels."""

    def __init__(self, layers: list[int], width: int):
        super().__init__()
        if len(layers) != 4 or min(layers) < 1 or width < 2 or width % 2:
            raise ValueError(f"ClipResNetTrunk: need 4 layer counts >= 1 and an even width, got "
                             f"layers {list(layers)}, width {width}")
        half = width // 2
        self.conv1 = nn.Conv2d(3, half, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(half)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(half, half, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(half)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(half, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.act3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        inplanes, self.channels = width, []
        for k, (blocks, stride) in enumerate(zip(layers, (1, 2, 2, 2), strict=True)):
            planes = width * 2**k
            stage = [Bottleneck(inplanes, planes, stride)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            self.add_module(f"layer{k + 1}", nn.Sequential(*stage))
            self.channels.append(inplanes)

    def forward(self, x: Tensor) -> Tensor:
        for module in self.children():
            x = module(x)
        return x


def tower_shape(visual: nn.Module) -> dict:
    """``{"trunk_layers": [...], "trunk_width": w}`` of an open_clip ``ModifiedResNet``
    tower; ValueError for any other tower (a ViT has no ResNet trunk to start from)."""
    stages = [getattr(visual, f"layer{k}", None) for k in range(1, 5)]
    if any(s is None for s in stages) or not hasattr(visual, "attnpool"):
        raise ValueError(f"seg.name=seg_clip_rn_fpn starts from a ResNet teacher's tower "
                         f"(open_clip ModifiedResNet), not {type(visual).__name__}")
    return {"trunk_layers": [len(s) for s in stages], "trunk_width": visual.conv3.out_channels}


def load_tower(trunk: nn.Module, visual: nn.Module) -> None:
    """Copy ``visual``'s (an open_clip ``ModifiedResNet``) weights into ``trunk``; every trunk
    tensor must be there with its shape, or ValueError names the first that is not."""
    theirs = {k: v for k, v in visual.state_dict().items() if not k.startswith("attnpool.")}
    own = trunk.state_dict()
    bad = [k for k in own if k not in theirs or theirs[k].shape != own[k].shape]
    if bad:
        raise ValueError(f"the teacher's tower does not fit the student's trunk: "
                         f"{len(bad)} tensors missing or of another shape, e.g. {bad[0]}")
    trunk.load_state_dict({k: theirs[k].detach().to(v.dtype) for k, v in own.items()})
