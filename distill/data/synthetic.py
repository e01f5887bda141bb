"""The embedded synthetic open-vocabulary world.

Coloured shapes (16 object classes, see :data:`distill.data.vocab.SHAPE_CLASSES`)
on textured stuff regions (sky, grass, water, sand, or an unlabelled "other"
texture), written in real formats so the same loaders, teachers and evaluators
run on it as on COCO/ADE20k:

    root/<fingerprint>/
      images/{train,val}/000001.png          RGB, image_size x image_size
      semantic/{train,val}/000001.png        uint8 labels: 0 other/ignore,
                                             1..K object classes, K+1..K+S stuff
      annotations/instances_{train,val}.json COCO instances; train without novel
      annotations/instances_train_all.json   train with every class (reference)
      captions_{train,val}.json              image and object-crop captions, all classes
      world.json                             params, classes, split, counts (written last)

Every image is drawn from its own RNG seeded with (seed, split, index), so the
world is byte-identical for any number of worker processes. Worlds are cached:
``generate_world`` reuses ``root/<fingerprint>/`` when its ``world.json`` exists.

    world = generate_world(load_config("configs/shapes/world.yaml").world)
    coco = COCO(world.instances["val"]); print(summarize(world))
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from tqdm import tqdm

from distill.config import ConfigError, WorldConfig
from distill.data.vocab import COLORS, SHAPE_CLASSES, STUFF_CLASSES, split_base_novel

GENERATOR_VERSION = 2  # bump whenever the pixels or files written change
SPLITS = ("train", "val")
SUPERSAMPLE = 4  # shapes are rasterised at 4x and box-filtered down (anti-aliasing)
MAX_HIDDEN = 0.4  # a placement may hide at most this fraction of an earlier object
STUFF_PROBS = {None: 0.12, "sky": 0.22, "grass": 0.22, "water": 0.22, "sand": 0.22}

# --------------------------------------------------------------------------- shapes

Layers = list[tuple[np.ndarray, int]]  # [(polygon (P, 2) xy, fill 1 = add / 0 = cut)]


def _arc(r: float = 1.0, cx: float = 0.0, cy: float = 0.0, a0: float = 0.0,
         a1: float = 2 * np.pi, n: int = 64) -> np.ndarray:
    t = np.linspace(a0, a1, n, endpoint=abs(a1 - a0) < 2 * np.pi)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)


def _ngon(k: int, r: float = 1.0, a0: float = -np.pi / 2) -> np.ndarray:
    return _arc(r, a0=a0, a1=a0 + 2 * np.pi, n=k)


def _star() -> np.ndarray:
    t = -np.pi / 2 + np.arange(10) * np.pi / 5
    r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y], 1)


def _drop() -> Layers:
    r, c, tip = 0.6, 0.35, -1.0  # round bottom (circle at y=c), pointed top at y=tip
    a = np.arcsin(r / (c - tip))  # half-angle of the tangent cone at the tip
    tx, ty = r * np.cos(a), c - r * np.sin(a)  # tangent points (±tx, ty)
    return [(_arc(r, 0, c), 1), (np.array([[0, tip], [tx, ty], [-tx, ty]]), 1)]


def _box(hx: float, hy: float) -> np.ndarray:
    return np.array([[-hx, -hy], [hx, -hy], [hx, hy], [-hx, hy]], float)


def _normalise(layers: Layers, radius: float = 0.98) -> Layers:
    """Centre the added parts' bounding box at 0 and scale them into the disk of ``radius``."""
    pts = np.concatenate([p for p, fill in layers if fill])
    centre = (pts.min(0) + pts.max(0)) / 2
    scale = radius / np.linalg.norm(pts - centre, axis=1).max()
    return [((p - centre) * scale, fill) for p, fill in layers]


