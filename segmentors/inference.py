"""Semantic-segmentation inference and training-time resizing shared by students and teacher.

ADE20k's protocol (DESIGN.md): the image is resized to a short side of 512, logits
are computed on the whole image or by a sliding window, upsampled back to the
original resolution and scored there. ``logits_fn`` is anything mapping
``(B, 3, h, w) uint8 -> (B, C, h', w')`` logits at any stride: a student's
``pixel_logits`` or the teacher's dense text logits.

    logits = segment_logits(fn, images, short_side=512, window=512, stride=341)  # (B, C, H, W)
    sample = random_resize_crop(sample, short_side=512, crop=512, scale_range=(0.5, 2.0))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.data.semantic import IGNORE, collate_semantic

LogitsFn = Callable[[Tensor], Tensor]


def short_side_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(h, w) with the short side scaled to ``short_side`` (0: unchanged), aspect kept."""
    if short_side <= 0:
        return height, width
    scale = short_side / min(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    """(3, H, W) or (B, 3, H, W) uint8 -> bilinear (antialiased) resize, uint8."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    batch = image if image.ndim == 4 else image[None]
    out = F.interpolate(batch.float(), size=size, mode="bilinear", align_corners=False,
                        antialias=True).round().clamp(0, 255).to(torch.uint8)
    return out if image.ndim == 4 else out[0]


def _upsampled(logits_fn: LogitsFn, images: Tensor) -> Tensor:
    logits = logits_fn(images)
    return F.interpolate(logits.float(), size=images.shape[-2:], mode="bilinear",
                         align_corners=False)


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Window origins covering [0, length): stride apart, the last one flush with the end."""
    if length <= window:
        return [0]
    n = math.ceil((length - window) / stride) + 1
    return [min(i * stride, length - window) for i in range(n)]


def slide_logits(logits_fn: LogitsFn, images: Tensor, window: int, stride: int) -> Tensor:
    """(B, 3, H, W) -> (B, C, H, W): logits of ``window``-square crops ``stride`` apart
    (smaller images padded with zeros up to the window), averaged where crops overlap."""
    if not 0 < stride <= window:
        raise ValueError(f"sliding window: need 0 < stride <= window, got stride {stride}, "
                         f"window {window}")
    b, _, h, w = images.shape
    ph, pw = max(h, window), max(w, window)
    padded = F.pad(images, (0, pw - w, 0, ph - h))
    total, count = None, torch.zeros(1, 1, ph, pw, device=images.device)
    for y in window_starts(ph, window, stride):
        for x in window_starts(pw, window, stride):
            crop = padded[..., y:y + window, x:x + window]
            logits = _upsampled(logits_fn, crop)
            if total is None:
                total = logits.new_zeros(b, logits.shape[1], ph, pw)
            total[..., y:y + window, x:x + window] += logits
            count[..., y:y + window, x:x + window] += 1
    return (total / count)[..., :h, :w]


def segment_logits(logits_fn: LogitsFn, images: Tensor, short_side: int = 0,
                   window: int = 0, stride: int = 0) -> Tensor:
    """(B, 3, H, W) uint8 -> (B, C, H, W) logits at the images' own resolution: resized to
    ``short_side`` (0: as is), whole-image (``window`` 0) or sliding-window inference,
    then upsampled bilinearly back to (H, W)."""
    h, w = images.shape[-2:]
    x = resize_image(images, short_side_size(h, w, short_side))
    logits = slide_logits(logits_fn, x, window, stride) if window else _upsampled(logits_fn, x)
    if tuple(logits.shape[-2:]) != (h, w):
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    return logits


def random_resize_crop(sample: dict, short_side: int, crop: int,
                       scale_range: Sequence[float] = (1.0, 1.0),
                       generator: torch.Generator | None = None) -> dict:
    """Training view of ``{"image" (3, H, W) uint8, "labels" (H, W) int64}``: short side to
    ``short_side`` x U(scale_range) (0: keep), then a random ``crop``-square window (0: none),
    padded with 0 (image) and ``IGNORE`` (labels) where the image is smaller; ``valid``
    (H, W) bool marks the image's pixels (False on that padding). Draws from ``generator``
    (the engine's per-sample one), else the global torch RNG."""
    image, labels = sample["image"], sample["labels"]
    valid = torch.ones(labels.shape, dtype=torch.bool)
    if short_side > 0:
        lo, hi = scale_range
        s = lo + (hi - lo) * float(torch.rand((), generator=generator))
        size = short_side_size(*image.shape[-2:], round(short_side * s))
        image = resize_image(image, size)
        labels = F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].long()
        valid = torch.ones(labels.shape, dtype=torch.bool)
    if crop > 0:
        h, w = image.shape[-2:]
        pad = (0, max(0, crop - w), 0, max(0, crop - h))
        image = F.pad(image, pad)
        labels = F.pad(labels, pad, value=IGNORE)
        valid = F.pad(valid, pad, value=False)
        h, w = image.shape[-2:]
        y = int(torch.randint(0, h - crop + 1, (), generator=generator))
        x = int(torch.randint(0, w - crop + 1, (), generator=generator))
        image, labels = image[:, y:y + crop, x:x + crop], labels[y:y + crop, x:x + crop]
        valid = valid[y:y + crop, x:x + crop]
    return {**sample, "image": image.contiguous(), "labels": labels.contiguous(),
            "valid": valid.contiguous()}


def same_size_batches(data, batch_size: int):
    """Consecutive samples of ``data`` in batches of at most ``batch_size`` equal-size images."""
    batch: list[dict] = []
    for i in range(len(data)):
        s = data[i]
        if batch and (len(batch) == batch_size or s["image"].shape != batch[0]["image"].shape):
            yield collate_semantic(batch)
            batch = []
        batch.append(s)
    if batch:
        yield collate_semantic(batch)
