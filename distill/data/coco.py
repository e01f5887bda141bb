"""COCO-format detection datasets: real COCO / LVIS and the embedded synthetic world.

One sample dict per image, shared by extraction, student training and evaluation::

    ds = CocoDetection(instances_json, image_dir, with_masks=True)
    s = ds[0]
    s["image"]         (3, H, W) uint8 RGB
    s["boxes"]         (N, 4) float32 xyxy pixels (crowd annotations left out)
    s["labels"]        (N,) int64, 1 + index into ds.categories (0 = background)
    s["category_ids"]  (N,) int64 dataset category ids
    s["masks"]         (N, H, W) uint8 (with_masks only)
    loader = DataLoader(ds, batch_size=2, collate_fn=collate)   # batches are lists

``dataset_paths(cfg, split)`` gives the (instances JSON, image dir) of a split:
``cfg.data``'s paths when set, else the synthetic world of ``cfg.world``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from distill.config import ConfigError, ExperimentConfig
from distill.data.packed import PackedList
from distill.data.vocab import name_key


class DatasetError(ValueError):
    """An annotation file or image cannot be used; the message is one line naming the file."""


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image file (JPEG/PNG/...) with PIL -> (3, H, W) uint8 RGB (grey, RGBA,
    palette converted; EXIF orientation ignored, as COCO annotations are on the raw pixels)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        why = " ".join(str(e).split())[:200] or type(e).__name__
        raise DatasetError(f"cannot decode image {path}: {why}") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def read_instances(path: str | os.PathLike) -> dict:
    """Parse a COCO instances JSON and check its top-level structure."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"instances JSON not found: {path}")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: malformed JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: not a COCO instances file (top level is {type(data).__name__})")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise DatasetError(f"{path}: not a COCO instances file (no list {', '.join(missing)})")
    return data


