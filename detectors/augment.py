"""Training augmentation of a detection sample: the image, its targets and its cached
distillation boxes move together.

- :func:`hflip_target`: a left-right mirror.
- :func:`large_scale_jitter`: ViLD's large-scale jitter (Ghiasi et al. 2021, ViLD's
  ``vild_parser``): the image is scaled so that its long side is ``size`` x U(low, high),
  a random window of at most ``size`` x ``size`` is cut out of it, and the result is padded
  to ``size`` x ``size`` at the bottom and right.
- :func:`window_masks`: instance masks drawn straight into a jitter window from their
  polygons (a training sample never holds full-size masks).

A target is a dict with ``boxes`` (N, 4) xyxy pixels and entries of N rows (``labels``,
``masks`` (N, H, W), the cached ``embeddings`` of distillation boxes ...); the jitter clips
the boxes to the window and drops the rows whose box leaves it.
"""

from __future__ import annotations

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.transforms import InterpolationMode

# the padding colour: ImageNet's mean in uint8, which the student's normalisation maps to
# about 0 (ViLD pads the normalised image with zeros)
PAD_RGB = (124, 116, 104)


def hflip_target(target: dict[str, Tensor], width: int) -> dict[str, Tensor]:
    """A copy of ``target`` mirrored left-right in an image of ``width`` pixels: ``boxes``
    (N, 4) xyxy and, when present, ``masks`` (N, H, W); other entries are kept as they are."""
    out = dict(target)
    b = target["boxes"]
    out["boxes"] = torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], 1)
    if "masks" in target:
        out["masks"] = target["masks"].flip(-1)
    return out


def jitter_window(height: int, width: int, size: int, scale: float,
                  u: tuple[float, float]) -> tuple[int, int, int, int, int, int]:
    """The window of a large-scale jitter: (top, left, crop_h, crop_w) in the image's pixels
    and (out_h, out_w), the window's size after scaling (at most ``size``).

    The image is scaled by r = ``size`` x ``scale`` / max(H, W); the window is the part of the
    scaled image that fits in ``size`` x ``size``, placed at ``u`` (two numbers in [0, 1)) of
    the free range in y and x.
    """
    r = size * scale / max(height, width)
    crop_h, crop_w = min(height, round(size / r)), min(width, round(size / r))
    top = int(u[0] * (height - crop_h + 1))
    left = int(u[1] * (width - crop_w + 1))
    out_h = max(1, min(size, round(crop_h * r)))
    out_w = max(1, min(size, round(crop_w * r)))
    return top, left, crop_h, crop_w, out_h, out_w


def crop_target(target: dict[str, Tensor], window: tuple[int, int, int, int, int, int],
                size: int) -> dict[str, Tensor]:
    """``target`` in a jitter ``window`` (:func:`jitter_window`), padded to ``size``: boxes
    shifted, scaled and clipped to the window, masks cut out, resized (nearest) and padded
    with 0; the rows whose box has no area left in the window are dropped (every entry)."""
    top, left, crop_h, crop_w, out_h, out_w = window
    b = target["boxes"].float()
    scale = b.new_tensor([out_w / crop_w, out_h / crop_h] * 2)
    b = (b - b.new_tensor([left, top, left, top])) * scale
    b = torch.minimum(b.clamp(min=0), b.new_tensor([out_w, out_h, out_w, out_h]))
    keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
    out = {k: v[keep] for k, v in target.items() if k != "boxes"}
    out["boxes"] = b[keep]
    if "masks" in out:
        m = out["masks"]
        if len(m):
            m = TF.resized_crop(m, top, left, crop_h, crop_w, [out_h, out_w],
                                interpolation=InterpolationMode.NEAREST)
        else:
            m = m.new_zeros(0, out_h, out_w)
        out["masks"] = TF.pad(m, [0, 0, size - out_w, size - out_h], fill=0)
    return out


def draw_window(height: int, width: int, size: int, scale_range: tuple[float, float],
                generator: torch.Generator | None = None) -> tuple[int, ...]:
    """A large-scale jitter window (:func:`jitter_window`) for an image of ``height`` x
    ``width``: the scale drawn from U(``scale_range``), then its place, from ``generator``
    (the global RNG when None)."""
    low, high = scale_range
    scale = low + (high - low) * float(torch.rand((), generator=generator))
    u = torch.rand(2, generator=generator).tolist()
    return jitter_window(height, width, size, scale, (u[0], u[1]))


def window_masks(segmentations: list, image_size: tuple[int, int], window: tuple[int, ...],
                 size: int, flipped: bool = False) -> Tensor:
    """(N, ``size``, ``size``) uint8 masks of N COCO segmentations of an ``image_size`` (H, W)
    image, drawn straight into a jitter ``window`` (:func:`jitter_window`), mirrored first
    when ``flipped``: what :func:`crop_target` makes of full-size masks, with the polygons
    rasterised at the size they are used (LVIS images hold hundreds of objects: full-size
    masks of them all are hundreds of MB a sample). An RLE (a dict) is decoded at full size
    and resized (nearest), as before; an empty segmentation gives an empty mask."""
    from pycocotools import mask as mask_utils

    from distill.data.coco import decode_mask

    top, left, crop_h, crop_w, out_h, out_w = window
    height, width = image_size
    sx, sy = out_w / crop_w, out_h / crop_h
    out = torch.zeros(len(segmentations), size, size, dtype=torch.uint8)
    for k, seg in enumerate(segmentations):
        if isinstance(seg, dict):  # RLE: full size, then as crop_target does
            m = torch.from_numpy(decode_mask(seg, height, width))
            m = m.flip(-1) if flipped else m
            out[k, :out_h, :out_w] = TF.resized_crop(
                m[None], top, left, crop_h, crop_w, [out_h, out_w],
                interpolation=InterpolationMode.NEAREST)[0]
            continue
        moved = []
        for part in seg or []:
            if len(part) < 6:
                continue
            xy = torch.tensor(part, dtype=torch.float64).view(-1, 2)
            if flipped:
                xy[:, 0] = width - xy[:, 0]
            xy = (xy - xy.new_tensor([left, top])) * xy.new_tensor([sx, sy])
            moved.append(xy.flatten().tolist())
        if moved:
            rle = mask_utils.merge(mask_utils.frPyObjects(moved, size, size))
            out[k] = torch.from_numpy(mask_utils.decode(rle))
    out[:, out_h:] = 0
    out[:, :, out_w:] = 0
    return out


def large_scale_jitter(image: Tensor, targets: list[dict[str, Tensor]], size: int,
                       scale_range: tuple[float, float],
                       generator: torch.Generator | None = None,
                       window: tuple[int, ...] | None = None
                       ) -> tuple[Tensor, list[dict[str, Tensor]]]:
    """(3, H, W) uint8 ``image`` and its ``targets`` (each a dict with ``boxes``) -> the
    (3, ``size``, ``size``) jittered image and the targets in it (:func:`crop_target`).
    The scale and the window come from ``generator`` (the global RNG when None), unless
    ``window`` (:func:`draw_window`) is given."""
    if window is None:
        window = draw_window(image.shape[-2], image.shape[-1], size, scale_range, generator)
    top, left, crop_h, crop_w, out_h, out_w = window
    image = TF.resized_crop(image, top, left, crop_h, crop_w, [out_h, out_w], antialias=True)
    canvas = torch.tensor(PAD_RGB, dtype=image.dtype)[:, None, None].expand(3, size, size)
    canvas = canvas.clone()
    canvas[:, :out_h, :out_w] = image
    return canvas, [crop_target(t, window, size) for t in targets]
