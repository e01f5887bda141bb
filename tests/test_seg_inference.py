"""Sliding-window / short-side inference and the training crop (segmentors/inference.py)."""

from __future__ import annotations

import pytest
import torch

from distill.data.semantic import IGNORE
from segmentors.inference import (
    random_resize_crop,
    segment_logits,
    short_side_size,
    slide_logits,
    window_starts,
)


def test_window_origins_cover_the_image_and_end_flush():
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]
    assert window_starts(3, 4, 3) == [0]
    assert window_starts(4, 4, 4) == [0]


def test_sliding_window_of_a_pointwise_function_is_the_whole_image_result():
    image = torch.randint(0, 256, (2, 3, 37, 53), dtype=torch.uint8)

    def pointwise(x):
        return x.float() * 2 - 1  # 3 "classes", each pixel's own value

    whole = segment_logits(pointwise, image)
    slid = segment_logits(pointwise, image, window=16, stride=11)
    assert slid.shape == (2, 3, 37, 53)
    torch.testing.assert_close(slid, whole)
    torch.testing.assert_close(whole, image.float() * 2 - 1)


def test_overlapping_windows_are_averaged():
    image = torch.zeros(1, 3, 4, 6, dtype=torch.uint8)
    image[..., 4:] = 90  # crop [0, 4) has mean 0, crop [2, 6) mean 45

    def crop_mean(x):  # one class whose logit is the crop's mean everywhere
        return x.float().mean(dim=(1, 2, 3), keepdim=True).expand(-1, 1, *x.shape[-2:])

    out = slide_logits(crop_mean, image, window=4, stride=2)[0, 0]
    # columns 0-1 only in crop 0, 2-3 in both, 4-5 only in crop 1
    expected = torch.tensor([0.0, 0.0, 22.5, 22.5, 45.0, 45.0]).expand(4, 6)
    torch.testing.assert_close(out, expected)


def test_small_images_are_padded_to_the_window_and_cropped_back():
    image = torch.randint(0, 256, (1, 3, 5, 7), dtype=torch.uint8)
    out = slide_logits(lambda x: x.float(), image, window=8, stride=4)
    torch.testing.assert_close(out, image.float())


def test_short_side_inference_returns_the_original_resolution():
    image = torch.randint(0, 256, (1, 3, 30, 45), dtype=torch.uint8)
    seen = []

    def fn(x):
        seen.append(tuple(x.shape[-2:]))
        return torch.zeros(x.shape[0], 4, x.shape[-2] // 4, x.shape[-1] // 4)

    assert segment_logits(fn, image, short_side=64).shape == (1, 4, 30, 45)
    assert seen == [(64, 96)]
    assert short_side_size(30, 45, 0) == (30, 45)
    assert short_side_size(512, 683, 256) == (256, 342)


def test_bad_stride_is_refused():
    with pytest.raises(ValueError, match="stride"):
        slide_logits(lambda x: x.float(), torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 4, 0)


def test_random_resize_crop_pads_labels_with_ignore():
    torch.manual_seed(0)
    image = torch.full((3, 10, 20), 7, dtype=torch.uint8)
    labels = torch.full((10, 20), 3, dtype=torch.int64)
    out = random_resize_crop({"image": image, "labels": labels, "file_name": "x"},
                             short_side=20, crop=32)
    assert out["image"].shape == (3, 32, 32) and out["labels"].shape == (32, 32)
    # resized to 20 x 40 then cropped to 32 columns: rows 20..31 are padding
    assert (out["labels"][20:] == IGNORE).all() and (out["labels"][:20] == 3).all()
    assert (out["image"][:, 20:] == 0).all() and (out["image"][:, :20] == 7).all()
    assert out["file_name"] == "x"


def test_random_resize_crop_scale_range_draws_the_size():
    torch.manual_seed(0)
    sample = {"image": torch.zeros(3, 100, 150, dtype=torch.uint8),
              "labels": torch.zeros(100, 150, dtype=torch.int64)}
    sizes = {random_resize_crop(sample, 50, 0, (0.5, 2.0))["image"].shape[-2] for _ in range(20)}
    assert min(sizes) >= 25 and max(sizes) <= 100 and len(sizes) > 5
    same = random_resize_crop(sample, 0, 0)
    assert same["image"].shape == (3, 100, 150)
