"""CLIPSelf (Wu et al., ICLR 2024): a CLIP image tower distilled into itself, so that its
dense embeddings of a region come close to its embedding of that region's crop.

Each unlabelled training image (resized to the teacher's dense input size) is cut into a
random grid of m x n regions (m, n uniform in 1..``max_split``), or, in CLIPSelf's
region-proposal variant (``refine.proposals``), its regions are the top proposals of an
RPN trained on base classes (no class labels either way). The frozen tower embeds
the crop of every region (its ordinary image path, 1x crops at the tower's input size);
the trainable copy's dense features (:func:`distill.teacher.dense.dense_features`: the
MaskCLIP value path of a ViT, the attention pool's value path of a ResNet) are averaged
over the same region (:func:`distill.teacher.dense.pool_regions`). The loss is 1 - cosine between the two,
averaged over the regions (:func:`clipself_loss`). The text tower is untouched.

    record = refine_and_save(cfg, progress=True)   # writes cfg.refine.output (+ .json)

The engine trains it (distill/engine.py: checkpoints, exact resume, progress); the result
is the whole CLIP model with the refined image tower, a safetensors file that open_clip
loads as the same model (``teacher.pretrained=<file>``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import clip_boxes_to_image, remove_small_boxes

from distill.config import ConfigError, ExperimentConfig, atomic_write
from distill.teacher.clip import Teacher, cut_crops, save_clip
from distill.teacher.dense import dense_features, pool_regions


def grid_boxes(height: int, width: int, rows: int, cols: int) -> Tensor:
    """The ``rows`` x ``cols`` cells of an image of ``height`` x ``width`` pixels, row-major,
    (rows * cols, 4) xyxy (cell edges at i * height / rows, rounded to no pixel)."""
    ys = torch.linspace(0, height, rows + 1)
    xs = torch.linspace(0, width, cols + 1)
    y1, x1 = torch.meshgrid(ys[:-1], xs[:-1], indexing="ij")
    y2, x2 = torch.meshgrid(ys[1:], xs[1:], indexing="ij")
    return torch.stack([x1, y1, x2, y2], -1).reshape(-1, 4)


def clipself_loss(dense: Tensor, crops: Tensor) -> Tensor:
    """Mean over regions of 1 - cosine(dense region embedding, crop embedding); (N, D) each."""
    return (1 - F.cosine_similarity(dense, crops.to(dense.dtype), dim=-1)).mean()


class DenseTower(nn.Module):
    """A trainable copy of an open_clip image tower whose forward is its dense path:
    normalised (B, 3, H, W) -> (B, D, h, w). Its batch-norm layers (a ResNet tower's) keep
    the frozen tower's statistics: ``train()`` leaves them in eval mode."""

    def __init__(self, visual: nn.Module, mode: str = "maskclip"):
        super().__init__()
        self.visual, self.mode = visual, mode

    def forward(self, x: Tensor) -> Tensor:
        return dense_features(self.visual, x, self.mode)

    def train(self, mode: bool = True) -> DenseTower:
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self


class RegionGrids(torch.utils.data.Dataset):
    """Training samples: each image of ``data`` (samples with ``image`` (3, H, W) uint8 and
    ``image_id``) resized to ``size(H, W)`` and its regions: a random m x n grid (m, n in
    1..``max_split``, from the engine's per-sample generator) or, given ``proposals``
    (``{image id: (boxes (N, 4) xyxy in the image's pixels, scores (N,))}``, CLIPSelf's
    region-proposal variant), the image's ``max_boxes`` highest-scoring proposals (the
    whole image when it has none)."""

    def __init__(self, data, size, max_split: int = 6, proposals: dict | None = None,
                 max_boxes: int = 20):
        if max_split < 1:
            raise ValueError(f"refine.max_split must be >= 1, got {max_split}")
        if max_boxes < 1:
            raise ValueError(f"refine.max_boxes must be >= 1, got {max_boxes}")
        self.data, self.size, self.max_split = data, size, max_split
        self.proposals, self.max_boxes = proposals, max_boxes

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return self.sample(i, None)

    def sample(self, i: int, generator: torch.Generator | None) -> dict:
        item = self.data[i]
        image = item["image"]
        h, w = self.size(*image.shape[-2:])
        if (h, w) != tuple(image.shape[-2:]):
            image = F.interpolate(image[None].float(), size=(h, w), mode="bilinear",
                                  align_corners=False, antialias=True)[0].round().clamp(0, 255)
            image = image.to(torch.uint8)
        if self.proposals is None:
            rows, cols = torch.randint(1, self.max_split + 1, (2,), generator=generator).tolist()
            return {"image": image, "boxes": grid_boxes(h, w, rows, cols)}
        return {"image": image, "boxes": self._proposals(item, h, w)}

    def _proposals(self, item: dict, h: int, w: int) -> Tensor:
        boxes, scores = (torch.as_tensor(a) for a in self.proposals[int(item["image_id"])])
        boxes = boxes[scores.argsort(descending=True, stable=True)[:self.max_boxes]]
        height, width = item["image"].shape[-2:]
        boxes = clip_boxes_to_image(boxes * boxes.new_tensor([w / width, h / height] * 2), (h, w))
        boxes = boxes[remove_small_boxes(boxes, 1e-3)]  # those left empty by the clipping
        return boxes if len(boxes) else grid_boxes(h, w, 1, 1)


def refine_step(frozen: Teacher):
    """``loss_fn(model, batch)`` for the engine: a list of :class:`RegionGrids` samples, the
    trainable :class:`DenseTower` ``model``, the ``frozen`` teacher's crop embeddings as
    targets."""
    def loss_fn(model, batch) -> dict[str, Tensor]:
        dense, crops = [], []
        for s in batch:
            x = frozen.normalize(s["image"])
            size = tuple(x.shape[-2:])
            dense.append(pool_regions(model(x)[0], s["boxes"].to(x.device), size))
            with torch.no_grad():
                rois = torch.cat([s["boxes"].new_zeros(len(s["boxes"]), 1), s["boxes"]], 1)
                crops.append(F.normalize(frozen.model.encode_image(
                    cut_crops(x, rois.to(x.device), frozen.image_size)).float(), dim=-1))
        return {"loss_clipself": clipself_loss(torch.cat(dense), torch.cat(crops))}
    return loss_fn


def refined_model(frozen: Teacher, tower: DenseTower) -> nn.Module:
    """The frozen teacher's whole CLIP model with ``tower``'s image weights (a copy)."""
    model = copy.deepcopy(frozen.model)
    model.visual.load_state_dict(tower.visual.state_dict())
    return model


def refine(cfg: ExperimentConfig, progress: bool = True) -> tuple[Teacher, nn.Module]:
    """Train the refined tower of ``cfg.teacher`` on the train split of ``cfg``'s data with
    ``cfg.train``'s schedule into ``cfg.output_dir`` (a rerun resumes); returns (the frozen
    teacher, the refined CLIP model)."""
    from distill.data.coco import detection_set
    from distill.data.proposals import load_proposals
    from distill.engine import train as train_loop

    frozen = Teacher.from_config(cfg.teacher)
    torch.manual_seed(cfg.train.seed)
    tower = DenseTower(copy.deepcopy(frozen.model.visual), frozen.dense_mode)
    tower.requires_grad_(True)
    pool = getattr(tower.visual, "attnpool", None)
    if pool is not None:  # a ResNet's dense path skips the pool's attention: nothing to train
        for p in (pool.q_proj, pool.k_proj, pool.positional_embedding):
            p.requires_grad_(False)
    images = detection_set(cfg, "train")  # data.on_error, as every stage reads the files
    proposals = None
    if cfg.refine.proposals:
        proposals = load_proposals(cfg.refine.proposals)
        missing = [i for i in images.ids if int(i) not in proposals]
        if missing:
            raise ConfigError(f"refine.proposals: {cfg.refine.proposals} has no proposals for "
                              f"{len(missing)} of the {len(images)} train images (first: image "
                              f"{missing[0]})")
    data = RegionGrids(images, frozen.dense_size, cfg.refine.max_split, proposals,
                       cfg.refine.max_boxes)
    train_loop(tower, refine_step(frozen), data, cfg.train, cfg.output_dir, collate_fn=list,
               resume=True, progress=progress)
    return frozen, refined_model(frozen, tower.cpu())


def refine_and_save(cfg: ExperimentConfig, progress: bool = True, argv: list[str] = (),
                    measure=None) -> dict:
    """:func:`refine`, then ``cfg.refine.output`` and, beside it, ``<name>.json``: the command,
    images, iterations and seconds, and ``measure(teacher)`` of the teacher before and after
    (e.g. crop and dense zero-shot accuracy), when given."""
    from distill.engine import get_rank, get_world_size, scale_to_batch

    t = time.perf_counter()
    frozen, model = refine(cfg, progress)
    seconds = round(time.perf_counter() - t, 1)
    out = Path(cfg.refine.output)
    run = scale_to_batch(cfg.train, get_world_size())[0]  # what trained (train.reference_batch)
    record = {"checkpoint": str(out), "command": " ".join(argv),
              "teacher": dataclasses.asdict(cfg.teacher), "refine": dataclasses.asdict(cfg.refine),
              "train": dataclasses.asdict(run), "seconds": seconds,
              "iterations": run.max_iters,
              "images_seen": run.max_iters * run.batch_size * get_world_size()}
    if get_rank() != 0:  # under torchrun: one file, one measure, by rank 0
        return record
    save_clip(model, out)
    if measure is not None:
        after = Teacher.from_config(dataclasses.replace(cfg.teacher, pretrained=str(out)))
        record["before"], record["after"] = measure(frozen), measure(after)
    atomic_write(out.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    return record
