"""The embedded synthetic world: determinism, formats, base/novel split, cache, CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from distill.config import ConfigError, WorldConfig
from distill.data import synthetic
from distill.data.synthetic import World, generate_world, summarize
from distill.data.vocab import COLORS, SHAPE_CLASSES, STUFF_CLASSES, split_base_novel
from tools import make_synthetic

# pycocotools 2.0.11 decode() with numpy 2 warns about __array__(copy=...); harmless here.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# Many novel classes and few objects per image, so some train images hold only novel ones.
SMALL = dict(num_train=40, num_val=12, image_size=96, min_object_size=16, max_object_size=40,
             max_objects=4, num_novel=6)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    cfg = WorldConfig(root=str(tmp_path_factory.mktemp("a")), **SMALL)
    return generate_world(cfg, progress=False, workers=2)


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _tree(root: Path) -> dict[str, bytes]:
    files = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    info = json.loads(files.pop("world.json"))
    info.pop("generation")  # holds the wall time
    return files | {"world.json": json.dumps(info).encode()}


def test_deterministic_for_any_worker_count(world, tmp_path):
    again = generate_world(WorldConfig(root=str(tmp_path), **SMALL), progress=False, workers=1)
    assert again.fingerprint == world.fingerprint and not again.reused
    a, b = _tree(world.root), _tree(again.root)
    assert len(a) == 2 * (40 + 12) + 6
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_seed_changes_images_and_size_keeps_prefix(world, tmp_path):
    fewer = generate_world(WorldConfig(root=str(tmp_path), **(SMALL | {"num_train": 3})),
                           progress=False)
    other = generate_world(WorldConfig(root=str(tmp_path), seed=1, **SMALL), progress=False)
    assert len({world.fingerprint, fewer.fingerprint, other.fingerprint}) == 3
    for i in (1, 2, 3):  # per-image RNG: the first images do not depend on num_train
        name = f"{i:06d}.png"
        assert (fewer.images["train"] / name).read_bytes() == \
            (world.images["train"] / name).read_bytes()
        assert (other.images["train"] / name).read_bytes() != \
            (world.images["train"] / name).read_bytes()
        assert (world.images["val"] / name).read_bytes() != \
            (world.images["train"] / name).read_bytes()  # splits draw from different RNGs


def test_coco_files_load_and_match_world_json(world):
    counts = world.info["counts"]
    for split in ("train_all", "train", "val"):
        coco = COCO(str(world.instances[split]))
        assert len(coco.imgs) == counts[split]["images"]
        assert len(coco.anns) == counts[split]["annotations"] > 0
        per_class = {c["name"]: len(coco.getAnnIds(catIds=[c["id"]]))
                     for c in coco.loadCats(coco.getCatIds())}
        assert per_class == counts[split]["per_class"]
        assert [c["name"] for c in coco.dataset["categories"]] == list(SHAPE_CLASSES)
        assert {c["name"] for c in coco.dataset["categories"] if c["split"] == "novel"} == \
            set(world.novel_classes)
        for img in coco.imgs.values():
            assert (world.images[split.removesuffix("_all")] / img["file_name"]).is_file()
            assert (img["width"], img["height"]) == (96, 96)
    assert counts["train_all"]["images"] == 40 and counts["val"]["images"] == 12


def test_novel_removed_from_train_only(world):
    assert len(world.novel_classes) == 6 and len(world.base_classes) == 10
    novel_ids = {SHAPE_CLASSES.index(n) + 1 for n in world.novel_classes}
    train, full, val = (_json(world.instances[s]) for s in ("train", "train_all", "val"))
    assert not novel_ids & {a["category_id"] for a in train["annotations"]}
    assert novel_ids & {a["category_id"] for a in full["annotations"]}
    assert len(novel_ids & {a["category_id"] for a in val["annotations"]}) >= 2
    # The train file is the unfiltered one minus novel annotations, ids unchanged.
    assert train["annotations"] == [a for a in full["annotations"]
                                    if a["category_id"] not in novel_ids]


def test_dropped_images_are_those_without_base_objects(world):
    train, full = _json(world.instances["train"]), _json(world.instances["train_all"])
    base_ids = {SHAPE_CLASSES.index(n) + 1 for n in world.base_classes}
    with_base = {a["image_id"] for a in full["annotations"] if a["category_id"] in base_ids}
    all_ids = {i["id"] for i in full["images"]}
    kept = {i["id"] for i in train["images"]}
    assert kept == with_base
    assert len(all_ids - kept) >= 1  # the small world does exercise dropping


def test_masks_match_boxes_areas_and_pixels(world):
    for split, caps in (("train_all", "train"), ("val", "val")):
        data = _json(world.instances[split])
        objects = [o for im in _json(world.captions[caps])["images"] for o in im["objects"]]
        assert len(objects) == len(data["annotations"])
        images = {i["id"]: i for i in data["images"]}
        for ann, obj in zip(data["annotations"], objects, strict=True):
            m = mask_utils.decode(ann["segmentation"])
            assert m.shape == (96, 96) and ann["iscrowd"] == 0
            ys, xs = np.nonzero(m)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1,
                                   ys.max() - ys.min() + 1]
            assert ann["area"] == m.sum() > 0
            assert obj["bbox"] == ann["bbox"] and obj["category_id"] == ann["category_id"]
            # The pixels under the mask show the object's named colour.
            rgb = np.asarray(Image.open(world.images[caps] / images[ann["image_id"]]["file_name"]))
            mean = rgb[m.astype(bool)].astype(float).mean(0)
            nearest = min(COLORS, key=lambda c: np.linalg.norm(mean - COLORS[c]))
            assert nearest == obj["color"], (ann["id"], obj["color"], mean)


def test_semantic_labels_match_instances_and_stuff(world):
    k, s = len(SHAPE_CLASSES), len(STUFF_CLASSES)
    assert world.info["semantic_classes"] == list(SHAPE_CLASSES + STUFF_CLASSES)
    assert world.semantic_classes == SHAPE_CLASSES + STUFF_CLASSES
    coco = COCO(str(world.instances["val"]))
    caps = {im["image_id"]: im for im in _json(world.captions["val"])["images"]}
    seen_stuff = set()
    for img_id, img in coco.imgs.items():
        label_png = Image.open(world.semantic["val"] / img["file_name"])
        label = np.asarray(label_png)
        assert label_png.mode == "L" and label.shape == (96, 96) and label.max() <= k + s
        covered = np.zeros(label.shape, bool)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[img_id])):
            m = coco.annToMask(ann).astype(bool)
            assert (label[m] == ann["category_id"]).all()
            covered |= m
        rest = label[~covered]
        assert ((rest == 0) | (rest > k)).all()
        stuff = {STUFF_CLASSES[v - k - 1] for v in np.unique(rest) if v > k}
        assert stuff == set(caps[img_id]["stuff"])
        seen_stuff |= stuff
    assert seen_stuff == set(STUFF_CLASSES)


def test_captions_name_every_object(world):
    caps = _json(world.captions["train"])["images"]
    assert [c["image_id"] for c in caps] == list(range(1, 41))  # dropped images included
    names = set()
    for im in caps:
        for o in im["objects"]:
            assert o["name"] in im["caption"] and o["color"] in im["caption"]
            article = "an" if o["color"][0] in "aeiou" else "a"
            assert o["caption"] == f"{article} {o['color']} {o['name']}"
            assert o["split"] == ("novel" if o["name"] in world.novel_classes else "base")
            names.add(o["name"])
        for stuff in im["stuff"]:
            assert stuff in im["caption"]
    assert set(world.novel_classes) <= names  # the teacher sees novel classes too
    visible = [o["visible"] for im in caps for o in im["objects"]]
    assert min(visible) >= 0.6 and sum(v < 1 for v in visible) >= 3  # overlap, bounded


def test_cache_reuse_and_load(world):
    marker = world.root / "world.json"
    before = marker.stat().st_mtime_ns
    again = generate_world(WorldConfig(root=str(world.root.parent), **SMALL), progress=False)
    assert again.reused and again.root == world.root and marker.stat().st_mtime_ns == before
    assert [p.name for p in world.root.parent.iterdir()] == [world.fingerprint]  # no temp dirs
    loaded = World.load(marker)
    assert dataclasses.replace(loaded, reused=False) == dataclasses.replace(world, reused=False)
    assert "reused from cache" in summarize(again)
    with pytest.raises(FileNotFoundError, match="world.json"):
        World.load(world.root / "images")


def test_losing_a_generation_race_uses_the_winners_world(tmp_path, monkeypatch):
    real_build, calls = synthetic._build, []

    def build_and_race(cfg, *args):
        real_build(cfg, *args)
        calls.append(1)
        if len(calls) == 1:  # another process completes the same world meanwhile
            assert not generate_world(cfg, progress=False).reused

    monkeypatch.setattr(synthetic, "_build", build_and_race)
    cfg = WorldConfig(root=str(tmp_path), num_train=3, num_val=2, image_size=64,
                      max_object_size=32)
    world = generate_world(cfg, progress=False)
    assert len(calls) == 2 and world.reused
    assert [p.name for p in tmp_path.iterdir()] == [world.fingerprint]
    assert len(list(world.images["train"].iterdir())) == 3


def test_split_helpers_and_errors(tmp_path):
    base, novel = split_base_novel(SHAPE_CLASSES, num_novel=4, seed=0)
    assert len(base) == 12 and len(novel) == 4 and set(base) | set(novel) == set(SHAPE_CLASSES)
    assert (base, novel) == split_base_novel(SHAPE_CLASSES, num_novel=4, seed=0)
    assert novel != split_base_novel(SHAPE_CLASSES, num_novel=4, seed=1)[1]
    assert split_base_novel(SHAPE_CLASSES, 4, 0, novel=["star", "circle"])[1] == ["circle", "star"]
    cfg = WorldConfig(root=str(tmp_path / "w"), novel=["star", "blob"])
    with pytest.raises(ConfigError, match=r"'blob'.*circle, square, triangle"):
        generate_world(cfg, progress=False)
    with pytest.raises(ConfigError, match="num_novel"):
        generate_world(WorldConfig(root=str(tmp_path / "w"), num_novel=16), progress=False)
    with pytest.raises(ConfigError, match="max_object_size"):
        generate_world(WorldConfig(root=str(tmp_path / "w"), max_object_size=200), progress=False)
    assert not (tmp_path / "w").exists()


def test_make_synthetic_main(tmp_path, capsys):
    args = ["--no-progress", f"world.root={tmp_path}", "world.num_train=6", "world.num_val=3",
            "world.image_size=64", "world.max_object_size=32", "world.novel=[star,ring]"]
    assert make_synthetic.main(args) == 0
    out = capsys.readouterr().out
    (root,) = tmp_path.iterdir()
    assert str(root) in out and "generated;" in out
    assert "star        novel" in out and "circle      base" in out
    assert "train_all          6" in out and "val                3" in out
    assert make_synthetic.main(args) == 0
    assert "reused from cache" in capsys.readouterr().out
    assert make_synthetic.main([f"world.root={tmp_path}", "world.novel=[blob]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'blob'" in err[0]
    assert make_synthetic.main(["world.nmu_train=3"]) == 2
    assert "num_train" in capsys.readouterr().err
