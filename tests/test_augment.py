"""Large-scale jitter (detectors/augment.py): the window, the image, ground-truth boxes and
masks, and the cached distillation boxes with their embeddings, against hand-computed crops."""

from __future__ import annotations

import pytest
import torch

from detectors.augment import PAD_RGB, crop_target, jitter_window, large_scale_jitter
from detectors.recipe import DistillationSet
from distill.config import ConfigError


def _image(h: int, w: int) -> torch.Tensor:
    """(3, H, W) uint8 whose pixel (y, x) is (y, x, 7): a crop shows where it came from."""
    y = torch.arange(h)[:, None].expand(h, w)
    x = torch.arange(w)[None, :].expand(h, w)
    return torch.stack([y, x, torch.full((h, w), 7)]).to(torch.uint8)


def test_the_window_by_hand():
    # 100 x 100 to a 50 square at scale 2: r = 50 * 2 / 100 = 1, so a 50 x 50 window of the
    # image, placed at 0.5 of the 51 free rows (top 25) and 0 of the columns
    assert jitter_window(100, 100, 50, 2.0, (0.5, 0.0)) == (25, 0, 50, 50, 50, 50)
    # scale 0.5: r = 0.25, the whole image fits, 25 x 25 after scaling
    assert jitter_window(100, 100, 50, 0.5, (0.9, 0.9)) == (0, 0, 100, 100, 25, 25)
    # 200 x 100 (H x W) at scale 1: r = 50 / 200; window rows all 200, out 50 x 25
    assert jitter_window(200, 100, 50, 1.0, (0.3, 0.3)) == (0, 0, 200, 100, 50, 25)
    # 80 x 160 at scale 1.6: r = 0.5, window 80 x 100 of the 160 columns, u = 0.6 of the 61
    # free columns -> left 36; out 40 x 50
    assert jitter_window(80, 160, 50, 1.6, (0.0, 0.6)) == (0, 36, 80, 100, 40, 50)


def test_boxes_masks_and_rows_in_a_zoomed_window():
    window = (25, 0, 50, 50, 50, 50)  # r = 1: a plain cut of rows 25-75, columns 0-50
    masks = torch.zeros(3, 100, 100, dtype=torch.uint8)
    masks[0, 20:40, 10:60] = 1
    masks[1, 80:95, 70:90] = 1
    masks[2, 30:70, 40:45] = 1
    target = {"boxes": torch.tensor([[10.0, 20, 60, 40], [70, 80, 90, 95], [40, 30, 45, 70]]),
              "labels": torch.tensor([4, 5, 6]), "masks": masks}
    out = crop_target(target, window, 50)
    # box 0 shifted up by 25 and clipped at the window's top and right; box 1 leaves the
    # window (dropped with its label and mask); box 2 inside, shifted
    assert torch.equal(out["boxes"], torch.tensor([[10.0, 0, 50, 15], [40, 5, 45, 45]]))
    assert out["labels"].tolist() == [4, 6]
    assert torch.equal(out["masks"], masks[[0, 2], 25:75, 0:50])


def test_a_shrunk_window_is_scaled_and_padded():
    window = jitter_window(100, 100, 50, 0.5, (0.0, 0.0))  # whole image -> 25 x 25
    masks = torch.zeros(1, 100, 100, dtype=torch.uint8)
    masks[0, 0:40, 20:100] = 1
    out = crop_target({"boxes": torch.tensor([[20.0, 0, 100, 40]]), "masks": masks}, window, 50)
    assert torch.equal(out["boxes"], torch.tensor([[5.0, 0, 25, 10]]))  # x 0.25
    want = torch.zeros(1, 50, 50, dtype=torch.uint8)
    want[0, 0:10, 5:25] = 1  # nearest: every 4th pixel, then zero padding
    assert torch.equal(out["masks"], want)

    image, (t,) = large_scale_jitter(_image(100, 100), [{"boxes": torch.zeros(0, 4)}], 50,
                                     (0.5, 0.5))
    assert image.shape == (3, 50, 50) and image.dtype == torch.uint8
    assert (image[:, 25:, :] == torch.tensor(PAD_RGB)[:, None, None]).all()
    assert (image[:, :, 25:] == torch.tensor(PAD_RGB)[:, None, None]).all()
    assert image[2, :25, :25].eq(7).all() and t["boxes"].shape == (0, 4)
    # the antialiased 4x shrink averages 4 x 4 blocks: rows 4k..4k+3 -> about 4k + 1.5
    assert (image[0, :25, 0].float() - (torch.arange(25) * 4 + 1.5)).abs().max() <= 1