SHAPES: dict[str, Layers] = {name: _normalise(layers) for name, layers in {
    "circle": [(_arc(), 1)],
    "square": [(_box(1, 1), 1)],
    "triangle": [(_ngon(3), 1)],
    "star": [(_star(), 1)],
    "cross": [(np.array([[-.3, -1], [.3, -1], [.3, -.3], [1, -.3], [1, .3], [.3, .3], [.3, 1],
                         [-.3, 1], [-.3, .3], [-1, .3], [-1, -.3], [-.3, -.3]]), 1)],
    "heart": [(_heart(), 1)],
    "ring": [(_arc(), 1), (_arc(0.55), 0)],
    "arrow": [(np.array([[-1, -.2], [.15, -.2], [.15, -.6], [1, 0], [.15, .6], [.15, .2],
                         [-1, .2]]), 1)],
    "crescent": [(_arc(), 1), (_arc(0.88, 0.5, -0.1), 0)],
    "diamond": [(np.array([[0, -1], [.58, 0], [0, 1], [-.58, 0]]), 1)],
    "hexagon": [(_ngon(6, a0=0), 1)],
    "semicircle": [(_arc(a0=0, a1=np.pi, n=48), 1)],
    "hourglass": [(np.array([[-.65, -1], [.65, -1], [.09, 0], [.65, 1], [-.65, 1],
                             [-.09, 0]]), 1)],
    "frame": [(_box(1, 1), 1), (_box(0.6, 0.6), 0)],
    "drop": _drop(),
    "bolt": [(np.array([[.2, -1], [-.55, .12], [-.05, .12], [-.25, 1], [.55, -.15],
                        [.05, -.15]]), 1)],
}.items()}
assert tuple(SHAPES) == SHAPE_CLASSES

# Rotation range (degrees, uniform in ±); small where a turn would change the name
# (a square at 45 degrees is a diamond, a cross becomes an x, an hourglass a bow tie).
MAX_ROTATION: dict[str, float] = {name: 180.0 for name in SHAPE_CLASSES} | {
    "square": 15.0, "frame": 15.0, "diamond": 15.0, "cross": 15.0, "hourglass": 25.0,
    "heart": 30.0, "drop": 30.0, "bolt": 30.0,
}


def render_shape(name: str, size: int, angle: float = 0.0, aspect: float = 1.0) -> np.ndarray:
    """Anti-aliased coverage ``(size, size)`` float32 in [0, 1] of a shape filling the square.

    ``angle`` in degrees (counter-clockwise on screen); ``aspect`` <= 1 squeezes x
    before the rotation (so the shape stays inside the square).
    """
    s = size * SUPERSAMPLE
    im = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(im)
    a = np.deg2rad(angle)
    rot = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    for poly, fill in SHAPES[name]:
        p = (poly * [aspect, 1.0]) @ rot.T
        draw.polygon(((p * 0.5 + 0.5) * s).ravel().tolist(), fill=255 * fill)
    cover = np.asarray(im, np.float32).reshape(size, SUPERSAMPLE, size, SUPERSAMPLE)
    return cover.mean((1, 3)) / 255.0


