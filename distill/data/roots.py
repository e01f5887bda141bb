"""Where the real benchmarks live on disk, in detectron2's ``datasets/`` convention.

The root is ``$OVD_DATASETS``, else ``$DETECTRON2_DATASETS`` (so a detectron2
checkout's datasets are found as they are), else ``./datasets``::

    $OVD_DATASETS/
      coco/train2017/  coco/val2017/                   COCO 2017 images
      coco/annotations/instances_{train,val}2017.json  official COCO 2017 instances
      coco/annotations/instances_train2017_ov_base.json  OV-COCO train: the 48 base classes'
                                                       annotations, images left with none dropped
      coco/annotations/instances_val2017_ov_all.json   OV-COCO val: the 65 (48 base + 17 novel)
                                                       classes' annotations, every image
      lvis/lvis_v1_{train,val}.json                    official LVIS v1 (images: COCO 2017's)
      lvis/lvis_v1_train_ov_base.json                  LVIS-OV train: rare classes' annotations
                                                       removed (base = frequent + common)
      ADEChallengeData2016/{images,annotations}/{training,validation}/   ADE20k-150
      VOCdevkit/VOC2010/{JPEGImages,SegmentationClassContext,
                         ImageSets/SegmentationContext/{train,val}.txt}   PASCAL Context-59

The ``_ov_`` files are written by ``tools/make_ov_coco.py`` (``ovd-make-ov-coco``) and
``tools/make_ov_lvis.py`` (``ovd-make-ov-lvis``); their categories carry ``"split":
"base" | "novel"``, as the synthetic world's do. They correspond to OVR-CNN's
``instances_train2017_seen_2.json`` / ``instances_val2017_all_2.json`` and Detic's
``lvis_v1_train_norare.json``.

LVIS v1 image records have no ``file_name``; their ``coco_url``
(``http://images.cocodataset.org/train2017/000000155379.jpg``) names the COCO folder,
and LVIS v1 val draws images from both train2017 and val2017, so the LVIS image dir
is the COCO root ``coco/`` (as in detectron2) and :class:`~distill.data.coco.CocoDetection`
resolves ``<folder>/<file>`` under it.

    ann, images = coco_paths("val_ov")          # raises FileNotFoundError naming the layout
    data = CocoDetection(*lvis_paths("val"))
    sem = ade20k(ade20k_root(), "validation")
"""

from __future__ import annotations

import os
from pathlib import Path

from distill.config import ConfigError

ENV_VARS = ("OVD_DATASETS", "DETECTRON2_DATASETS")  # first one set wins
DEFAULT_ROOT = "datasets"

# split -> (instances JSON, image dir), relative to the datasets root.
COCO_SPLITS: dict[str, tuple[str, str]] = {
    "train": ("coco/annotations/instances_train2017.json", "coco/train2017"),
    "val": ("coco/annotations/instances_val2017.json", "coco/val2017"),
    "train_ov": ("coco/annotations/instances_train2017_ov_base.json", "coco/train2017"),
    "val_ov": ("coco/annotations/instances_val2017_ov_all.json", "coco/val2017"),
}
LVIS_SPLITS: dict[str, tuple[str, str]] = {
    "train": ("lvis/lvis_v1_train.json", "coco"),
    "val": ("lvis/lvis_v1_val.json", "coco"),
    "train_ov": ("lvis/lvis_v1_train_ov_base.json", "coco"),
}
# COCO image folders an LVIS split's images come from (LVIS v1 val: both).
LVIS_IMAGE_FOLDERS: dict[str, tuple[str, ...]] = {
    "train": ("train2017",), "val": ("train2017", "val2017"), "train_ov": ("train2017",)}
ADE20K_DIR = "ADEChallengeData2016"
ADE20K_SPLITS = ("training", "validation")  # its images/ and annotations/ folders
PASCAL_CONTEXT_DIR = "VOCdevkit/VOC2010"
PASCAL_CONTEXT_SPLITS = ("train", "val")  # ImageSets/SegmentationContext/<split>.txt

COCO_LAYOUT = "$OVD_DATASETS/coco/{train2017,val2017,annotations/instances_{train,val}2017.json}"
LVIS_LAYOUT = ("$OVD_DATASETS/lvis/lvis_v1_{train,val}.json with the COCO 2017 images in "
               "$OVD_DATASETS/coco/{train2017,val2017}")
ADE20K_LAYOUT = f"$OVD_DATASETS/{ADE20K_DIR}/{{images,annotations}}/{{training,validation}}"
PASCAL_CONTEXT_LAYOUT = (f"$OVD_DATASETS/{PASCAL_CONTEXT_DIR}/{{JPEGImages,SegmentationClassContext,"
                         f"ImageSets/SegmentationContext/{{train,val}}.txt}}")
_OV_HINT = {"coco": "write it with ovd-make-ov-coco (python -m tools.make_ov_coco)",
            "lvis": "write it with ovd-make-ov-lvis (python -m tools.make_ov_lvis)"}


