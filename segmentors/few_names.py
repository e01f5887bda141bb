"""How a segmenter's label maps hold up when the user names only a few classes, and the
score below which a pixel is left unlabelled ("none of these").

    m = few_names(model, val, teacher.text(val.classes), cfg.seg)
    m["threshold"]      # the cut with the best 3-name mIoU: the export's thresholds.pixel

Each vocabulary is a random ``size``-name subset of the classes (``rounds`` partitions,
distill.data.vocab.subsets); every other class stays in the pictures, unnamed. At each
score cut of ``thresholds`` a pixel takes its best-scoring name, or none when that score
is below the cut. Per named class, IoU = pixels of it labelled it / (pixels labelled it +
its pixels - both): a pixel of an unnamed class painted with the name counts against the
name, and a pixel of the class left unlabelled counts as missed. A class's 3-name IoU is
its mean over the subsets that name it; the 3-name mIoU is the mean over the classes that
the mIoU with every name and no cut averages (present in val or predicted), beside it. Also per cut: the share
of the pixels of unnamed classes painted with a name.

The scores are vocabulary-independent (reference scoring, distill/scoring.py), so one pass
with every name gives each subset's scores as a column selection. On a large split the
measure takes ``max_images`` images evenly spread over it and at most ``max_pixels``
evenly spread labelled pixels of each (ADE20k: 500 of 2000 images; the embedded world's
300 images of 160 x 160 pixels are taken whole).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Subset
from tqdm import tqdm

from distill.data.semantic import IGNORE
from distill.data.vocab import subsets
from distill.engine import get_rank, reduce_over_ranks, shard
from segmentors.inference import same_size_batches, segment_logits
from segmentors.model import PixelEmbeddingSegmenter

THRESHOLDS = tuple(round(0.1 * k, 1) for k in range(10))  # 0.0 (every pixel named) .. 0.9


def _iou(hit: torch.Tensor, predicted: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """IoU from pixel counts (NaN where the class is neither predicted nor present)."""
    union = predicted + truth - hit
    return torch.where(union > 0, hit / union.clamp(min=1), torch.full_like(hit, float("nan")))


@torch.no_grad()
def few_names(model: PixelEmbeddingSegmenter, data, text: torch.Tensor, seg,
              thresholds: Sequence[float] = THRESHOLDS, size: int = 3, rounds: int = 3,
              seed: int = 0, batch_size: int = 8, max_images: int = 500,
              max_pixels: int = 100_000, progress: bool = True) -> dict:
    """The measure of the module docstring on ``data`` (a semantic dataset, ``text`` (C, D)
    its classes' embeddings), inference as ``seg`` says (short side, window), on at most
    ``max_images`` images and ``max_pixels`` labelled pixels of each. Returns
    ``all`` (mIoU, every name), ``by_threshold`` {cut: {"few": 3-name mIoU,
    "unnamed_painted": share}}, ``threshold`` (the cut with the best ``few``, the lowest on
    a tie), ``few`` and ``unnamed_painted`` at it, and ``per_class`` {name: {"all", "few"}}
    at it."""
    classes = list(data.classes)
    num = len(classes)
    groups = subsets(num, size, rounds, seed)
    named = torch.zeros(len(groups), num, dtype=torch.bool)
    for g, group in enumerate(groups):
        named[g, group] = True
    cuts = torch.tensor(list(thresholds), dtype=torch.float32)
    t = len(cuts)
    hit = torch.zeros(len(groups), t, num)  # pixels of a class labelled it
    predicted = torch.zeros(len(groups), t, num)  # pixels labelled a class
    painted = torch.zeros(len(groups), t)  # pixels of unnamed classes labelled a name
    unnamed = torch.zeros(len(groups))
    truth, hit_all, predicted_all = torch.zeros(num), torch.zeros(num), torch.zeros(num)
    offsets = (torch.arange(t) * num)[:, None]
    saved = model.text_embeddings
    device = next(model.parameters()).device
    model.set_vocabulary(text)
    if len(data) > max_images:
        data = Subset(data, torch.linspace(0, len(data) - 1, max_images).round().long().tolist())
    data = Subset(data, shard(len(data)))  # under torchrun each rank counts its slice
    try:
        with tqdm(total=len(data), desc="few names",
                  disable=not progress or get_rank() != 0) as bar:
            for batch in same_size_batches(data, batch_size):
                logits = segment_logits(model.score_logits, batch["images"].to(device),
                                        seg.short_side, seg.window, seg.stride)
                scores = model.name_scores(logits).cpu()
                for s, gt in zip(scores, batch["labels"], strict=True):
                    valid = gt != IGNORE
                    s, gt = s[:, valid], gt[valid]  # (C, N), (N,)
                    if len(gt) > max_pixels:
                        keep = torch.linspace(0, len(gt) - 1, max_pixels).round().long()
                        s, gt = s[:, keep], gt[keep]
                    truth += torch.bincount(gt, minlength=num)[:num]
                    pred = s.argmax(0)
                    predicted_all += torch.bincount(pred, minlength=num)
                    hit_all += torch.bincount(pred[pred == gt], minlength=num)
                    for g, group in enumerate(groups):
                        best, k = s[group].max(0)
                        label = torch.as_tensor(group)[k]
                        on = best[None] >= cuts[:, None]  # (T, N): labelled at each cut
                        index = (offsets + label[None]).expand(t, -1)
                        predicted[g] += torch.bincount(index[on], minlength=t * num).view(t, num)
                        right = on & (label == gt)[None]
                        hit[g] += torch.bincount(index[right], minlength=t * num).view(t, num)
                        outside = ~named[g][gt]
                        unnamed[g] += outside.sum()
                        painted[g] += (on & outside[None]).sum(1)
                bar.update(len(scores))
    finally:
        model.text_embeddings = saved
    reduce_over_ranks(hit, predicted, painted, unnamed, truth, hit_all, predicted_all)
    iou = _iou(hit, predicted, truth.expand_as(hit))  # (G, T, C)
    iou = torch.where(named[:, None, :], iou, torch.nan)
    few = iou.nanmean(0)  # (T, C): each class over the subsets naming it
    all_iou = _iou(hit_all, predicted_all, truth)
    present = ~all_iou.isnan()  # as the mIoU: classes present or predicted
    few_miou = few[:, present].nanmean(1)
    share = painted.sum(0) / unnamed.sum().clamp(min=1)
    best = int(torch.argmax(torch.nan_to_num(few_miou, nan=-1.0)))
    return {"all": float(all_iou[present].mean()), "threshold": float(cuts[best]),
            "few": float(few_miou[best]), "unnamed_painted": float(share[best]),
            "by_threshold": {float(c): {"few": float(f), "unnamed_painted": float(p)}
                             for c, f, p in zip(cuts, few_miou, share, strict=True)},
            "per_class": {classes[c]: {"all": float(all_iou[c]), "few": float(few[best, c])}
                          for c in range(num) if present[c]},
            "size": size, "subsets": len(groups)}