# --------------------------------------------------------------------------- backgrounds


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: tuple[int, int]) -> np.ndarray:
    """Low-frequency noise ``(h, w)`` float32, roughly unit variance: a random grid upsampled."""
    grid = rng.standard_normal(cells, dtype=np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def _stuff_texture(name: str | None, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Texture ``(h, w, 3)`` float32 in ~[0, 255] for a stuff class (None: random 'other')."""
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    fine = rng.standard_normal((h, w, 1), dtype=np.float32)
    low = _smooth_noise(rng, h, w, (4, 4))[..., None]
    if name == "sky":
        img = (1 - y) * np.float32([80, 140, 230]) + y * np.float32([170, 205, 250])
        cloud = np.clip(_smooth_noise(rng, h, w, (5, 7))[..., None] - 0.5, 0, 1)
        img = img + cloud * (np.float32([250, 250, 252]) - img) + 3 * fine
    elif name == "grass":
        blades = cv2.resize(rng.standard_normal((max(h // 10, 2), w), dtype=np.float32), (w, h),
                            interpolation=cv2.INTER_LINEAR)[..., None]
        img = np.float32([60, 135, 45]) + blades * np.float32([14, 26, 10]) + 12 * low + 6 * fine
    elif name == "water":
        period = rng.uniform(7, 13)
        wave = np.sin(2 * np.pi * (np.arange(h, dtype=np.float32)[:, None] / period
                                   + 0.6 * _smooth_noise(rng, h, w, (3, 3))))[..., None]
        img = np.float32([30, 85, 150]) + wave * np.float32([14, 22, 26]) + 10 * low + 4 * fine
    elif name == "sand":
        ripple = np.sin(np.add.outer(np.arange(h), 0.5 * np.arange(w)) / rng.uniform(2, 4))
        img = (np.float32([214, 188, 136]) + 6 * ripple[..., None].astype(np.float32)
               + 10 * low + 14 * fine)
    else:  # "other": a random colour field with soft blotches
        c0, c1 = rng.uniform(30, 225, (2, 3)).astype(np.float32)
        img = (1 - y) * c0 + y * c1 + 25 * _smooth_noise(rng, h, w, (6, 6))[..., None] + 8 * fine
    return img


def _region_map(rng: np.random.Generator, size: int) -> np.ndarray:
    """1 or 2 background regions ``(size, size)`` int, split by a random wavy boundary."""
    if rng.random() < 0.35:
        return np.zeros((size, size), np.int64)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) - (size - 1) / 2
    theta = rng.uniform(0, 2 * np.pi)
    along = -xx * np.sin(theta) + yy * np.cos(theta)
    amp, freq, phase = rng.uniform(0.02, 0.08) * size, rng.uniform(0.7, 2.5), rng.uniform(0, 6.3)
    dist = xx * np.cos(theta) + yy * np.sin(theta) + amp * np.sin(
        2 * np.pi * freq * along / size + phase)
    return (dist > rng.uniform(-0.25, 0.25) * size).astype(np.int64)


# --------------------------------------------------------------------------- one image


@dataclass(frozen=True)
class _Spec:
    """What a worker needs to draw one image (picklable)."""

    seed: int
    size: int
    min_objects: int
    max_objects: int
    min_object_size: int
    max_object_size: int
    out: str  # world directory being written


def _size_word(spec: _Spec, s: int) -> str:
    t = (s - spec.min_object_size) / max(spec.max_object_size - spec.min_object_size, 1)
    return "small" if t < 1 / 3 else "large" if t > 2 / 3 else "medium"


def draw_scene(
    spec: _Spec, split: str, index: int
) -> tuple[np.ndarray, np.ndarray, list[dict], list[str]]:
    """Draw image ``index`` of ``split``.

    Returns image ``(H, W, 3)`` uint8, semantic labels ``(H, W)`` uint8, objects
    ``[{category_id, name, color, size, full_area, mask (H, W) bool visible part}]`` in drawing
    order (later objects on top) and the names of the stuff classes present.
    """
    rng = np.random.default_rng([spec.seed, SPLITS.index(split), index])
    n, k = spec.size, len(SHAPE_CLASSES)
    regions = _region_map(rng, n)
    names, probs = list(STUFF_PROBS), np.array(list(STUFF_PROBS.values()))
    stuff = [names[i] for i in rng.choice(len(names), regions.max() + 1, replace=False,
                                          p=probs / probs.sum())]
    img = np.zeros((n, n, 3), np.float32)
    label = np.zeros((n, n), np.uint8)
    for r, name in enumerate(stuff):
        inside = regions == r
        img = np.where(inside[..., None], _stuff_texture(name, rng, n, n), img)
        label[inside] = 0 if name is None else k + 1 + STUFF_CLASSES.index(name)

    ids = np.zeros((n, n), np.int32)  # visible object per pixel, 1-based drawing order
    full_area: list[int] = []  # per object, pixels when drawn
    visible = np.zeros(0, np.int64)  # per object, pixels still visible
    objects: list[dict] = []
    palette = list(COLORS)
    for _ in range(int(rng.integers(spec.min_objects, spec.max_objects + 1))):
        for _attempt in range(30):
            cls = int(rng.integers(k))
            name = SHAPE_CLASSES[cls]
            s = int(rng.integers(spec.min_object_size, spec.max_object_size + 1))
            x0, y0 = (int(v) for v in rng.integers(0, n - s + 1, 2))
            cover = render_shape(name, s, rng.uniform(-1, 1) * MAX_ROTATION[name],
                                 rng.uniform(0.85, 1.0))
            m = cover >= 0.5
            if not m.any():
                continue
            hidden = np.bincount(ids[y0:y0 + s, x0:x0 + s][m], minlength=len(objects) + 1)[1:]
            if np.all(visible - hidden >= (1 - MAX_HIDDEN) * np.array(full_area)):
                break
        else:
            continue  # no acceptable placement: fewer objects in this image
        # A colour that stands out from what lies under the shape and from the objects it hides.
        under = img[y0:y0 + s, x0:x0 + s][m].mean(0)
        dist = np.array([np.linalg.norm(np.float32(COLORS[c]) - under) for c in palette])
        dist[[palette.index(objects[j]["color"]) for j in np.flatnonzero(hidden)]] = 0
        ok = np.flatnonzero(dist > 110)
        color = palette[int(rng.choice(ok)) if ok.size else int(dist.argmax())]
        gy, gx = np.mgrid[0:s, 0:s].astype(np.float32) / s - 0.5
        a = rng.uniform(0, 2 * np.pi)
        shade = 40 * (gx * np.cos(a) + gy * np.sin(a))
        fill = (np.float32(COLORS[color]) + rng.uniform(-12, 12, 3).astype(np.float32)
                + shade[..., None] + 5 * rng.standard_normal((s, s, 1), dtype=np.float32))
        patch = img[y0:y0 + s, x0:x0 + s]
        patch += cover[..., None] * (fill - patch)
        ids[y0:y0 + s, x0:x0 + s][m] = len(objects) + 1
        full_area.append(int(m.sum()))
        visible = np.append(visible - hidden, full_area[-1])
        objects.append({"category_id": cls + 1, "name": name, "color": color,
                        "size": _size_word(spec, s), "full_area": full_area[-1]})
    img += 3 * rng.standard_normal((n, n, 1), dtype=np.float32)  # sensor noise
    for i, obj in enumerate(objects):
        obj["mask"] = ids == i + 1
        label[obj["mask"]] = obj["category_id"]
    objects = [o for o in objects if o["mask"].any()]
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), label, objects, [x for x in stuff if x]


# --------------------------------------------------------------------------- captions


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _plural(name: str) -> str:
    return name + ("es" if name.endswith(("s", "x", "sh", "ch")) else "s")


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def image_caption(objects: list[dict], stuff: list[str]) -> str:
    """E.g. ``"a small red star, two blue rings and a green cross on grass and sky"``."""
    groups: dict[tuple[str, str], list[str]] = {}
    for o in objects:
        groups.setdefault((o["color"], o["name"]), []).append(o["size"])
    numbers = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
    parts = []
    for (color, name), sizes in groups.items():
        if len(sizes) > 1:
            parts.append(f"{numbers.get(len(sizes), len(sizes))} {color} {_plural(name)}")
        else:
            parts.append(_article(" ".join(w for w in (sizes[0], color, name) if w != "medium")))
    where = _join(stuff) if stuff else ""
    if not parts:
        return where or "an empty scene"
    return _join(parts) + (f" on {where}" if where else "")


# --------------------------------------------------------------------------- world files


def _make_image(spec: _Spec, split: str, index: int) -> dict:
    """Worker: draw image ``index``, write its PNGs, return its annotation record."""
    img, label, objects, stuff = draw_scene(spec, split, index)
    file_name = f"{index + 1:06d}.png"
    out = Path(spec.out)
    Image.fromarray(img).save(out / "images" / split / file_name, compress_level=1)
    Image.fromarray(label).save(out / "semantic" / split / file_name, compress_level=1)
    anns = []
    for o in objects:
        rle = mask_utils.encode(np.asfortranarray(o.pop("mask").astype(np.uint8)))
        bbox = [float(v) for v in mask_utils.toBbox(rle)]
        rle["counts"] = rle["counts"].decode("ascii")
        area = float(mask_utils.area(rle))
        visible = round(area / o.pop("full_area"), 3)
        anns.append(o | {"bbox": bbox, "area": area, "segmentation": rle, "visible": visible})
    return {"image_id": index + 1, "file_name": file_name, "objects": anns, "stuff": stuff,
            "caption": image_caption(anns, stuff)}


def _params(cfg: WorldConfig) -> dict:
    params = dataclasses.asdict(cfg)
    params.pop("root")
    params["novel"] = sorted(params["novel"])
    return params


def fingerprint(cfg: WorldConfig) -> str:
    """12 hex digits over every generation parameter (not ``root``) and the generator version."""
    blob = json.dumps({"version": GENERATOR_VERSION, "params": _params(cfg)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _check(cfg: WorldConfig) -> tuple[list[str], list[str]]:
    """Validate ``cfg``; returns (base, novel) object classes."""
    rules = [
        (cfg.num_train >= 1 and cfg.num_val >= 1, "num_train and num_val must be >= 1"),
        (cfg.image_size >= 32, "image_size must be >= 32"),
        (8 <= cfg.min_object_size <= cfg.max_object_size <= cfg.image_size,
         "need 8 <= min_object_size <= max_object_size <= image_size"),
        (0 <= cfg.min_objects <= cfg.max_objects and cfg.max_objects >= 1,
         "need 0 <= min_objects <= max_objects and max_objects >= 1"),
    ]
    for ok, msg in rules:
        if not ok:
            raise ConfigError(f"world: {msg}")
    try:
        return split_base_novel(SHAPE_CLASSES, cfg.num_novel, cfg.split_seed, cfg.novel)
    except ConfigError as e:
        raise ConfigError(f"world: {e}") from None


def _coco(records: list[dict], size: int, split_of: dict[str, str], keep: set[str] | None,
          info: dict) -> dict:
    """COCO instances dict; with ``keep``, only those classes and only images left with any."""
    images, anns = [], []
    ann_id = 0
    for r in records:
        kept = []
        for o in r["objects"]:
            ann_id += 1  # ids are those of the unfiltered file, so they match across files
            if keep is None or o["name"] in keep:
                kept.append({"id": ann_id, "image_id": r["image_id"],
                             "category_id": o["category_id"], "bbox": o["bbox"],
                             "area": o["area"], "iscrowd": 0, "segmentation": o["segmentation"]})
        if keep is None or kept:
            images.append({"id": r["image_id"], "file_name": r["file_name"],
                           "width": size, "height": size})
            anns.extend(kept)
    cats = [{"id": i + 1, "name": n, "supercategory": "shape", "split": split_of[n]}
            for i, n in enumerate(SHAPE_CLASSES)]
    return {"info": info, "images": images, "annotations": anns, "categories": cats}


def _counts(coco: dict) -> dict:
    per_class = dict.fromkeys(SHAPE_CLASSES, 0)
    for a in coco["annotations"]:
        per_class[SHAPE_CLASSES[a["category_id"] - 1]] += 1
    return {"images": len(coco["images"]), "annotations": len(coco["annotations"]),
            "per_class": per_class}


def _write(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, separators=(",", ":")))


def _build(cfg: WorldConfig, out: Path, base: list[str], novel: list[str], fp: str,
           progress: bool, workers: int) -> None:
    """Generate every file of the world into the (empty) directory ``out``."""
    start = time.perf_counter()
    spec = _Spec(cfg.seed, cfg.image_size, cfg.min_objects, cfg.max_objects,
                 cfg.min_object_size, cfg.max_object_size, str(out))
    for split in SPLITS:
        (out / "images" / split).mkdir(parents=True)
        (out / "semantic" / split).mkdir(parents=True)
    (out / "annotations").mkdir()
    bar = tqdm(total=cfg.num_train + cfg.num_val, desc=f"world {fp}", unit="img", disable=not progress)
    records: dict[str, list[dict]] = {s: [] for s in SPLITS}
    pool = multiprocessing.Pool(workers, cv2.setNumThreads, (1,)) if workers > 1 else None
    with pool or contextlib.nullcontext():
        imap = pool.imap if pool else lambda fn, items, chunksize: map(fn, items)
        for split in SPLITS:
            indices = range(cfg.num_train if split == "train" else cfg.num_val)
            for rec in imap(partial(_make_image, spec, split), indices, chunksize=16):
                records[split].append(rec)
                bar.update()
    bar.close()

    split_of = {n: "base" for n in base} | {n: "novel" for n in novel}
    info = {"description": "ovdistill synthetic shapes world", "fingerprint": fp,
            "version": GENERATOR_VERSION}
    cocos = {"train_all": _coco(records["train"], cfg.image_size, split_of, None, info),
             "train": _coco(records["train"], cfg.image_size, split_of, set(base), info),
             "val": _coco(records["val"], cfg.image_size, split_of, None, info)}
    for name, coco in cocos.items():
        _write(out / "annotations" / f"instances_{name}.json", coco)
    for split in SPLITS:
        caps = [{"image_id": r["image_id"], "file_name": r["file_name"], "caption": r["caption"],
                 "stuff": r["stuff"],
                 "objects": [{"category_id": o["category_id"], "name": o["name"],
                              "split": split_of[o["name"]], "color": o["color"],
                              "size": o["size"], "bbox": o["bbox"], "visible": o["visible"],
                              "caption": _article(f"{o['color']} {o['name']}")}
                             for o in r["objects"]]} for r in records[split]]
        _write(out / f"captions_{split}.json", {"images": caps})
    counts = {name: _counts(coco) for name, coco in cocos.items()}
    for split, name in (("train", "train_all"), ("val", "val")):
        counts[name]["stuff_images"] = {s: sum(s in r["stuff"] for r in records[split])
                                        for s in STUFF_CLASSES}
    world = {
        "version": GENERATOR_VERSION, "fingerprint": fp, "params": _params(cfg),
        "classes": list(SHAPE_CLASSES), "base_classes": base, "novel_classes": novel,
        "stuff_classes": list(STUFF_CLASSES),
        "semantic_classes": list(SHAPE_CLASSES) + list(STUFF_CLASSES),
        "semantic_note": "label value = index in semantic_classes + 1; 0 = other/ignore",
        "colors": list(COLORS), "counts": counts,
        "generation": {"seconds": round(time.perf_counter() - start, 2), "workers": workers},
    }
    _write(out / "world.json", world)  # completion marker: written last


@dataclass(frozen=True)
class World:
    """A generated world on disk. Split keys: "train", "val" (instances also "train_all")."""

    root: Path  # the root/<fingerprint> directory
    fingerprint: str
    classes: tuple[str, ...]  # object classes; COCO category id = index + 1
    base_classes: tuple[str, ...]
    novel_classes: tuple[str, ...]
    stuff_classes: tuple[str, ...]  # semantic label = len(classes) + index + 1
    images: dict[str, Path]  # split -> directory of RGB PNGs
    semantic: dict[str, Path]  # split -> directory of uint8 label PNGs (same file names)
    instances: dict[str, Path]  # split -> COCO instances JSON
    captions: dict[str, Path]  # split -> captions JSON
    info: dict = field(repr=False)  # the parsed world.json
    reused: bool = False  # True when generate_world found it in the cache

    @property
    def semantic_classes(self) -> tuple[str, ...]:
        """Names of semantic labels 1, 2, ... (0 is other/ignore)."""
        return self.classes + self.stuff_classes

    @classmethod
    def load(cls, path: str | os.PathLike, reused: bool = False) -> World:
        """Open a world from its directory (or its world.json)."""
        path = Path(path)
        root = path.parent if path.name == "world.json" else path
        if not (root / "world.json").is_file():
            raise FileNotFoundError(f"no complete synthetic world at {root} (world.json missing)")
        info = json.loads((root / "world.json").read_text())
        return cls(
            root=root, fingerprint=info["fingerprint"], classes=tuple(info["classes"]),
            base_classes=tuple(info["base_classes"]), novel_classes=tuple(info["novel_classes"]),
            stuff_classes=tuple(info["stuff_classes"]),
            images={s: root / "images" / s for s in SPLITS},
            semantic={s: root / "semantic" / s for s in SPLITS},
            instances={s: root / "annotations" / f"instances_{s}.json"
                       for s in (*SPLITS, "train_all")},
            captions={s: root / f"captions_{s}.json" for s in SPLITS},
            info=info, reused=reused)


def _remove_stale(root: Path, fp: str) -> None:
    """Delete temporary directories of ``fp`` left behind by dead processes."""
    for tmp in root.glob(f".{fp}.tmp-*"):
        m = re.match(rf"\.{fp}\.tmp-(\d+)-", tmp.name)
        if m is None:
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass


def generate_world(cfg: WorldConfig, progress: bool = True, workers: int | None = None) -> World:
    """Return the world of ``cfg``, generating it under ``cfg.root/<fingerprint>/`` if needed.

    Files are written into a temporary sibling directory that is renamed into
    place once complete, so a directory with ``world.json`` is always whole.
    ``workers`` (default: up to 8 CPUs) does not change the output.
    """
    base, novel = _check(cfg)
    fp = fingerprint(cfg)
    root = Path(cfg.root)
    final = root / fp
    if (final / "world.json").is_file():
        return World.load(final, reused=True)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale(root, fp)
    tmp = root / f".{fp}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _build(cfg, tmp, base, novel, fp, progress, workers or min(os.cpu_count() or 1, 8))
        if final.exists() and not (final / "world.json").is_file():
            shutil.rmtree(final)  # a leftover without its completion marker
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "world.json").is_file():
                raise
            shutil.rmtree(tmp)  # another process finished the same world first
            return World.load(final, reused=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return World.load(final)


def summarize(world: World) -> str:
    """A small text table: images and objects per split, objects per class, stuff images."""
    info, counts = world.info, world.info["counts"]
    p = info["params"]
    when = ("reused from cache" if world.reused else "generated")
    gen = info["generation"]
    lines = [
        f"synthetic world {world.fingerprint} at {world.root}",
        f"{when}; generation took {gen['seconds']:.1f} s with {gen['workers']} worker(s)",
        f"{p['image_size']}x{p['image_size']} px, {len(world.classes)} object classes "
        f"({len(world.base_classes)} base, {len(world.novel_classes)} novel: "
        f"{', '.join(world.novel_classes) or '-'}), stuff: {', '.join(world.stuff_classes)}",
        "",
        f"{'split':<12}{'images':>8}{'objects':>9}",
    ]
    for name in ("train_all", "train", "val"):
        c = counts[name]
        note = "  (novel removed, empty images dropped)" if name == "train" else ""
        lines.append(f"{name:<12}{c['images']:>8}{c['annotations']:>9}{note}")
    lines += ["", f"{'class':<12}{'split':<7}{'train_all':>10}{'train':>7}{'val':>6}"]
    for n in world.classes:
        split = "novel" if n in world.novel_classes else "base"
        lines.append(f"{n:<12}{split:<7}{counts['train_all']['per_class'][n]:>10}"
                     f"{counts['train']['per_class'][n]:>7}{counts['val']['per_class'][n]:>6}")
    for n in world.stuff_classes:
        lines.append(f"{n:<12}{'stuff':<7}{counts['train_all']['stuff_images'][n]:>10}"
                     f"{'':>7}{counts['val']['stuff_images'][n]:>6}  (images)")
    return "\n".join(lines)
