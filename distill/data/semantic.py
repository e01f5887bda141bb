"""Semantic-segmentation datasets: ADE20k-150, PASCAL Context-59 and the synthetic world's
label PNGs.

Each is a folder of RGB images and one of uint8 label PNGs with the same stems; labels
use ``reduce_zero_label`` (0 -> 255 ignore, k -> k - 1), so class ``k`` of the
``classes`` list is label ``k``:

    ADEChallengeData2016/images/{training,validation}/ADE_*.jpg
    ADEChallengeData2016/annotations/{training,validation}/ADE_*.png   0 = other, 1..150
    VOCdevkit/VOC2010/JPEGImages/<id>.jpg
    VOCdevkit/VOC2010/SegmentationClassContext/<id>.png   0 = background, 1..59
    VOCdevkit/VOC2010/ImageSets/SegmentationContext/{train,val}.txt   the ids of a split

(the Context-59 label maps as mmsegmentation's ``tools/convert_datasets/pascal_context.py``
writes them from the ``trainval_merged.json`` of the Detail API.)

    data = ade20k("datasets/ADEChallengeData2016", "validation")
    data = pascal_context("datasets/VOCdevkit/VOC2010", "val")
    data = synthetic_semantic(world, "val")         # 16 objects + 4 stuff classes
    s = data[0]   # {"image": (3, H, W) uint8, "labels": (H, W) int64, "file_name": str}
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from distill.config import ConfigError
from distill.data.roots import ADE20K_SPLITS, PASCAL_CONTEXT_SPLITS
from distill.data.vocab import name_key

IGNORE = 255

# ADE20k-150 (SceneParsing) class names, in label order 1..150 (as mmsegmentation lists them).
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror",
    "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave",
    "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

# PASCAL Context-59 class names, in label order 1..59 (mmsegmentation's list, with
# "pottedplant" and "tvmonitor" written as words for the text encoder).
PASCAL_CONTEXT_59_CLASSES: tuple[str, ...] = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book",
    "bottle", "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth",
    "computer", "cow", "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food",
    "grass", "ground", "horse", "keyboard", "light", "motorbike", "mountain", "mouse",
    "person", "plate", "platform", "potted plant", "road", "rock", "sheep", "shelves",
    "sidewalk", "sign", "sky", "snow", "sofa", "table", "track", "train", "tree", "truck",
    "tv monitor", "wall", "water", "window", "wood",
)
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class DatasetError(ValueError):
    """A bad image or label file; the message names it."""


class SemanticDataset(torch.utils.data.Dataset):
    """Images + label maps paired by file stem; labels reduced (0 -> 255, k -> k - 1) when
    ``reduce_zero_label``. ``novel`` (per class) marks classes unseen in training."""

    def __init__(self, image_dir: str | os.PathLike, label_dir: str | os.PathLike,
                 classes: Sequence[str], novel: Sequence[bool] | None = None,
                 reduce_zero_label: bool = True, stems: Sequence[str] | None = None):
        self.image_dir, self.label_dir = Path(image_dir), Path(label_dir)
        for d in (self.image_dir, self.label_dir):
            if not d.is_dir():
                raise FileNotFoundError(f"{d}: missing (expected a folder of images and one of "
                                        f"label PNGs with the same file stems)")
        self.classes = list(classes)
        self.novel = list(novel) if novel is not None else [False] * len(self.classes)
        self.reduce_zero_label = reduce_zero_label
        labels = {p.stem: p for p in self.label_dir.glob("*.png")}
        images = {p.stem: p for p in sorted(self.image_dir.iterdir())
                  if p.suffix.lower() in _IMAGE_SUFFIXES}
        if stems is not None:  # a split file's ids: each must have its image and labels
            for stem in stems:
                if stem not in images or stem not in labels:
                    where = self.image_dir if stem not in images else self.label_dir
                    raise FileNotFoundError(f"{where}: no file for id {stem!r} of the split")
            images = {stem: images[stem] for stem in stems}
        self.items = [(p, labels[stem]) for stem, p in images.items() if stem in labels]
        if not self.items:
            raise FileNotFoundError(f"{self.image_dir}: no image with a label PNG of the same "
                                    f"name in {self.label_dir}")

    def __len__(self) -> int:
        return len(self.items)

    @property
    def novel_ids(self) -> list[int]:
        return [k for k, n in enumerate(self.novel) if n]

    def __getitem__(self, i: int) -> dict[str, Any]:
        image_path, label_path = self.items[i]
        try:
            with Image.open(image_path) as im:
                image = np.asarray(im.convert("RGB"))
            with Image.open(label_path) as im:
                label = np.asarray(im)
        except (UnidentifiedImageError, OSError) as e:
            raise DatasetError(f"{image_path if 'image' not in locals() else label_path}: "
                               f"unreadable ({e})") from None
        if label.ndim != 2 or label.shape != image.shape[:2]:
            raise DatasetError(f"{label_path}: label map {label.shape} does not match image "
                               f"{image.shape[:2]} of {image_path.name}")
        labels = torch.from_numpy(label.astype(np.int64))
        if self.reduce_zero_label:
            labels = torch.where(labels == 0, IGNORE, labels - 1)
        bad = (labels != IGNORE) & (labels >= len(self.classes))
        if bool(bad.any()):
            raise DatasetError(f"{label_path}: label value {int(labels[bad].max()) + self.reduce_zero_label}"
                               f" outside the {len(self.classes)} classes")
        return {"image": torch.from_numpy(np.array(image)).permute(2, 0, 1),
                "labels": labels, "file_name": str(image_path)}


def ade20k(root: str | os.PathLike, split: str, novel: Sequence[str] = ()) -> SemanticDataset:
    """ADE20k-150 ``split`` ("training" | "validation") of ``root`` (ADEChallengeData2016/)."""
    if split not in ADE20K_SPLITS:
        raise ConfigError(f"ADE20k split must be one of {ADE20K_SPLITS}, got {split!r}")
    root = Path(root)
    if not (root / "images" / split).is_dir() or not (root / "annotations" / split).is_dir():
        raise FileNotFoundError(
            f"{root}: not an ADE20k root (expected {root}/images/{split}/*.jpg and "
            f"{root}/annotations/{split}/*.png)")
    unknown = sorted(set(novel) - set(ADE20K_CLASSES))
    if unknown:
        raise ConfigError(f"unknown ADE20k class {unknown[0]!r}")
    return SemanticDataset(root / "images" / split, root / "annotations" / split,
                           ADE20K_CLASSES, [c in novel for c in ADE20K_CLASSES])


def pascal_context(root: str | os.PathLike, split: str,
                   novel: Sequence[str] = ()) -> SemanticDataset:
    """PASCAL Context-59 ``split`` ("train" | "val") of ``root`` (``VOCdevkit/VOC2010/``): the
    ids of ``ImageSets/SegmentationContext/<split>.txt``, ``JPEGImages`` and the 59-class
    label maps of ``SegmentationClassContext`` (0, background, ignored)."""
    if split not in PASCAL_CONTEXT_SPLITS:
        raise ConfigError(f"PASCAL Context split must be one of {PASCAL_CONTEXT_SPLITS}, "
                          f"got {split!r}")
    root = Path(root)
    ids = root / "ImageSets" / "SegmentationContext" / f"{split}.txt"
    if not ids.is_file():
        raise FileNotFoundError(f"{ids}: missing (the ids of the {split} split, one per line)")
    unknown = sorted(set(novel) - set(PASCAL_CONTEXT_59_CLASSES))
    if unknown:
        raise ConfigError(f"unknown PASCAL Context-59 class {unknown[0]!r}")
    stems = [line.strip() for line in ids.read_text().splitlines() if line.strip()]
    return SemanticDataset(root / "JPEGImages", root / "SegmentationClassContext",
                           PASCAL_CONTEXT_59_CLASSES,
                           [c in novel for c in PASCAL_CONTEXT_59_CLASSES], stems=stems)


def synthetic_semantic(world, split: str) -> SemanticDataset:
    """The synthetic world's ``split``: object classes then stuff classes (label 0 "other"
    ignored), novel = the world's novel object classes."""
    classes = list(world.semantic_classes)
    return SemanticDataset(world.images[split], world.semantic[split], classes,
                           [c in world.novel_classes for c in classes])


