"""Class-name lists, how two names are compared (:func:`name_key`), base/novel splits.

The synthetic world's vocabulary (shapes, colours, stuff) and the COCO-OV split
of Bansal et al. / OVR-CNN (48 base, 17 novel classes).

    base, novel = split_base_novel(SHAPE_CLASSES, num_novel=4, seed=0)
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from distill.config import ConfigError

# Object classes of the synthetic world; category id = index + 1. At most one
# regular polygon with many sides (hexagon): pentagon/hexagon/octagon are
# indistinguishable once a crop is resized to 64 px.
SHAPE_CLASSES: tuple[str, ...] = (
    "circle", "square", "triangle", "star", "cross", "heart", "ring", "arrow",
    "crescent", "diamond", "hexagon", "semicircle", "hourglass", "frame", "drop", "bolt",
)

# Stuff classes of the synthetic world (background regions, segmentation only).
STUFF_CLASSES: tuple[str, ...] = ("sky", "grass", "water", "sand")

# Named object colours, RGB.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (40, 175, 50), "blue": (35, 70, 225),
    "yellow": (245, 220, 30), "purple": (140, 45, 185), "orange": (250, 135, 20),
    "white": (245, 245, 245), "black": (20, 20, 20), "pink": (250, 125, 185),
    "brown": (125, 75, 30), "gray": (128, 128, 128), "cyan": (30, 210, 220),
}

# COCO-OV (OVR-CNN split), names as in the COCO 2017 annotation files; *_IDS are the COCO
# category ids in the same order (tools/make_ov_coco.py checks both against the file).
COCO_OV_NOVEL: tuple[str, ...] = (
    "airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard",
    "skateboard", "cup", "knife", "cake", "couch", "keyboard", "sink", "scissors",
)
COCO_OV_NOVEL_IDS: tuple[int, ...] = (5, 6, 17, 18, 21, 22, 28, 32, 36, 41, 47, 49, 61, 63, 76, 81, 87)
COCO_OV_BASE: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "train", "truck", "boat", "bench", "bird",
    "horse", "sheep", "bear", "zebra", "giraffe", "backpack", "handbag", "suitcase",
    "frisbee", "skis", "kite", "surfboard", "bottle", "fork", "spoon", "bowl", "banana",
    "apple", "sandwich", "orange", "broccoli", "carrot", "pizza", "donut", "chair", "bed",
    "toilet", "tv", "laptop", "mouse", "remote", "microwave", "oven", "toaster",
    "refrigerator", "book", "clock", "vase", "toothbrush",
)
COCO_OV_BASE_IDS: tuple[int, ...] = (
    1, 2, 3, 4, 7, 8, 9, 15, 16, 19, 20, 23, 24, 25, 27, 31, 33, 34, 35, 38, 42, 44, 48, 50,
    51, 52, 53, 54, 55, 56, 57, 59, 60, 62, 65, 70, 72, 73, 74, 75, 78, 79, 80, 82, 84, 85, 86, 90,
)


def name_key(name: str) -> str:
    """How two class names are compared: case, ``_`` / space and outer spaces ignored."""
    return " ".join(str(name).replace("_", " ").split()).lower()


def split_base_novel(
    classes: Sequence[str],
    num_novel: int = 0,
    seed: int = 0,
    novel: Sequence[str] | None = None,
) -> tuple[list[str], list[str]]:
    """Split ``classes`` into (base, novel), both in the order of ``classes``.

    ``novel`` names the novel classes explicitly; otherwise ``num_novel`` of them
    are drawn with ``random.Random(seed)``. At least one class stays base.
    Raises :class:`ConfigError` naming a bad name and the valid ones.
    """
    classes = list(classes)
    if novel:
        unknown = [n for n in novel if n not in classes]
        if unknown:
            raise ConfigError(
                f"unknown novel class {unknown[0]!r}; valid classes: {', '.join(classes)}")
        dup = sorted({n for n in novel if list(novel).count(n) > 1})
        if dup:
            raise ConfigError(f"novel class {dup[0]!r} listed twice")
        chosen = set(novel)
    else:
        if not 0 <= num_novel < len(classes):
            raise ConfigError(
                f"num_novel must be in [0, {len(classes) - 1}] for {len(classes)} classes, "
                f"got {num_novel}")
        chosen = set(random.Random(seed).sample(classes, num_novel))
    if len(chosen) >= len(classes):
        raise ConfigError("every class is novel; at least one class must stay base")
    return [c for c in classes if c not in chosen], [c for c in classes if c in chosen]


def subsets(num_classes: int, size: int, rounds: int, seed: int = 0) -> list[list[int]]:
    """``rounds`` random partitions of ``range(num_classes)`` into groups of ``size``; a short
    last group is filled with classes drawn from the others."""
    rng = random.Random(seed)
    groups = []
    for _ in range(rounds):
        order = list(range(num_classes))
        rng.shuffle(order)
        for start in range(0, num_classes, size):
            group = order[start:start + size]
            others = [k for k in order if k not in group]
            group += rng.sample(others, min(size - len(group), len(others)))
            groups.append(sorted(group))
    return groups
