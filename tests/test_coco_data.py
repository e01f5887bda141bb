"""COCO-format detection dataset on the synthetic world and on real COCO annotations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from distill.config import ConfigError, ExperimentConfig, WorldConfig
from distill.data.coco import (
    CocoDetection,
    DatasetError,
    collate,
    dataset_id,
    dataset_paths,
    decode_mask,
)
from distill.data.synthetic import World, generate_world

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

FIXTURES = Path(__file__).resolve().parent / "fixtures"
COCO_JSON = FIXTURES / "coco_instances_val2014_100.json"
TINY = dict(num_train=8, num_val=4, image_size=96)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return generate_world(WorldConfig(root=str(tmp_path_factory.mktemp("w")), **TINY),
                          progress=False, workers=1)


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _xyxy(bbox: list[float]) -> list[float]:
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


def _f32(boxes: list[list[float]]) -> torch.Tensor:
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


# --------------------------------------------------------------------------- synthetic world


def test_synthetic_samples_match_json(world):
    coco = _json(world.instances["val"])
    ds = CocoDetection(world.instances["val"], world.images["val"], with_masks=True)
    assert len(ds) == len(coco["images"]) == 4
    assert ds.ids == [im["id"] for im in coco["images"]]
    assert ds.names == list(world.classes)
    assert {c["split"] for c in ds.categories} == {"base", "novel"}
    for i, image_id in enumerate(ds.ids):
        s = ds[i]
        anns = [a for a in coco["annotations"] if a["image_id"] == image_id]
        assert s["image_id"] == image_id and s["file_name"].endswith(f"{image_id:06d}.png")
        assert s["image"].dtype == torch.uint8 and s["image"].shape == (3, 96, 96)
        assert np.array_equal(s["image"].permute(1, 2, 0).numpy(),
                              np.asarray(Image.open(s["file_name"]).convert("RGB")))
        assert s["boxes"].dtype == torch.float32
        assert s["boxes"].tolist() == [_xyxy(a["bbox"]) for a in anns]
        assert s["category_ids"].tolist() == [a["category_id"] for a in anns]
        assert s["labels"].tolist() == [a["category_id"] for a in anns]  # ids are 1..16 in order
        assert s["masks"].shape == (len(anns), 96, 96) and s["masks"].dtype == torch.uint8
        assert s["masks"].sum((1, 2)).tolist() == [a["area"] for a in anns]  # exact
        for m, box in zip(s["masks"], s["boxes"], strict=True):  # mask extent = box
            ys, xs = torch.nonzero(m, as_tuple=True)
            assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == box.tolist()


def test_category_restriction_and_order(world):
    coco = _json(world.instances["val"])
    ds = CocoDetection(world.instances["val"], world.images["val"], category_ids=[5, 2, 9, 12])
    assert ds.names == [world.classes[i - 1] for i in (5, 2, 9, 12)]
    for i, image_id in enumerate(ds.ids):
        t = ds.targets(i)
        anns = [a for a in coco["annotations"]
                if a["image_id"] == image_id and a["category_id"] in (5, 2, 9, 12)]
        assert t["category_ids"].tolist() == [a["category_id"] for a in anns]
        assert t["labels"].tolist() == [[5, 2, 9, 12].index(a["category_id"]) + 1 for a in anns]
    with pytest.raises(DatasetError, match=r"category ids \[99\]"):
        CocoDetection(world.instances["val"], world.images["val"], category_ids=[1, 99])


def test_collate_and_loader(world):
    ds = CocoDetection(world.instances["train"], world.images["train"])
    batch = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate)))
    assert isinstance(batch, list) and [s["image_id"] for s in batch] == ds.ids[:3]


def test_dataset_paths(world, tmp_path):
    cfg = ExperimentConfig(world=WorldConfig(root=str(world.root.parent), **TINY))
    assert dataset_paths(cfg, "val") == (world.instances["val"], world.images["val"])
    assert dataset_paths(cfg, "train_all") == (world.instances["train_all"], world.images["train"])
    cfg.data.val_instances, cfg.data.val_images = "a.json", "imgs"
    assert dataset_paths(cfg, "val") == (Path("a.json"), Path("imgs"))
    cfg.data.val_images = None
    with pytest.raises(ConfigError, match="val_instances and data.val_images"):
        dataset_paths(cfg, "val")
    with pytest.raises(ConfigError, match="unknown split 'test'"):
        dataset_paths(cfg, "test")
    assert len(dataset_id(world.instances["val"])) == 16
    assert dataset_id(world.instances["val"]) != dataset_id(world.instances["train"])


# --------------------------------------------------------------------------- real COCO annotations


@pytest.fixture
def coco_subset(tmp_path) -> tuple[Path, Path, dict]:
    """3 real COCO val2014 images' annotations (one with a crowd region) + fake pixels."""
    full = _json(COCO_JSON)
    keep = [715, 1146, 764]  # 715 and 764 hold a crowd annotation
    images = [im for im in full["images"] if im["id"] in keep]
    sub = dict(full, images=images,
               annotations=[a for a in full["annotations"] if a["image_id"] in keep])
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    for k, im in enumerate(images):
        shape = (im["height"], im["width"]) + (() if k == 0 else (3,))  # a greyscale JPEG too
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(
            tmp_path / "images" / im["file_name"])
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(sub))
    return path, tmp_path / "images", sub


