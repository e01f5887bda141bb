"""Segmenter losses of distill/losses.py and segmentors/criterion.py (pixel distillation, MaskCLIP+ pseudo-labels,
base-class supervision) against hand computations on 2x2 / 4x4 maps (D = 2, C = 2 or 3)."""

import math

import pytest
import torch

from distill.config import ConfigError, SegmenterConfig
from distill.losses import (
    MissingOutputError,
    pixel_distill_loss,
    pseudo_label_loss,
    supervised_seg_loss,
)
from segmentors.criterion import SegmentationCriterion

R = math.sqrt(0.5)


def lse(*xs: float) -> float:
    return math.log(sum(math.exp(x) for x in xs))


def dense(*pixels, h: int, w: int, grad: bool = False) -> torch.Tensor:
    """Row-major list of per-pixel vectors -> (1, D, h, w)."""
    x = torch.tensor(pixels, dtype=torch.float32).reshape(h, w, -1).permute(2, 0, 1)[None]
    return x.contiguous().requires_grad_(grad)


# student (1, 2, 2, 2), L2-normalised; teacher unnormalised at the same 2x2
STUDENT = ((1.0, 0.0), (0.0, 1.0), (0.6, 0.8), (1.0, 0.0))
TEACHER = ((2.0, 0.0), (3.0, 4.0), (0.0, 5.0), (0.0, -1.0))  # -> (1,0) (.6,.8) (0,1) (0,-1)
# L1 per pixel: 0, 0.6 + 0.2, 0.6 + 0.2, 1 + 1; 1 - cos: 0, 0.2, 0.2, 1


# --------------------------------------------------------------------------- pixel distill


def test_pixel_distill_l1_and_cosine_by_hand():
    s = dense(*STUDENT, h=2, w=2, grad=True)
    teacher = dense(*TEACHER, h=2, w=2, grad=True)
    l1 = pixel_distill_loss(s, teacher)
    assert l1.item() == pytest.approx((0 + 0.8 + 0.8 + 2.0) / 4, rel=1e-6)
    l1.backward()
    # d/ds = sign(s - t) / 4 per component; pixel (1, 1): s - t = (1, 1)
    assert s.grad[0, :, 1, 1].tolist() == pytest.approx([0.25, 0.25])
    assert s.grad[0, :, 0, 1].tolist() == pytest.approx([-0.25, 0.25])  # (0,1) - (.6,.8)
    assert teacher.grad is None  # the teacher is detached
    cos = pixel_distill_loss(s, teacher, mode="cosine")
    assert cos.item() == pytest.approx((0 + 0.2 + 0.2 + 1.0) / 4, rel=1e-6)


def test_pixel_distill_valid_mask():
    s = dense(*STUDENT, h=2, w=2, grad=True)
    valid = torch.tensor([[[True, False], [False, True]]])
    loss = pixel_distill_loss(s, dense(*TEACHER, h=2, w=2), valid=valid)
    assert loss.item() == pytest.approx((0 + 2.0) / 2, rel=1e-6)
    loss.backward()
    assert s.grad[0, :, 0, 1].tolist() == [0.0, 0.0]  # masked pixels get no gradient
    assert s.grad[0, :, 1, 1].tolist() == pytest.approx([0.5, 0.5])


