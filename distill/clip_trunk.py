"""open_clip's ``ModifiedResNet`` (CLIP's ResNet image tower) without open_clip.

Students may start from their ResNet teacher's image tower: segmenters
(``seg_clip_rn_fpn``) and detectors (``vild_clip_rn_fpn``, F-VLM's frozen trunk). The
modules here have the tower's layers under the same parameter names, so the teacher's
``visual`` state dict loads into them at training time, and an exported student loads
with torch and torchvision only. The FPN takes the trunk's layers 2-4 (strides 8, 16,
32); :class:`AttentionPool` is the tower's attention pool, which F-VLM runs on each
box's RoIAlign of layer 4 to score it the way the tower scores a crop.

    trunk = ClipResNetTrunk(layers=[1, 1, 1, 1], width=16)
    load_tower(trunk, teacher.model.visual)   # every trunk tensor, or ValueError
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn


class Bottleneck(nn.Module):
    """CLIP's anti-aliased Bottleneck: strided blocks average-pool after the 3x3 conv and
    before the 1x1 shortcut conv instead of striding a convolution."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, norm=nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = norm(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = norm(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False)),
                ("1", norm(planes * self.expansion))]))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.avgpool(self.relu(self.bn2(self.conv2(out))))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ClipResNetTrunk(nn.Module):
    """Stem (three 3x3 convs, 2x2 average pool) and layers 1-4 of ``ModifiedResNet(layers,
    width)``; children in forward order, so torchvision's ``IntermediateLayerGetter`` can
    take any layer's output. ``channels[k]``: layer k+1's output channels. ``norm``: the
    norm layer class (BatchNorm2d as the tower; torchvision's FrozenBatchNorm2d keeps the
    tower's statistics and affine terms fixed)."""

    def __init__(self, layers: list[int], width: int, norm=nn.BatchNorm2d):
        super().__init__()
        if len(layers) != 4 or min(layers) < 1 or width < 2 or width % 2:
            raise ValueError(f"ClipResNetTrunk: need 4 layer counts >= 1 and an even width, got "
                             f"layers {list(layers)}, width {width}")
        half = width // 2
        self.conv1 = nn.Conv2d(3, half, 3, stride=2, padding=1, bias=False)
        self.bn1 = norm(half)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(half, half, 3, padding=1, bias=False)
        self.bn2 = norm(half)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(half, width, 3, padding=1, bias=False)
        self.bn3 = norm(width)
        self.act3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        inplanes, self.channels = width, []
        for k, (blocks, stride) in enumerate(zip(layers, (1, 2, 2, 2), strict=True)):
            planes = width * 2**k
            stage = [Bottleneck(inplanes, planes, stride, norm)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes, norm=norm) for _ in range(1, blocks)]
            self.add_module(f"layer{k + 1}", nn.Sequential(*stage))
            self.channels.append(inplanes)

    def forward(self, x: Tensor) -> Tensor:
        for module in self.children():
            x = module(x)
        return x


class AttentionPool(nn.Module):
    """open_clip's ``AttentionPool2d`` (same parameters and names): the mean of a (B, C, g, g)
    map as the query over [mean, positions], with the learned positional embedding, multi-head
    attention and the output projection -> (B, output_dim). Written with plain matrix
    products, as only the mean token's output is needed, so that it exports to ONNX."""

    def __init__(self, grid: int, width: int, heads: int, output_dim: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"AttentionPool: width {width} is not a multiple of {heads} heads")
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.k_proj, self.q_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))
        self.c_proj = nn.Linear(width, output_dim)
        self.grid, self.num_heads = grid, heads

    def forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[:2]
        if tuple(x.shape[2:]) != (self.grid, self.grid):
            raise ValueError(f"AttentionPool: a {self.grid} x {self.grid} map expected, got "
                             f"{tuple(x.shape[2:])}")
        tokens = x.flatten(2).transpose(1, 2)  # (B, g*g, C)
        tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], 1) + self.positional_embedding
        heads, dim = self.num_heads, c // self.num_heads
        q = self.q_proj(tokens[:, :1]).reshape(b, 1, heads, dim).transpose(1, 2)
        k = self.k_proj(tokens).reshape(b, -1, heads, dim).transpose(1, 2)
        v = self.v_proj(tokens).reshape(b, -1, heads, dim).transpose(1, 2)
        attention = torch.softmax(q @ k.transpose(-1, -2) * dim**-0.5, dim=-1)
        return self.c_proj((attention @ v).transpose(1, 2).reshape(b, c))


def tower_shape(visual: nn.Module, key: str = "seg.name=seg_clip_rn_fpn",
                pool: bool = False) -> dict:
    """``{"trunk_layers": [...], "trunk_width": w}`` of an open_clip ``ModifiedResNet``
    tower (``pool``: and its attention pool's ``pool_grid`` and ``pool_heads``); ValueError
    naming ``key`` for any other tower (a ViT has no ResNet trunk to start from)."""
    stages = [getattr(visual, f"layer{k}", None) for k in range(1, 5)]
    if any(s is None for s in stages) or not hasattr(visual, "attnpool"):
        raise ValueError(f"{key} starts from a ResNet teacher's tower "
                         f"(open_clip ModifiedResNet), not {type(visual).__name__}")
    shape = {"trunk_layers": [len(s) for s in stages], "trunk_width": visual.conv3.out_channels}
    if pool:
        positions = visual.attnpool.positional_embedding.shape[0] - 1
        shape.update(pool_grid=round(positions**0.5), pool_heads=visual.attnpool.num_heads)
    return shape


def tower_kwargs(teacher, section: str, name: str, fallback: str, pool: bool = False) -> dict:
    """A student builder's arguments for starting from ``teacher``'s (a
    :class:`distill.teacher.Teacher`) ResNet tower: :func:`tower_shape` and the teacher's
    input normalisation. Another tower is a ConfigError naming ``section``.name=``name`` and
    suggesting ``fallback``, a builder that needs no tower."""
    from distill.config import ConfigError

    try:
        shape = tower_shape(teacher.model.visual, f"{section}.name={name}", pool)
    except ValueError as e:
        raise ConfigError(f"{e} (teacher.model: {teacher.model_name}); with this teacher set "
                          f"e.g. {section}.name={fallback} {section}.norm=gn") from None
    return {**shape, "image_mean": list(teacher.mean), "image_std": list(teacher.std)}


def load_tower(trunk: nn.Module, visual: nn.Module, pool: AttentionPool | None = None) -> None:
    """Copy ``visual``'s (an open_clip ``ModifiedResNet``) weights into ``trunk`` (and its
    attention pool into ``pool``); every tensor of theirs must be there with its shape, or
    ValueError names the first that is not."""
    theirs = visual.state_dict()
    for module, prefix in ((trunk, ""), (pool, "attnpool.")):
        if module is None:
            continue
        own = module.state_dict()
        bad = [k for k in own if prefix + k not in theirs or theirs[prefix + k].shape != own[k].shape]
        if bad:
            raise ValueError(f"the teacher's tower does not fit the student's trunk: "
                             f"{len(bad)} tensors missing or of another shape, e.g. {prefix}{bad[0]}")
        module.load_state_dict({k: theirs[prefix + k].detach().to(v.dtype)
                                for k, v in own.items()})