def test_coco_boxes_labels_masks(coco_subset):
    path, image_dir, sub = coco_subset
    ds = CocoDetection(path, image_dir, with_masks=True)
    cat_ids = [c["id"] for c in sub["categories"]]  # 80 ids with gaps (1..90)
    assert len(ds.categories) == 80 and ds.names[:2] == ["person", "bicycle"]
    for i, im in enumerate(sub["images"]):
        s = ds[i]
        anns = [a for a in sub["annotations"] if a["image_id"] == im["id"]]
        plain = [a for a in anns if not a["iscrowd"]]
        crowd = [a for a in anns if a["iscrowd"]]
        assert s["image"].shape == (3, im["height"], im["width"])
        assert torch.equal(s["boxes"], _f32([_xyxy(a["bbox"]) for a in plain]))
        assert torch.equal(s["crowd_boxes"], _f32([_xyxy(a["bbox"]) for a in crowd]))
        assert s["labels"].tolist() == [cat_ids.index(a["category_id"]) + 1 for a in plain]
        assert s["ann_ids"].tolist() == [a["id"] for a in plain]
        assert s["masks"].shape == (len(plain), im["height"], im["width"])
        areas = s["masks"].sum((1, 2)).double()
        want = torch.tensor([a["area"] for a in plain], dtype=torch.float64)
        assert ((areas - want).abs() <= 0.05 * want + 8).all()  # polygon area vs raster
    assert ds.targets(ds.index(715))["crowd_boxes"].tolist() == [[49, 155, 49 + 457, 155 + 324]]
    for a in sub["annotations"]:  # uncompressed crowd RLE: decoded area = sum of the 1-runs
        if a["iscrowd"]:
            h, w = a["segmentation"]["size"]
            assert decode_mask(a["segmentation"], h, w).sum() == sum(a["segmentation"]["counts"][1::2])


def test_errors_name_the_file(coco_subset, tmp_path):
    path, image_dir, sub = coco_subset
    with pytest.raises(FileNotFoundError, match="instances JSON not found: .*nope.json"):
        CocoDetection(tmp_path / "nope.json", image_dir)
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    with pytest.raises(DatasetError, match=r"bad.json: malformed JSON"):
        CocoDetection(bad, image_dir)
    bad.write_text('{"images": []}')
    with pytest.raises(DatasetError, match=r"bad.json: not a COCO instances file"):
        CocoDetection(bad, image_dir)
    ds = CocoDetection(path, image_dir)
    first, second = (image_dir / im["file_name"] for im in sub["images"][:2])
    first.unlink()
    with pytest.raises(FileNotFoundError, match=f"image file not found: {first}"):
        ds[0]
    second.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg" * 4)
    with pytest.raises(DatasetError, match=f"cannot decode image {second}") as e:
        ds[1]
    assert "\n" not in str(e.value)
    im = sub["images"][2]
    Image.new("RGB", (im["width"] + 1, im["height"])).save(image_dir / im["file_name"])
    with pytest.raises(DatasetError, match=r"HxW\) but instances.json says"):
        ds[2]