def test_pixel_distill_resizes_teacher_bilinear_then_normalises():
    # teacher 4x4, student 2x2 of (1, 0): a 2x downsample with align_corners=False averages
    # each 2x2 block: (2,0) -> (1,0): L1 0; checkerboard (1,0)/(0,1) -> (R, R): L1 1;
    # (0,1) -> L1 2; columns (1,0) and (0,3) -> (0.5, 1.5) -> (1, 3) / sqrt(10):
    # L1 1 + 2 / sqrt(10) (normalising before resizing would give (R, R) there)
    t = torch.zeros(1, 2, 4, 4)
    t[0, 0, :2, :2] = 2.0
    t[0, 0, :2, 2:] = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t[0, 1, :2, 2:] = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    t[0, 1, 2:, :2] = 1.0
    t[0, 0, 2:, 2] = 1.0
    t[0, 1, 2:, 3] = 3.0
    s = dense(*[(1.0, 0.0)] * 4, h=2, w=2, grad=True)
    r10 = math.sqrt(10)
    assert pixel_distill_loss(s, t).item() == pytest.approx((0 + 1 + 2 + 1 + 2 / r10) / 4, rel=1e-6)
    assert pixel_distill_loss(s, t, mode="cosine").item() == pytest.approx(
        (0 + (1 - R) + 1 + (1 - 1 / r10)) / 4, rel=1e-6)
    # valid at the teacher's 4x4 is resized with nearest: only block (1, 0) is kept
    valid = torch.zeros(1, 4, 4, dtype=torch.bool)
    valid[0, 2:, :2] = True
    assert pixel_distill_loss(s, t, valid=valid).item() == pytest.approx(2.0, rel=1e-6)