def dataset_id(instances_json: str | os.PathLike) -> str:
    """16 hex digits of the sha256 of the instances file's bytes (identifies the annotations)."""
    sha = hashlib.sha256()
    with open(instances_json, "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
    return sha.hexdigest()[:16]


def xywh_to_xyxy(bbox: Sequence[float]) -> list[float]:
    x, y, w, h = (float(v) for v in bbox)
    return [x, y, x + w, y + h]


def decode_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Polygons, uncompressed or compressed RLE -> (height, width) uint8 in {0, 1}."""
    if isinstance(segmentation, list):  # polygons [[x, y, ...], ...]
        polys = [p for p in segmentation if len(p) >= 6]
        if not polys:
            return np.zeros((height, width), np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle).astype(np.uint8)


ON_ERROR = ("fail", "skip")  # data.on_error: what a bad image or annotation record does


def annotation_problem(a: dict, image: dict | None, categories: dict) -> str | None:
    """Why annotation record ``a`` cannot be used at all, or None; ``image`` is its image
    record. The quirks of real files that a record survives (a box of zero area or outside
    its image, a polygon part under 3 points) are :func:`clean_annotation`'s."""
    if image is None:
        return f"unknown image id {a['image_id']}"
    if int(a["category_id"]) not in categories:
        return f"unknown category id {a['category_id']}"
    box = a["bbox"]
    if not (isinstance(box, list) and len(box) == 4 and all(
            isinstance(v, (int, float)) and math.isfinite(v) for v in box)):
        return f"bbox {box} is not 4 finite numbers"
    return None


# what clean_annotation did, as counted and printed per file
CLEANED = {"zero_area": "boxes of zero area dropped",
           "outside": "boxes wholly outside their image dropped",
           "clipped": "boxes clipped to their image",
           "polygon_parts": "polygon parts under 3 points dropped",
           "no_polygon": "annotations without a polygon of 3 points dropped (masks needed)"}


def clean_annotation(a: dict, image: dict, with_masks: bool) -> tuple[dict | None, list[str]]:
    """The quirks of real COCO / LVIS files handled as detectron2 and mmdetection do:
    ``(record to use or None to drop it, the CLEANED keys that applied)``. A box of zero or
    negative width or height is dropped (COCO train2017's annotation 2206849 has zero
    height); a box sticking out of its image is clipped to it, and dropped when nothing of
    it is inside; polygon parts of fewer than 3 points are dropped, and with ``with_masks``
    a record left without a polygon. The record is copied when changed, never edited."""
    x, y, w, h = (float(v) for v in a["bbox"])
    if w <= 0 or h <= 0:
        return None, ["zero_area"]
    width, height = float(image["width"]), float(image["height"])
    x1, y1 = min(max(x, 0.0), width), min(max(y, 0.0), height)
    x2, y2 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
    if x2 <= x1 or y2 <= y1:
        return None, ["outside"]
    done = []
    if (x1, y1, x2, y2) != (x, y, x + w, y + h):
        a, done = {**a, "bbox": [x1, y1, x2 - x1, y2 - y1]}, ["clipped"]
    seg = a.get("segmentation")
    if isinstance(seg, list) and any(len(part) < 6 for part in seg):
        kept = [part for part in seg if len(part) >= 6]
        if not kept and with_masks:
            return None, [*done, "no_polygon"]
        a, done = {**a, "segmentation": kept}, [*done, "polygon_parts"]
    return a, done


def image_problem(path: Path, image: dict) -> str | None:
    """Why image file ``path`` cannot be used for record ``image``, or None. Reads the header
    only: a file damaged past its header still fails when decoded."""
    if not path.is_file():
        return "file not found"
    try:
        with Image.open(path) as im:
            w, h = im.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return f"not a readable image ({' '.join(str(e).split())[:120]})"
    if (h, w) != (int(image["height"]), int(image["width"])):
        return f"is {h}x{w} (HxW) but the annotations say {image['height']}x{image['width']}"
    return None


def is_novel(category: dict, novel: Collection[str] | None = None) -> bool:
    """In ``novel`` (names, any case, ``_`` as space) when given; else tagged ``"split":
    "novel"`` (OV files, synthetic world), or, in an untagged LVIS file, a rare class
    (``"frequency": "r"``)."""
    if novel is not None:
        return name_key(category["name"]) in {name_key(n) for n in novel}
    return category.get("split") == "novel" or (
        "split" not in category and category.get("frequency") == "r")


class CocoDetection(Dataset):
    """A COCO-format instances file plus its image directory.

    ``category_ids`` restricts the categories to those ids, in that order (labels
    follow it), or ``"base"`` to the file's non-novel ones (:func:`is_novel`, with the
    ``novel`` names when given, else the file's tags); annotations of other categories are
    dropped, every image is kept.
    Crowd annotations (``iscrowd=1``) are not boxes: their xyxy boxes are in
    ``crowd_boxes (M, 4)``.
    ``ids``: image ids in file order; ``categories``: the category dicts (with a
    ``split`` tag where the file has one, as the synthetic world's and the OV-COCO /
    LVIS files of tools/make_ov_{coco,lvis}.py do). Images are ``image_dir / file_name``;
    LVIS v1 records have none: ``image_dir`` is then the COCO root (see :meth:`image_path`).

    Every annotation record is checked (:func:`annotation_problem`): ``on_error="fail"``
    raises :class:`DatasetError` naming the first bad one; ``"skip"`` leaves bad records
    out, and images whose file is missing, unreadable or of another size
    (:func:`image_problem`), listing each in ``skipped`` (image_id, annotation_id or
    file, reason). The quirks of real files are handled whatever ``on_error`` says
    (:func:`clean_annotation`: zero-area boxes dropped, boxes clipped to the image, short
    polygon parts dropped), counted in ``cleaned`` and printed in one line. Images without
    annotations are kept (proposals, extraction and evaluation need every image).
    """

    def __init__(self, instances_json: str | os.PathLike, image_dir: str | os.PathLike,
                 category_ids: Sequence[int] | str | None = None, with_masks: bool = False,
                 on_error: str = "fail", novel: Collection[str] | None = None) -> None:
        self.instances_json = Path(instances_json)
        self.novel_names = None if novel is None else list(novel)
        self.image_dir = Path(image_dir)
        self.with_masks = with_masks
        if on_error not in ON_ERROR:
            raise ConfigError(f"data.on_error must be one of {', '.join(ON_ERROR)}, "
                              f"got '{on_error}'")
        self.skipped: list[dict] = []
        data = read_instances(self.instances_json)
        where = self.instances_json
        try:
            cats = {int(c["id"]): c for c in data["categories"]}
            if category_ids is None:
                category_ids = [int(c["id"]) for c in data["categories"]]
            elif category_ids == "base":
                category_ids = [int(c["id"]) for c in data["categories"]
                                if not is_novel(c, self.novel_names)]
            unknown = [c for c in category_ids if int(c) not in cats]
            if unknown:
                raise DatasetError(f"{where}: category ids {unknown[:10]} are not in the file")
            self.categories: list[dict] = [cats[int(c)] for c in category_ids]
            self.label_of: dict[int, int] = {int(c): i + 1 for i, c in enumerate(category_ids)}
            self._images: list[dict] = data["images"]  # packed with the annotations below
            self.ids: list[int] = [int(im["id"]) for im in self._images]
            records = {image_id: im for image_id, im in zip(self.ids, self._images, strict=True)}
            if len(records) != len(self.ids):
                seen: set[int] = set()
                twice = next(i for i in self.ids if i in seen or seen.add(i))
                raise DatasetError(f"{where}: image id {twice} appears more than once")
            if on_error == "skip":
                self._skip_bad_images()
            self._index = {image_id: i for i, image_id in enumerate(self.ids)}
            anns: list[list[dict]] = [[] for _ in self.ids]
            self.cleaned: dict[str, int] = dict.fromkeys(CLEANED, 0)
            for a in data["annotations"]:
                image = records.get(int(a["image_id"]))
                problem = annotation_problem(a, image, cats)
                if problem and on_error == "fail":
                    raise DatasetError(f"{where}: annotation {a.get('id')} (image "
                                       f"{a['image_id']}): {problem}; data.on_error=skip "
                                       f"leaves such records out")
                if problem:
                    self.skipped.append({"image_id": a["image_id"], "annotation_id": a.get("id"),
                                         "reason": problem})
                elif int(a["category_id"]) in self.label_of:
                    i = self._index.get(int(a["image_id"]))
                    a, done = clean_annotation(a, image, with_masks)
                    for key in done:
                        self.cleaned[key] += 1
                    if i is not None and a is not None:  # i None: the image was skipped
                        anns[i].append(a)
        except (KeyError, TypeError) as e:
            raise DatasetError(f"{where}: malformed COCO record (missing or bad field {e})") from None
        # one buffer that forked loader workers read without copying (distill/data/packed.py)
        self._records = PackedList(zip(self._images, anns, strict=True))
        del self._images
        if any(self.cleaned.values()) and int(os.environ.get("RANK", 0)) == 0:
            print(f"{where.name}: " + ", ".join(
                f"{CLEANED[k]}: {n}" for k, n in self.cleaned.items() if n))

    def _skip_bad_images(self) -> None:
        keep = []
        for i, im in enumerate(self._images):
            problem = image_problem(self._path(im), im)
            if problem:
                self.skipped.append({"image_id": self.ids[i], "file": str(self._path(im)),
                                     "reason": problem})
            else:
                keep.append(i)
        self._images = [self._images[i] for i in keep]
        self.ids = [self.ids[i] for i in keep]

    def __len__(self) -> int:
        return len(self.ids)

    def record(self, i: int) -> tuple[dict, list[dict]]:
        """(image record, its kept annotation records) of image ``i``: fresh copies."""
        return self._records[i]

    @property
    def images(self) -> list[dict]:
        """Every image record, in ``ids`` order (unpacked: for a pass over the records)."""
        return [image for image, _ in self._records]

    @property
    def anns(self) -> list[list[dict]]:
        """Every image's kept annotation records, in ``ids`` order (unpacked likewise)."""
        return [anns for _, anns in self._records]

    @property
    def names(self) -> list[str]:
        """Category names in label order (label = index + 1), as the text encoder reads them:
        LVIS's underscores as spaces ("aerosol_can" -> "aerosol can")."""
        return [c["name"].replace("_", " ") for c in self.categories]

    @property
    def novel(self) -> list[bool]:
        """Per category in label order: :func:`is_novel`."""
        return [is_novel(c, self.novel_names) for c in self.categories]

    def index(self, image_id: int) -> int:
        return self._index[image_id]

    def image_path(self, i: int) -> Path:
        """``image_dir / file_name``; for records without ``file_name`` (LVIS v1),
        ``image_dir / <folder>/<file>`` from ``coco_url`` (``.../val2017/000000397133.jpg``
        -> ``val2017/000000397133.jpg``), so image_dir is the COCO root, as in detectron2."""
        return self._path(self.record(i)[0])

    def _path(self, info: dict) -> Path:
        if info.get("file_name"):
            return self.image_dir / info["file_name"]
        url = info.get("coco_url")
        if not isinstance(url, str) or url.count("/") < 1:
            raise DatasetError(f"{self.instances_json}: image {info.get('id')} has neither "
                               "file_name nor a coco_url")
        return self.image_dir.joinpath(*url.rsplit("/", 2)[-2:])

    @staticmethod
    def _split_crowd(anns: list[dict]) -> tuple[list[dict], list[dict]]:
        """(box annotations, crowd annotations)."""
        kept, crowd = [], []
        for a in anns:
            (crowd if a.get("iscrowd", 0) else kept).append(a)
        return kept, crowd

    def targets(self, i: int) -> dict[str, Any]:
        """The annotations of image ``i`` without decoding pixels (no ``image``, ``masks``)."""
        return self._targets(i, *self.record(i))[0]

    def _targets(self, i: int, info: dict, anns: list[dict]) -> tuple[dict[str, Any], list[dict]]:
        kept, crowd = self._split_crowd(anns)
        cat_ids = [int(a["category_id"]) for a in kept]
        return {
            "image_id": self.ids[i],
            "file_name": str(self._path(info)),
            "height": int(info["height"]),
            "width": int(info["width"]),
            "boxes": torch.tensor([xywh_to_xyxy(a["bbox"]) for a in kept],
                                  dtype=torch.float32).reshape(-1, 4),
            "category_ids": torch.tensor(cat_ids, dtype=torch.int64),
            "labels": torch.tensor([self.label_of[c] for c in cat_ids], dtype=torch.int64),
            "ann_ids": torch.tensor([int(a.get("id", -1)) for a in kept], dtype=torch.int64),
            "crowd_boxes": torch.tensor([xywh_to_xyxy(a["bbox"]) for a in crowd],
                                        dtype=torch.float32).reshape(-1, 4),
        }, kept

    def __getitem__(self, i: int) -> dict[str, Any]:
        """Sample dict (see the module docstring) for the i-th image of ``ids``."""
        return self.read(i)

    def read(self, i: int, masks: str = "decoded") -> dict[str, Any]:
        """:meth:`__getitem__`; with ``masks="raw"`` (and ``with_masks``) the kept
        annotations' segmentations as they are in the file (``segmentations``: a list, one
        per box) instead of decoded ``masks``, for a caller that draws them at the size it
        uses (detectors.augment.window_masks)."""
        out, kept = self._targets(i, *self.record(i))
        image = load_image(out["file_name"])
        h, w = out["height"], out["width"]
        if tuple(image.shape[1:]) != (h, w):
            raise DatasetError(f"image {out['file_name']} is {image.shape[1]}x{image.shape[2]} "
                               f"(HxW) but {self.instances_json.name} says {h}x{w}")
        out["image"] = image
        if self.with_masks and masks == "raw":
            out["segmentations"] = [a.get("segmentation") for a in kept]
        elif self.with_masks:
            masks = [decode_mask(a["segmentation"], h, w) if a.get("segmentation")
                     else np.zeros((h, w), np.uint8) for a in kept]
            out["masks"] = (torch.from_numpy(np.stack(masks)) if masks
                            else torch.zeros(0, h, w, dtype=torch.uint8))
        return out

    def __repr__(self) -> str:
        return (f"CocoDetection({str(self.instances_json)!r}, {len(self)} images, "
                f"{len(self.categories)} categories)")


def collate(batch: list[dict]) -> list[dict]:
    """Detection batches are lists of sample dicts (images differ in size)."""
    return list(batch)


def dataset_paths(cfg: ExperimentConfig, split: str) -> tuple[Path, Path]:
    """(instances JSON, image dir) of ``split`` ("train" | "val"; synthetic also "train_all").

    ``cfg.data.benchmark``'s files under the datasets root when set, else
    ``cfg.data.<split>_instances`` / ``_images`` when set; otherwise the synthetic
    world of ``cfg.world``, generated on first use.
    """
    if cfg.data.benchmark is not None:
        from distill.data.roots import detection_paths

        return detection_paths(cfg.data.benchmark, split)
    if split in ("train", "val"):
        ann, img = getattr(cfg.data, f"{split}_instances"), getattr(cfg.data, f"{split}_images")
        if (ann is None) != (img is None):
            raise ConfigError(f"set both data.{split}_instances and data.{split}_images, or neither")
        if ann is not None:
            return Path(ann), Path(img)
    elif split != "train_all":
        raise ConfigError(f"unknown split '{split}' (expected train or val)")
    elif cfg.data.train_instances is not None:
        raise ConfigError("split 'train_all' exists only for the synthetic world")
    from distill.data.synthetic import generate_world  # cv2 etc. only when needed
    world = generate_world(cfg.world, progress=False)
    return world.instances[split], world.images["train" if split == "train_all" else split]


def embedded_world(cfg: ExperimentConfig) -> bool:
    """``cfg``'s data is the embedded synthetic world (no benchmark, no files)."""
    d = cfg.data
    return d.benchmark is None and d.train_instances is None and d.val_instances is None


def detection_set(cfg: ExperimentConfig, split: str, **kwargs: Any) -> CocoDetection:
    """``split`` of ``cfg``'s data (:func:`dataset_paths`) with its novel classes
    (``data.novel``) and ``data.on_error``; ``kwargs`` go to :class:`CocoDetection`."""
    kwargs.setdefault("on_error", cfg.data.on_error)
    kwargs.setdefault("novel", cfg.data.novel)
    return CocoDetection(*dataset_paths(cfg, split), **kwargs)


@dataclasses.dataclass
class ClassSplit:
    """Which classes a run trains on and which it holds out (:func:`split_classes`)."""

    base: list[str]  # trained on (annotated in the train split), val names
    novel: list[str]  # held out and scored apart
    untrained: list[str]  # no annotation in either split: in the vocabulary, never trained
    source: str  # how ``novel`` was decided, in words
    novel_setting: list[str] | None  # the ``data.novel`` the stages get (None: the file tags)


def annotated(data: CocoDetection) -> set[str]:
    """:func:`name_key` of every category with at least one (non-crowd) box in ``data``."""
    labels = {int(a["category_id"]) for anns in data.anns for a in anns if not a.get("iscrowd")}
    return {name_key(c["name"]) for c in data.categories if int(c["id"]) in labels}


def check_categories(data: CocoDetection) -> None:
    """Every category has a name, and no two share one (any case)."""
    seen: dict[str, int] = {}
    for c in data.categories:
        key = name_key(c.get("name") or "")
        if not key:
            raise DatasetError(f"{data.instances_json}: category {c['id']} has an empty name")
        if key in seen:
            raise DatasetError(f"{data.instances_json}: categories {seen[key]} and {c['id']} "
                               f"are both named '{c['name']}'")
        seen[key] = c["id"]


def check_images(data: CocoDetection) -> None:
    """Every image file of ``data`` exists (checked before hours of training, not during)."""
    missing = [data.image_path(i) for i in range(len(data))
               if not data.image_path(i).is_file()]
    if missing:
        raise DatasetError(f"{data.instances_json}: {len(missing)} of {len(data)} image files "
                           f"are missing from {data.image_dir}, e.g. {missing[0].name} "
                           f"(data.on_error=skip leaves those images out)")


def split_classes(train: CocoDetection, val: CocoDetection,
                  novel: Sequence[str] | None = None) -> ClassSplit:
    """Base and novel classes of a run, decided in this order: ``novel`` (names) when given;
    else the files' ``split`` tags (or LVIS frequencies); else the val classes annotated in
    val but not in train. A class without training annotations is never trained (it would
    only learn to be background): it is novel when val annotates it, else ``untrained``.
    Both files' categories are checked (:func:`check_categories`)."""
    for data in (train, val):
        check_categories(data)
    names = val.names
    in_train, in_val = annotated(train), annotated(val)
    tagged = any("split" in c or "frequency" in c for c in (*train.categories, *val.categories))
    held: set[str] = set()  # besides the classes val annotates and train does not
    if novel is not None:
        known = {name_key(n) for n in names}
        unknown = [n for n in novel if name_key(n) not in known]
        if unknown:
            raise DatasetError(f"data.novel: {unknown[:5]} are not categories of "
                               f"{val.instances_json}")
        held = {name_key(n) for n in novel}
        source = "data.novel"
    elif tagged:
        held = {name_key(c["name"]) for c in val.categories if is_novel(c)}
        source = f"the split tags of {val.instances_json.name}"
    else:
        source = "annotated in val, none in train"
    keys = [name_key(n) for n in names]
    novel_names = [n for n, k in zip(names, keys, strict=True)
                   if k in held or (k in in_val and k not in in_train)]
    untrained = [n for n, k in zip(names, keys, strict=True) if k not in held | in_train | in_val]
    base = [n for n in names if n not in {*novel_names, *untrained}]
    # a train-file class with no training box must not sit in the training vocabulary
    idle = [n for n in train.names if name_key(n) not in in_train | held]
    setting = None if (novel is None and tagged and not idle) else \
        list(dict.fromkeys([*novel_names, *untrained, *idle]))
    return ClassSplit(base, novel_names, untrained, source, setting)
