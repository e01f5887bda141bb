"""Fake datasets in the real layout for the tests that read real-format data: the fixture
annotations with generated pixels (tests/test_real_configs.py), and the annotation and image
quirks of the real COCO / LVIS files (tests/test_coco_data.py, the torchrun pipeline of
tests/test_distributed.py)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
from PIL import Image

FIXTURES = Path(__file__).resolve().parent / "fixtures"



def add_quirks(instances: dict, image_dir: Path) -> dict:
    """``instances`` (COCO format, with at least 4 images, the first annotated) with
    what real files hold, its images in ``image_dir`` rewritten where needed; returns what
    was added: ``zero_height`` (an annotation of zero height, as COCO train2017's 2206849),
    ``outside`` (a box reaching past the right and bottom edges; its clipped xywh box as
    ``clipped``), ``crowd`` (a crowd box), ``empty_image`` (an image id without annotations),
    ``grey`` and ``cmyk`` (image ids stored as greyscale / CMYK JPEGs)."""
    images = instances["images"]
    anns = instances["annotations"]
    first = images[0]
    template = next(a for a in anns if a["image_id"] == first["id"] and not a.get("iscrowd"))
    next_id = max(int(a["id"]) for a in anns) + 1
    w, h = float(first["width"]), float(first["height"])

    def add(**fields) -> dict:
        nonlocal next_id
        a = {**copy.deepcopy(template), **fields, "id": next_id}
        next_id += 1
        anns.append(a)
        return a

    zero = add(bbox=[10.0, 20.0, 30.0, 0.0], area=0.0)
    outside = add(bbox=[w - 20.0, h - 10.0, 50.0, 40.0], area=200.0,
                  segmentation=[[w - 20.0, h - 10.0, w - 1.0, h - 10.0, w - 1.0, h - 1.0]])
    region = np.zeros((int(h), int(w)), np.uint8)
    region[5:35, 5:45] = 1
    crowd = add(bbox=[5.0, 5.0, 40.0, 30.0], area=1200.0, iscrowd=1,
                segmentation={"size": [int(h), int(w)], "counts": runs(region)})
    empty = images[1]["id"]
    instances["annotations"] = [a for a in anns if a["image_id"] != empty]
    grey, cmyk = images[2], images[3]
    rng = np.random.default_rng(7)
    for im, mode in ((grey, "L"), (cmyk, "CMYK")):
        pixels = rng.integers(0, 256, (im["height"], im["width"], 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(image_dir / im["file_name"], "JPEG")
    return {"zero_height": zero["id"], "outside": outside["id"],
            "clipped": [w - 20.0, h - 10.0, 20.0, 10.0], "crowd": crowd["id"],
            "empty_image": empty, "grey": grey["id"], "cmyk": cmyk["id"]}


def runs(mask: np.ndarray) -> list[int]:
    """(H, W) 0/1 mask -> COCO's uncompressed RLE counts (column-major, starting with 0s)."""
    flat = mask.flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    edges = np.concatenate([[0], change, [len(flat)]])
    counts = np.diff(edges).tolist()
    return ([0] + counts) if flat[0] else counts


def _image(path: Path, width: int, height: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def _subset(instances: dict, keep: int) -> dict:
    images = instances["images"][:keep]
    ids = {im["id"] for im in images}
    return {**instances, "images": images,
            "annotations": [a for a in instances["annotations"] if a["image_id"] in ids]}


def fake_datasets(root: Path, coco_images: tuple[int, int] = (4, 3),
                  ade_images: int = 2) -> None:
    """A datasets root in the real layout ($OVD_DATASETS): coco/ (official-format 2017 files
    from the COCO fixture, ``coco_images`` = (train, val) images), lvis/ (LVIS v1-style files
    from the LVIS fixture: no file_name, images by coco_url), ADEChallengeData2016/ (random
    label maps, ``ade_images`` per split) and PASCAL Context, images generated at the
    annotated sizes."""
    coco = json.loads((FIXTURES / "coco_instances_val2014_100.json").read_text())
    for split, (start, n) in {"train": (0, coco_images[0]),
                              "val": (coco_images[0], coco_images[1])}.items():
        sub = _subset({**coco, "images": coco["images"][start:]}, n)
        for k, im in enumerate(sub["images"]):
            _image(root / f"coco/{split}2017" / im["file_name"], im["width"], im["height"], k)
        path = root / f"coco/annotations/instances_{split}2017.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(sub))
    lvis = json.loads((FIXTURES / "lvis_v0.5_val_100.json").read_text())
    for split, (start, n) in {"train": (0, 3), "val": (3, 3)}.items():
        sub = _subset({**lvis, "images": lvis["images"][start:]}, n)
        for k, im in enumerate(sub["images"]):
            im.pop("file_name", None)  # LVIS v1: the image is named by its coco_url
            folder, name = im["coco_url"].rsplit("/", 2)[-2:]
            _image(root / "coco" / folder / name, im["width"], im["height"], 10 + k)
        (root / "lvis").mkdir(exist_ok=True)
        (root / f"lvis/lvis_v1_{split}.json").write_text(json.dumps(sub))
    ade = root / "ADEChallengeData2016"
    rng = np.random.default_rng(0)
    for split in ("training", "validation"):
        for k in range(ade_images):
            h, w = 96 + 16 * (k % 2), 128
            _image(ade / "images" / split / f"ADE_{split}_{k:08d}.jpg", w, h, 20 + k)
            label = ade / "annotations" / split / f"ADE_{split}_{k:08d}.png"
            label.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 151, (h, w), dtype=np.uint8)).save(label)
    voc = root / "VOCdevkit" / "VOC2010"  # PASCAL Context-59, mmseg's layout
    (voc / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    for split, ids in {"train": ["2008_000002", "2008_000003"],
                       "val": ["2008_000007", "2008_000008"]}.items():
        for k, stem in enumerate(ids):
            h, w = 80 + 16 * k, 112
            _image(voc / "JPEGImages" / f"{stem}.jpg", w, h, 30 + k)
            label = voc / "SegmentationClassContext" / f"{stem}.png"
            label.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 60, (h, w), dtype=np.uint8)).save(label)
        (voc / "ImageSets" / "SegmentationContext" / f"{split}.txt").write_text(
            "\n".join(ids) + "\n")
    _image(voc / "JPEGImages" / "2008_000099.jpg", 64, 64, 40)  # in no split: left out