def test_pixel_distill_no_valid_pixel_is_exact_zero():
    s = dense(*STUDENT, h=2, w=2, grad=True)
    loss = pixel_distill_loss(s, dense(*TEACHER, h=2, w=2), valid=torch.zeros(1, 2, 2, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    empty = torch.zeros(0, 2, 2, 2, requires_grad=True)
    assert pixel_distill_loss(empty, torch.zeros(0, 2, 4, 4)).item() == 0.0


def test_pixel_distill_rejects_bad_input():
    s = dense(*STUDENT, h=2, w=2)
    with pytest.raises(ValueError, match="'l1' or 'cosine'"):
        pixel_distill_loss(s, s, mode="l2")
    with pytest.raises(ValueError, match=r"student \(1, 2, 2, 2\) and teacher \(1, 3, 2, 2\)"):
        pixel_distill_loss(s, torch.zeros(1, 3, 2, 2))


# --------------------------------------------------------------------------- pseudo-labels

# teacher 2x2, C = 2: labels [[0, 1], [0, 1]], max softmax p = [[.881, .731], [.525, .953]]
TEACHER_LOGITS = ((2.0, 0.0), (0.0, 1.0), (0.1, 0.0), (0.0, 3.0))
STUDENT_LOGITS = ((1.0, 0.0), (0.0, 0.0), (0.0, 2.0), (1.0, 1.0))
CE = [-1 + lse(1, 0), math.log(2), lse(0, 2), math.log(2)]  # per pixel, row-major


def test_pseudo_label_loss_by_hand_and_threshold():
    s = dense(*STUDENT_LOGITS, h=2, w=2, grad=True)
    teacher = dense(*TEACHER_LOGITS, h=2, w=2, grad=True)
    assert pseudo_label_loss(s, teacher).item() == pytest.approx(sum(CE) / 4, rel=1e-6)
    loss = pseudo_label_loss(s, teacher, threshold=0.6)  # pixel (1, 0) at p 0.525 ignored
    assert loss.item() == pytest.approx((CE[0] + CE[1] + CE[3]) / 3, rel=1e-6)
    loss.backward()
    assert s.grad[0, :, 1, 0].tolist() == [0.0, 0.0]
    assert s.grad[0, :, 0, 0].abs().sum() > 0
    assert teacher.grad is None
    only_last = pseudo_label_loss(s, teacher, threshold=0.9)  # only p 0.953 stays
    assert only_last.item() == pytest.approx(CE[3], rel=1e-6)


def test_pseudo_labels_at_teacher_resolution_then_nearest():
    # teacher 4x4: nearest to 2x2 keeps the block corners (0,0) (0,2) (2,0) (2,2), which
    # hold TEACHER_LOGITS; the other 3 pixels of each block say the opposite class at 5.0,
    # so averaging or bilinear resizing would flip every label
    t = torch.zeros(1, 2, 4, 4)
    for k, logits in enumerate(TEACHER_LOGITS):
        y, x = 2 * (k // 2), 2 * (k % 2)
        corner = int(logits[1] > logits[0])
        t[0, 1 - corner, y:y + 2, x:x + 2] = 5.0
        t[0, :, y, x] = torch.tensor(logits)
    s = dense(*STUDENT_LOGITS, h=2, w=2, grad=True)
    assert pseudo_label_loss(s, t).item() == pytest.approx(sum(CE) / 4, rel=1e-6)
    # the confidence of the kept corner (1, 0) [0.1, 0] is 0.525: ignored at 0.6
    assert pseudo_label_loss(s, t, threshold=0.6).item() == pytest.approx(
        (CE[0] + CE[1] + CE[3]) / 3, rel=1e-6)


def test_pseudo_label_all_ignored_is_exact_zero():
    s = dense(*STUDENT_LOGITS, h=2, w=2, grad=True)
    loss = pseudo_label_loss(s, dense(*TEACHER_LOGITS, h=2, w=2), threshold=0.99)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    with pytest.raises(ValueError, match="ignore_index 1 is a class id"):
        pseudo_label_loss(s, dense(*TEACHER_LOGITS, h=2, w=2), ignore_index=1)


def test_pseudo_labels_over_some_classes_on_unlabeled_pixels_by_hand():
    # the transductive recipe: argmax (and confidence) over classes 1, 2 only, kept where
    # ``unlabeled``; teacher restricted to (c1, c2): (0, 0) (0, 1) (3, 0) (0, .1) ->
    # labels 1 (tie: first), 2 (p .731), 1 (p .953), 2 (p .525)
    s = dense((1.0, 0.0, 0.0), (0.0, 0.0, 2.0), (0.0, 1.0, 0.0), (5.0, 0.0, 0.0),
              h=2, w=2, grad=True)
    t = dense((2.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, 3.0, 0.0), (0.0, 0.0, 0.1), h=2, w=2)
    unlabeled = torch.tensor([[[False, True], [True, True]]])
    ce = {1: lse(0, 0, 2) - 2, 2: lse(0, 1, 0) - 1, 3: lse(5, 0, 0)}  # pixel -> CE of its label
    loss = pseudo_label_loss(s, t, classes=[1, 2], unlabeled=unlabeled)
    assert loss.item() == pytest.approx((ce[1] + ce[2] + ce[3]) / 3, rel=1e-6)
    loss = pseudo_label_loss(s, t, threshold=0.6, classes=[1, 2], unlabeled=unlabeled)
    assert loss.item() == pytest.approx((ce[1] + ce[2]) / 2, rel=1e-6)
    loss.backward()
    assert s.grad[0, :, 0, 0].tolist() == [0.0, 0.0, 0.0]  # labelled pixel: untouched
    # the mask is resized with nearest like the labels: 4x4 blocks of the 2x2 one
    big = unlabeled.repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert pseudo_label_loss(s, t, classes=[1, 2], unlabeled=big).item() == pytest.approx(
        (ce[1] + ce[2] + ce[3]) / 3, rel=1e-6)
    with pytest.raises(ValueError, match=r"classes \[3\] must be a non-empty subset of 0..2"):
        pseudo_label_loss(s, t, classes=[3])
    with pytest.raises(ValueError, match=r"unlabeled \(2, 2\) must be \(B, H, W\)"):
        pseudo_label_loss(s, t, unlabeled=unlabeled[0])


# --------------------------------------------------------------------------- supervised


def test_supervised_seg_loss_ignores_novel_classes():
    logits = dense((1.0, 0.0, 0.0), (0.0, 0.0, 2.0), (0.0, 1.0, 0.0), (5.0, 0.0, 0.0),
                   h=2, w=2, grad=True)
    labels = torch.tensor([[[0, 1], [2, 255]]])
    ce = [-1 + lse(1, 0, 0), lse(0, 0, 2), lse(0, 1, 0)]
    assert supervised_seg_loss(logits, labels).item() == pytest.approx(sum(ce) / 3, rel=1e-6)
    loss = supervised_seg_loss(logits, labels, novel_ids=(2,))
    assert loss.item() == pytest.approx((ce[0] + ce[1]) / 2, rel=1e-6)
    loss.backward()
    assert logits.grad[0, :, 1, 0].tolist() == [0.0] * 3  # novel pixel: unlabelled
    assert logits.grad[0, :, 1, 1].tolist() == [0.0] * 3  # ignore 255
    assert logits.grad[0, :, 0, 1].abs().sum() > 0
    assert labels.tolist() == [[[0, 1], [2, 255]]]  # the caller's labels are unchanged
    as_tensor = supervised_seg_loss(logits, labels, novel_ids=torch.tensor([2]))
    assert as_tensor.item() == pytest.approx(loss.item(), rel=1e-6)


def test_supervised_seg_loss_upsamples_logits_bilinear():
    # logits (1, 2, 1, 2) -> (1, 4): class 0 [0, 4] becomes [0, 1, 3, 4] (align_corners=False)
    logits = torch.tensor([[[[0.0, 4.0]], [[0.0, 0.0]]]], requires_grad=True)
    labels = torch.tensor([[[0, 0, 1, 1]]])
    want = (math.log(2) + (-1 + lse(1, 0)) + lse(3, 0) + lse(4, 0)) / 4
    assert supervised_seg_loss(logits, labels).item() == pytest.approx(want, rel=1e-6)


def test_supervised_seg_all_ignored_is_exact_zero():
    logits = torch.randn(1, 3, 2, 2, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss = supervised_seg_loss(logits, torch.tensor([[[2, 255], [255, 2]]]), novel_ids=[2])
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


# --------------------------------------------------------------------------- criterion


def seg_outputs() -> dict:
    return {
        "pixel_embeddings": dense(*STUDENT, h=2, w=2, grad=True),
        "dense_targets": dense(*TEACHER, h=2, w=2),
        "pixel_logits": dense((1.0, 0.0, 0.0), (0.0, 0.0, 2.0), (0.0, 1.0, 0.0), (5.0, 0.0, 0.0),
                              h=2, w=2, grad=True),
        "teacher_pixel_logits": dense((2.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, 3.0, 0.0),
                                      (0.0, 0.0, 0.1), h=2, w=2),
        "seg_labels": torch.tensor([[[0, 1], [2, 255]]]),
        "novel_ids": (2,),
    }


def test_criterion_dispatches_segmenter_losses():
    crit = SegmentationCriterion({"pixel_distill": 1.0, "pseudo_label": 2.0,
                      "supervised_seg": 0.5}, pseudo_label_threshold=0.5)
    o = seg_outputs()
    losses = crit(o)
    assert set(losses) == {"loss_pixel_distill", "loss_pseudo_label", "loss_supervised_seg"}
    assert losses["loss_pixel_distill"].item() == pytest.approx(0.9, rel=1e-6)
    # pseudo-labels [[0, 2], [1, 2]]; pixel (1, 1) at p 0.354 < 0.5 is ignored
    pl = (-1 + lse(1, 0, 0) + lse(0, 0, 2) - 2 + lse(0, 1, 0) - 1) / 3
    assert losses["loss_pseudo_label"].item() == pytest.approx(2.0 * pl, rel=1e-6)
    sup = (-1 + lse(1, 0, 0) + lse(0, 0, 2)) / 2  # class 2 novel, 255 ignored
    assert losses["loss_supervised_seg"].item() == pytest.approx(0.5 * sup, rel=1e-6)
    sum(losses.values()).backward()
    assert o["pixel_embeddings"].grad.abs().sum() > 0
    cosine = SegmentationCriterion.from_config(SegmenterConfig(
        supervised=0.0, pixel_distill=1.0, pixel_distill_mode="cosine"))
    assert cosine(seg_outputs())["loss_pixel_distill"].item() == pytest.approx(0.35, rel=1e-6)
    o = seg_outputs()
    o["dense_valid"] = torch.zeros(1, 2, 2, dtype=torch.bool)
    assert cosine(o)["loss_pixel_distill"].item() == 0.0


def test_criterion_pseudo_labels_only_unlabeled_pixels_over_novel_classes():
    # seg_labels [[0, 1], [2, 255]], novel (2,): pixels (1, 0) (novel) and (1, 1) (255) get
    # the teacher's best novel class (2, the only one); the others keep their labels
    crit = SegmentationCriterion({"pseudo_label": 1.0}, pseudo_label_scope="unlabeled")
    loss = crit(seg_outputs())["loss_pseudo_label"]
    assert loss.item() == pytest.approx((lse(0, 1, 0) + lse(5, 0, 0)) / 2, rel=1e-6)
    o = seg_outputs()
    o["novel_ids"] = ()
    with pytest.raises(MissingOutputError, match="non-empty 'novel_ids'"):
        crit(o)
    with pytest.raises(ValueError, match="pseudo_label_scope must be 'all' or 'unlabeled'"):
        SegmentationCriterion(pseudo_label_scope="novel")


def test_criterion_is_base_only_by_default_as_the_seg_section_and_checks_keys():
    assert SegmentationCriterion().weights == {"supervised_seg": 1.0, "pixel_distill": 0.0,
                                               "pseudo_label": 0.0}
    assert SegmentationCriterion.from_config(SegmenterConfig()).weights == \
        SegmentationCriterion().weights
    assert SegmentationCriterion({"pseudo_label": 1.0}).weights["pseudo_label"] == 1.0
    o = seg_outputs()
    del o["seg_labels"]
    with pytest.raises(MissingOutputError, match="seg_labels"):
        SegmentationCriterion({"supervised_seg": 1.0})(o)
    with pytest.raises(KeyError, match="pixel_distil'"):
        SegmentationCriterion({"pixel_distil": 1.0})
    with pytest.raises(ValueError, match="pixel_distill_mode"):
        SegmentationCriterion(pixel_distill_mode="l2")
    with pytest.raises(ConfigError, match=r"^seg\.pixel_distill_reduction must be 'sum' or "
                                          r"'mean', got 'max'$"):
        SegmentationCriterion.from_config(SegmenterConfig(pixel_distill_reduction="max"))
    with pytest.raises(KeyError, match="vild_text"):  # no detection loss in a segmenter's
        SegmentationCriterion({"vild_text": 1.0})


def test_bilinear_pseudo_labels_at_label_resolution_by_hand():
    """MaskCLIP+: the teacher's (1 x 2) logits upsampled bilinearly to the labels' 1 x 4 (the
    sample points fall at -0.25, 0.25, 0.75, 1.25 of the coarse grid, clamped at the ends),
    the argmax there, and the student's logits upsampled the same way."""
    teacher = dense((1.0, 0.0), (0.0, 4.0), h=1, w=2)  # class 0 [1, 0], class 1 [0, 4]
    student = dense((1.0, 0.0), (0.0, 0.0), h=1, w=2, grad=True)
    # class 0 upsampled: [1, 0.75, 0.25, 0]; class 1: [0, 1, 3, 4] -> labels [0, 1, 1, 1]
    # (the coarse argmax [0, 1] resized by nearest would give [0, 0, 1, 1])
    s0 = [1.0, 0.75, 0.25, 0.0]  # the student's class 0; its class 1 is 0 everywhere
    want = ((-s0[0] + lse(s0[0], 0)) + lse(s0[1], 0) + lse(s0[2], 0) + lse(s0[3], 0)) / 4
    got = pseudo_label_loss(student, teacher, label_size=(1, 4))
    assert got.item() == pytest.approx(want, rel=1e-6)
    nearest = pseudo_label_loss(student, teacher)  # today's: the argmax [0, 1] at 1 x 2
    assert nearest.item() == pytest.approx(((-1 + lse(1, 0)) + lse(0, 0)) / 2, rel=1e-6)
    crit = SegmentationCriterion({"pseudo_label": 1.0}, pseudo_label_upsample="bilinear")
    out = crit({"pixel_logits": student, "teacher_pixel_logits": teacher,
                "seg_labels": torch.full((1, 1, 4), 255)})
    assert out["loss_pseudo_label"].item() == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="pseudo_label_upsample must be 'nearest' or"):
        SegmentationCriterion(pseudo_label_upsample="bicubic")


def test_the_l1_mean_over_dimensions_is_the_sum_over_d():
    s, t = dense(*STUDENT, h=2, w=2), dense(*TEACHER, h=2, w=2)
    total = pixel_distill_loss(s, t)
    assert pixel_distill_loss(s, t, reduction="mean").item() == pytest.approx(
        total.item() / s.shape[1], rel=1e-6)
    with pytest.raises(ValueError, match="reduction must be 'sum' or 'mean'"):
        pixel_distill_loss(s, t, reduction="max")


@pytest.mark.parametrize("upsample", ["nearest", "bilinear"])
def test_padding_is_ignored_in_every_loss(upsample):
    """A crop padded at the right and bottom (padding: labels 255, ``dense_valid`` False,
    anything in the maps) gives every segmenter loss of its unpadded crop."""
    from segmentors.inference import random_resize_crop

    g = torch.Generator().manual_seed(0)
    h, w, d, c = 3, 4, 5, 3
    maps = {"pixel_embeddings": torch.nn.functional.normalize(torch.randn(1, d, h, w,
                                                                         generator=g), dim=1),
            "dense_targets": torch.randn(1, d, h, w, generator=g),
            "pixel_logits": torch.randn(1, c, h, w, generator=g),
            "teacher_pixel_logits": torch.randn(1, c, h, w, generator=g),
            "seg_labels": torch.tensor([[[0, 1, 2, 255], [1, 1, 0, 2], [2, 0, 255, 1]]])}
    crop = random_resize_crop({"image": torch.zeros(3, h, w, dtype=torch.uint8),
                               "labels": maps["seg_labels"][0]}, 0, 6, generator=g)
    valid = crop["valid"]  # the crop's own record of its padding
    assert valid.shape == (6, 6) and int(valid.sum()) == h * w
    assert bool(valid[:h, :w].all()) and crop["labels"][~valid].eq(255).all()
    padded = {}
    for k, v in maps.items():
        fill = 255 if k == "seg_labels" else 0.0
        big = torch.full((*v.shape[:-2], 6, 6), fill, dtype=v.dtype)
        if k != "seg_labels":  # junk in the padding: it must not count
            big = big + 7 * torch.rand(big.shape, generator=g)
        big[..., :h, :w] = v
        padded[k] = big
    padded["dense_valid"] = valid[None]
    for mode in ("all", "unlabeled"):
        crit = SegmentationCriterion({"pixel_distill": 1.0, "pseudo_label": 1.0,
                          "supervised_seg": 1.0}, pseudo_label_scope=mode,
                         pseudo_label_upsample=upsample)
        small = crit({**maps, "novel_ids": (2,)})
        big = crit({**padded, "novel_ids": (2,)})
        assert set(small) == set(big) == {"loss_pixel_distill", "loss_pseudo_label",
                                          "loss_supervised_seg"}
        for k in small:
            assert big[k].item() == pytest.approx(small[k].item(), rel=1e-5), (mode, k)
    # without the valid pixels the padding would count
    del padded["dense_valid"]
    assert crit({**padded, "novel_ids": (2,)})["loss_pixel_distill"].item() != pytest.approx(
        small["loss_pixel_distill"].item(), rel=1e-3)