def test_real_quirks_are_cleaned_up_with_a_count(coco_subset, capsys):
    """Real COCO's quirks (tests/quirks.py) as detectron2 / mmdetection handle them: the
    zero-height box dropped, the box past the edges clipped, the crowd box out of the targets,
    the image without annotations kept, greyscale and CMYK JPEGs read as RGB; one line counts
    what was done. ``data.on_error=fail`` does not stop on any of them."""
    path, image_dir, sub = coco_subset
    extra = dict(sub, images=[*sub["images"], *[
        {**sub["images"][0], "id": 9000 + k, "file_name": f"extra_{k}.jpg"} for k in range(2)]])
    for k in range(2):
        Image.new("RGB", (extra["images"][0]["width"], extra["images"][0]["height"])).save(
            image_dir / f"extra_{k}.jpg")
    from tests.fake_datasets import add_quirks

    q = add_quirks(extra, image_dir)
    path.write_text(json.dumps(extra))
    ds = CocoDetection(path, image_dir, with_masks=True, on_error="fail")
    out = capsys.readouterr().out
    assert out.splitlines() == [f"{path.name}: boxes of zero area dropped: 1, "
                                "boxes clipped to their image: 1"]
    assert ds.cleaned["zero_area"] == 1 and ds.cleaned["clipped"] == 1
    first = ds.targets(0)
    ann_ids = first["ann_ids"].tolist()
    assert q["zero_height"] not in ann_ids and q["crowd"] not in ann_ids
    x, y, w, h = q["clipped"]
    assert first["boxes"][ann_ids.index(q["outside"])].tolist() == [x, y, x + w, y + h]
    assert [5.0, 5.0, 45.0, 35.0] in first["crowd_boxes"].tolist()
    empty = ds[ds.index(q["empty_image"])]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape[0] == 0
    for key in ("grey", "cmyk"):
        s = ds[ds.index(q[key])]
        assert s["image"].dtype == torch.uint8 and s["image"].shape[0] == 3
    # the file on disk is never changed; a second read counts the same
    on_disk = {a["id"]: a for a in json.loads(path.read_text())["annotations"]}
    assert on_disk[q["outside"]]["bbox"][2] == 50.0
    CocoDetection(path, image_dir)
    assert "boxes of zero area dropped: 1" in capsys.readouterr().out


def test_clean_annotation_by_hand():
    from distill.data.coco import clean_annotation

    image = {"width": 100, "height": 50}
    a = {"bbox": [90, 40, 20, 20], "segmentation": [[1, 2, 3, 4], [0, 0, 10, 0, 10, 10]]}
    cleaned, done = clean_annotation(a, image, with_masks=True)
    assert cleaned["bbox"] == [90.0, 40.0, 10.0, 10.0]
    assert cleaned["segmentation"] == [[0, 0, 10, 0, 10, 10]]
    assert done == ["clipped", "polygon_parts"] and a["bbox"] == [90, 40, 20, 20]
    assert clean_annotation({"bbox": [-30, 0, 20, 5]}, image, False) == (None, ["outside"])
    assert clean_annotation({"bbox": [3, 4, -1, 5]}, image, False) == (None, ["zero_area"])
    short = {"bbox": [1, 1, 5, 5], "segmentation": [[1, 2, 3, 4]]}
    assert clean_annotation(short, image, True) == (None, ["no_polygon"])
    assert clean_annotation(short, image, False)[0]["segmentation"] == []
    inside = {"bbox": [0, 0, 100, 50]}
    assert clean_annotation(inside, image, True) == (inside, [])


def test_packed_records_read_like_the_lists(coco_subset):
    """The dataset keeps its records in one buffer (distill/data/packed.py): what it reads
    back equals the file's records, and a caller changing a record changes nothing stored."""
    from distill.data.packed import PackedList

    path, image_dir, sub = coco_subset
    ds = CocoDetection(path, image_dir)
    assert ds.images == sub["images"]
    for i, im in enumerate(sub["images"]):
        want = [a for a in sub["annotations"] if a["image_id"] == im["id"]]
        assert ds.record(i) == (im, want) and ds.anns[i] == want
    ds.record(0)[0]["height"] = -1
    assert ds.targets(0)["height"] == sub["images"][0]["height"]
    packed = PackedList([{"a": 1}, [], "x" * 1000, None])
    assert [packed[i] for i in range(4)] == [{"a": 1}, [], "x" * 1000, None]
    assert packed[-1] is None and list(packed) == [{"a": 1}, [], "x" * 1000, None]
    with pytest.raises(IndexError, match="index 4 out of range for 4 items"):
        packed[4]
    assert len(PackedList([])) == 0
