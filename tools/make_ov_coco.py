"""Write the OV-COCO split files (OVR-CNN's 48 base / 17 novel classes) from COCO 2017's.

    python -m tools.make_ov_coco                  # both splits, $OVD_DATASETS/coco/annotations
    python -m tools.make_ov_coco --split val --input instances_val2017.json --output ov.json

- train (``instances_train2017_ov_base.json``): the annotations of the 48 base classes
  only; images left with no annotation are dropped, as OVR-CNN does (this also drops the
  official file's images that never had one).
- val (``instances_val2017_ov_all.json``): the annotations of all 65 classes (48 base +
  17 novel); images with none of them dropped likewise (OVR-CNN's published val file keeps
  4,836 of COCO val2017's 5,000 images; not checked here, the file is not on this machine).

Both files hold the same 65 categories, in the input's order, each tagged ``"split":
"base" | "novel"`` (the synthetic world's convention: its train file also lists the
novel categories, with no annotation); the other 15 COCO classes and their annotations
are removed. Everything else (info, licenses, image and annotation records) is copied
unchanged. The class lists are distill.data.vocab's COCO_OV_{BASE,NOVEL}{,_IDS}; a
file whose categories lack one of those ids, or name it differently, is refused.
Default paths: distill/data/roots.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from distill.config import ConfigError, atomic_write
from distill.data import roots
from distill.data.coco import DatasetError, read_instances
from distill.data.vocab import COCO_OV_BASE, COCO_OV_BASE_IDS, COCO_OV_NOVEL, COCO_OV_NOVEL_IDS

from . import cli

OV_SPLITS = {"train": "train_ov", "val": "val_ov"}  # official split -> roots.coco_paths split


def ov_split_of(categories: list[dict], where: str | os.PathLike = "instances") -> dict[int, str]:
    """COCO category id -> "base" | "novel" for the 65 COCO-OV classes, after checking that
    ``categories`` holds each of their ids under the expected name (DatasetError if not)."""
    names = {int(c["id"]): c.get("name") for c in categories}
    expected = [(i, n, "base") for i, n in zip(COCO_OV_BASE_IDS, COCO_OV_BASE, strict=True)]
    expected += [(i, n, "novel") for i, n in zip(COCO_OV_NOVEL_IDS, COCO_OV_NOVEL, strict=True)]
    for cid, name, _ in expected:
        if cid not in names:
            raise DatasetError(f"{where}: no category id {cid} ({name!r}); COCO-OV needs the 65 "
                               "COCO 2017 ids of distill.data.vocab.COCO_OV_{BASE,NOVEL}_IDS")
        if names[cid] != name:
            raise DatasetError(f"{where}: category id {cid} is named {names[cid]!r}, expected "
                               f"{name!r} (COCO 2017 names)")
    return {cid: split for cid, _, split in expected}


def make_ov_coco(instances: dict, split: str, where: str | os.PathLike = "instances") -> dict:
    """The OV-COCO ``split`` ("train" | "val") of an official COCO instances dict (as
    :func:`~distill.data.coco.read_instances` returns it; ``where`` names it in errors)."""
    if split not in OV_SPLITS:
        raise ConfigError(f"unknown COCO-OV split {split!r} (expected train or val)")
    try:
        split_of = ov_split_of(instances["categories"], where)
        keep = {cid for cid, s in split_of.items() if split == "val" or s == "base"}
        anns = [a for a in instances["annotations"] if int(a["category_id"]) in keep]
        annotated = {int(a["image_id"]) for a in anns}
        images = [im for im in instances["images"] if int(im["id"]) in annotated]
        cats = [{**c, "split": split_of[int(c["id"])]} for c in instances["categories"]
                if int(c["id"]) in split_of]
    except (KeyError, TypeError, AttributeError) as e:
        raise DatasetError(f"{where}: malformed COCO record (missing or bad field {e})") from None
    return {**instances, "images": images, "annotations": anns, "categories": cats}


def summary(instances: dict) -> str:
    """``N images, M annotations, K categories`` (+ ``(b base, n novel)`` when tagged)."""
    cats = instances["categories"]
    text = (f"{len(instances['images'])} images, {len(instances['annotations'])} annotations, "
            f"{len(cats)} categories")
    tags = [c.get("split") for c in cats]
    if any(tags):
        text += f" ({tags.count('base')} base, {tags.count('novel')} novel)"
    return text


def write_instances(path: str | os.PathLike, instances: dict) -> None:
    """Compact JSON, written atomically (readers never see half a file)."""
    atomic_write(path, json.dumps(instances, separators=(",", ":")))


def check_distinct(src: Path, dst: Path) -> None:
    if dst.resolve() == src.resolve():
        raise ValueError(f"output {dst} is the input file; write the split to another path")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", choices=("train", "val", "both"), default="both",
                   help="which file to write (default: both)")
    p.add_argument("--input", help="official instances JSON (default: "
                   "$OVD_DATASETS/coco/annotations/instances_<split>2017.json)")
    p.add_argument("--output", help="OV file to write (default: $OVD_DATASETS/coco/annotations/"
                   "instances_train2017_ov_base.json / instances_val2017_ov_all.json)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    args = p.parse_args(argv)
    if args.split == "both" and (args.input or args.output):
        p.error("--input/--output need --split train or --split val")
    return cli.run(_run, args)


def _run(args: argparse.Namespace) -> int:
    jobs = []
    for split in ("train", "val") if args.split == "both" else (args.split,):
        official = roots.coco_paths(split, check=False)[0]
        src = Path(args.input) if args.input else roots.require(official, roots.COCO_LAYOUT)
        dst = Path(args.output) if args.output else roots.coco_paths(OV_SPLITS[split], False)[0]
        check_distinct(src, dst)
        jobs.append((split, src, dst))
    for split, src, dst in jobs:
        data = read_instances(src)
        print(f"read {src}: {summary(data)}")
        out = make_ov_coco(data, split, where=src)
        write_instances(dst, out)
        print(f"wrote {dst} (OV-COCO {split}): {summary(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