def test_the_image_moves_with_its_boxes():
    """Scale 2 of a 100 x 100 image into a 50 square (r = 1): the pixels under a box after
    the jitter are the ones under it before."""
    image = _image(100, 100)
    box = torch.tensor([[30.0, 40, 60, 70]])
    kept = 0
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        out, (t,) = large_scale_jitter(image, [{"boxes": box}], 50, (2.0, 2.0), g)
        if len(t["boxes"]) == 0:
            continue
        kept += 1
        x1, y1, x2, y2 = t["boxes"][0].round().int().tolist()
        # pixel (y, x) of the output holds the input's (row, column) in channels 0, 1
        rows, cols = out[0, y1:y2, x1:x2], out[1, y1:y2, x1:x2]
        assert rows.min() >= 40 and rows.max() < 70 and cols.min() >= 30 and cols.max() < 60
    assert kept >= 2


class _Data:
    """One sample in CocoDetection's format."""

    def __init__(self):
        self.sample = {"image": _image(100, 100), "image_id": 7,
                       "boxes": torch.tensor([[10.0, 10, 30, 30]]), "labels": torch.tensor([1])}

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return dict(self.sample)


class _Cache:
    """Cached proposals whose embedding row k is k: the rows kept say which boxes stayed."""

    def get(self, image_id):
        boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 60, 60], [90, 90, 99, 99]])
        return {"boxes": boxes, "embeddings": torch.arange(3.0)[:, None].expand(3, 4),
                "scores": torch.ones(3)}


def test_the_training_set_jitters_distillation_boxes_with_their_embeddings():
    data = DistillationSet(_Data(), _Cache(), flip=False, scale_jitter=[2.0, 2.0], size=50)
    seen = set()
    for seed in range(12):
        s = data.sample(0, torch.Generator().manual_seed(seed))
        assert s["image"].shape == (3, 50, 50)
        d = s["distill"]
        assert len(d["boxes"]) == len(d["embeddings"])
        for box, row in zip(d["boxes"], d["embeddings"][:, 0].long(), strict=True):
            # r = 1: the kept box is the cached one shifted by the window and clipped
            full = _Cache().get(7)["boxes"][row]
            assert (box[2:] - box[:2] <= full[2:] - full[:2] + 1e-4).all()
            assert (box >= 0).all() and (box <= 50).all()
        seen.add(tuple(d["embeddings"][:, 0].long().tolist()))
        again = data.sample(0, torch.Generator().manual_seed(seed))  # seeded per sample
        assert torch.equal(again["image"], s["image"]) and torch.equal(again["distill"]["boxes"],
                                                                        d["boxes"])
    assert len(seen) > 1  # different windows keep different boxes


def test_a_bad_scale_range_is_one_line():
    with pytest.raises(ConfigError, match=r"data.scale_jitter: \[low, high\]"):
        DistillationSet(_Data(), None, scale_jitter=[2.0, 0.1], size=50)


def test_masks_drawn_in_the_window_match_full_size_masks_cropped():
    """window_masks draws polygons straight into the jitter window (flip included) where
    crop_target resizes full-size masks: the same masks up to the rasterisation at the
    border (IoU > 0.9 on real COCO polygons), nothing outside the window, RLE as before."""
    import json
    from pathlib import Path

    from detectors.augment import hflip_target, window_masks
    from distill.data.coco import decode_mask

    coco = json.loads((Path(__file__).parent / "fixtures/coco_instances_val2014_100.json")
                      .read_text())
    image = coco["images"][0]
    h, w = image["height"], image["width"]
    anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
    segs = [a["segmentation"] for a in anns]
    full = torch.stack([torch.from_numpy(decode_mask(s, h, w)) for s in segs])
    boxes = torch.tensor([[0.0, 0, w, h]] * len(segs))
    for flipped in (False, True):
        for window in (jitter_window(h, w, 256, 0.8, (0.3, 0.6)),
                       jitter_window(h, w, 256, 1.7, (0.5, 0.2))):
            target = {"boxes": boxes, "masks": full}
            if flipped:
                target = hflip_target(target, w)
            want = crop_target(target, window, 256)["masks"]
            got = window_masks(segs, (h, w), window, 256, flipped)
            assert got.shape == want.shape == (len(segs), 256, 256) and got.dtype == torch.uint8
            _, _, _, _, out_h, out_w = window
            assert got[:, out_h:].sum() == 0 and got[:, :, out_w:].sum() == 0
            for g, m in zip(got.bool(), want.bool(), strict=True):
                union = (g | m).sum()
                if union > 50:  # objects with some pixels left in the window
                    assert (g & m).sum() / union > 0.9
    rle = {"size": [h, w], "counts": [w * 10 + 5, 30, h * w - w * 10 - 35]}
    window = jitter_window(h, w, 256, 1.0, (0.0, 0.0))
    want = crop_target({"boxes": boxes[:1], "masks": torch.from_numpy(
        decode_mask(rle, h, w))[None]}, window, 256)["masks"]
    assert torch.equal(window_masks([rle], (h, w), window, 256), want)
    assert window_masks([[]], (h, w), window, 256).sum() == 0