def datasets_root() -> Path:
    """``$OVD_DATASETS``, else ``$DETECTRON2_DATASETS``, else ``./datasets`` (not checked)."""
    for var in ENV_VARS:
        if os.environ.get(var):
            return Path(os.environ[var])
    return Path(DEFAULT_ROOT)


def _root_note() -> str:
    """Which variable chose the root, for error messages."""
    if os.environ.get("OVD_DATASETS"):
        return f"OVD_DATASETS={os.environ['OVD_DATASETS']}"
    if os.environ.get("DETECTRON2_DATASETS"):
        return f"OVD_DATASETS unset, DETECTRON2_DATASETS={os.environ['DETECTRON2_DATASETS']}"
    return f"OVD_DATASETS and DETECTRON2_DATASETS unset: ./{DEFAULT_ROOT}"


def require(path: Path, layout: str, hint: str = "") -> Path:
    """``path`` if it exists, else FileNotFoundError naming it and the expected ``layout``."""
    if not path.exists():
        hint = f"; {hint}" if hint else ""
        raise FileNotFoundError(f"{path} not found; expected {layout} ({_root_note()}){hint}")
    return path


def _split(splits: dict, split: str, benchmark: str) -> tuple[str, str]:
    if split not in splits:
        raise ConfigError(f"unknown {benchmark} split {split!r} (expected one of "
                          f"{', '.join(splits)})")
    return splits[split]


def coco_paths(split: str = "val", check: bool = True) -> tuple[Path, Path]:
    """(instances JSON, image dir) of COCO 2017 ``split``: "train" | "val" (official files)
    or "train_ov" | "val_ov" (the OV-COCO files, see the module docstring).

    ``check``: raise FileNotFoundError (one line naming the path and the expected layout)
    when the JSON or the image dir is missing.
    """
    ann, images = _split(COCO_SPLITS, split, "COCO")
    root = datasets_root()
    ann, images = root / ann, root / images
    if check:
        require(ann, COCO_LAYOUT, _OV_HINT["coco"] if split.endswith("_ov") else "")
        require(images, COCO_LAYOUT)
    return ann, images


def lvis_paths(split: str = "val", check: bool = True) -> tuple[Path, Path]:
    """(instances JSON, image dir) of LVIS v1 ``split``: "train" | "val" (official files)
    or "train_ov" (rare classes' annotations removed). The image dir is the COCO root:
    images are ``<train2017|val2017>/<file>`` under it, from each record's ``coco_url``.

    ``check``: raise FileNotFoundError (one line naming the path and the expected layout)
    when the JSON or a COCO image folder of the split is missing.
    """
    ann, images = _split(LVIS_SPLITS, split, "LVIS")
    root = datasets_root()
    ann, images = root / ann, root / images
    if check:
        require(ann, LVIS_LAYOUT, _OV_HINT["lvis"] if split.endswith("_ov") else "")
        for folder in LVIS_IMAGE_FOLDERS[split]:
            require(images / folder, LVIS_LAYOUT)
    return ann, images


def ade20k_root(check: bool = True) -> Path:
    """``ADEChallengeData2016/`` under the datasets root; ``check``: its images/ and
    annotations/ {training,validation} folders must exist (FileNotFoundError otherwise)."""
    root = datasets_root() / ADE20K_DIR
    if check:
        require(root, ADE20K_LAYOUT)
        for sub in ("images", "annotations"):
            for split in ADE20K_SPLITS:
                require(root / sub / split, ADE20K_LAYOUT)
    return root


def pascal_context_root(check: bool = True) -> Path:
    """``VOCdevkit/VOC2010/`` under the datasets root; ``check``: its image and label folders
    and split files must exist (FileNotFoundError otherwise)."""
    root = datasets_root() / PASCAL_CONTEXT_DIR
    if check:
        for sub in ("JPEGImages", "SegmentationClassContext",
                    *(f"ImageSets/SegmentationContext/{s}.txt" for s in PASCAL_CONTEXT_SPLITS)):
            require(root / sub, PASCAL_CONTEXT_LAYOUT)
    return root


# data.benchmark -> {split: roots split} for detectors (distill.data.coco.dataset_paths)
DETECTION_BENCHMARKS: dict[str, tuple] = {
    "coco_ov": (coco_paths, {"train": "train_ov", "val": "val_ov"}),
    "lvis": (lvis_paths, {"train": "train_ov", "val": "val"}),
}


def detection_paths(benchmark: str, split: str) -> tuple[Path, Path]:
    """(instances JSON, image dir) of a detection benchmark's ``split`` ("train" | "val"),
    checked: OV-COCO's ``_ov_`` files; LVIS v1 train without rare annotations, LVIS val."""
    if benchmark not in DETECTION_BENCHMARKS:
        raise ConfigError(f"data.benchmark: unknown detection benchmark {benchmark!r} "
                          f"(valid: {', '.join(DETECTION_BENCHMARKS)})")
    paths, splits = DETECTION_BENCHMARKS[benchmark]
    if split not in splits:
        raise ConfigError(f"unknown split {split!r} of {benchmark} (expected train or val)")
    return paths(splits[split])