def collate_semantic(batch: list[dict]) -> dict[str, Any]:
    """Same-size samples -> ``images`` (B, 3, H, W) uint8, ``labels`` (B, H, W) int64 (and
    ``valid`` (B, H, W) bool / ``dense`` (B, D, h, w) when every sample carries a crop's
    valid pixels / a cached teacher map)."""
    shapes = {tuple(b["image"].shape) for b in batch}
    if len(shapes) > 1:
        raise DatasetError(f"a batch mixes image sizes {sorted(shapes)}: set seg.image_size "
                           f"or train.batch_size=1")
    out = {"images": torch.stack([b["image"] for b in batch]),
           "labels": torch.stack([b["labels"] for b in batch]),
           "file_names": [b["file_name"] for b in batch]}
    if all("valid" in b for b in batch):  # a training crop's image pixels (not padding)
        out["valid"] = torch.stack([b["valid"] for b in batch])
    if all("dense" in b for b in batch):  # cached teacher dense maps (segmentors/recipe.py)
        out["dense"] = torch.stack([b["dense"] for b in batch])
    return out


class InstanceSemantic(torch.utils.data.Dataset):
    """Label maps painted from a COCO-format detection set's instance masks (polygons or
    RLE; a record without one fills its box): ``classes`` names the labels (0..C-1, matched
    to the categories by name, any case); pixels of no instance, of a crowd or of a
    category not in ``classes`` are :data:`IGNORE`. Larger instances are painted first, so
    a smaller one on top keeps its pixels."""

    def __init__(self, detection, classes: Sequence[str], novel: Sequence[bool]):
        self.detection = detection
        self.detection.with_masks = True
        self.classes, self.novel = list(classes), list(novel)
        index = {name_key(c): k for k, c in enumerate(self.classes)}
        # dataset label (1 + category index) -> class index, IGNORE for unknown names
        self.lut = torch.tensor([IGNORE] + [index.get(name_key(c["name"]), IGNORE)
                                             for c in detection.categories], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.detection)

    @property
    def novel_ids(self) -> list[int]:
        return [k for k, n in enumerate(self.novel) if n]

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.detection[i]
        h, w = s["image"].shape[1:]
        labels = torch.full((h, w), IGNORE, dtype=torch.int64)
        masks = s["masks"].bool()
        for k, box in enumerate(s["boxes"]):
            if not masks[k].any():  # no segmentation in the record: its box
                x0, y0, x1, y1 = (int(round(float(v))) for v in box)
                masks[k, max(y0, 0):y1, max(x0, 0):x1] = True
        for k in masks.flatten(1).sum(1).argsort(descending=True, stable=True).tolist():
            labels[masks[k]] = self.lut[s["labels"][k]]
        return {"image": s["image"], "labels": labels, "file_name": s["file_name"]}
