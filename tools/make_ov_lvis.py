"""Write the LVIS-OV train file (rare classes novel) from the official LVIS v1 train JSON.

    python -m tools.make_ov_lvis                  # $OVD_DATASETS/lvis/lvis_v1_train.json
    python -m tools.make_ov_lvis --input lvis_v1_train.json --output lvis_v1_train_ov_base.json

The ViLD / Detic protocol: base = frequent + common classes (866 in LVIS v1), novel =
rare (``frequency == "r"``, 337). The output (``lvis_v1_train_ov_base.json``, Detic's
``lvis_v1_train_norare.json``) is the input with:

- every annotation of a rare class removed;
- every image kept (LVIS is federated: an image with no annotation left still carries
  verified-negative labels of base classes);
- rare ids removed from each image's ``neg_category_ids`` and
  ``not_exhaustive_category_ids``. ViLD / Detic only drop the annotations and leave these
  lists as they are, which is harmless for their losses, but "verified absent from this
  image" is a human label about a rare class: a loss that uses the lists as negatives (a
  federated loss over the image's positive + negative classes) would train the rare
  classes' text embeddings as negatives. Stripping them makes sure nothing in the file
  supervises a novel class;
- all categories kept, in the input's order, each tagged ``"split": "base" | "novel"``
  (the synthetic world's convention); a rare category's ``image_count`` and
  ``instance_count`` (where present) set to 0, since they count the file's annotations
  and frequency-weighted losses (Detic's federated loss) read them.

The val file needs no rewrite: evaluation uses all classes, with ``frequency`` for APr.
Default paths: distill/data/roots.py.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from distill.data import roots
from distill.data.coco import DatasetError, read_instances

from . import cli
from .make_ov_coco import check_distinct, summary, write_instances

FREQUENCIES = ("f", "c", "r")  # frequent, common, rare
NOVEL_FREQUENCIES = ("r",)
IMAGE_ID_LISTS = ("neg_category_ids", "not_exhaustive_category_ids")
CATEGORY_COUNTS = ("image_count", "instance_count")


def make_ov_lvis(instances: dict, where: str | os.PathLike = "instances") -> dict:
    """The LVIS-OV train dict of an official LVIS train dict (as
    :func:`~distill.data.coco.read_instances` returns it; ``where`` names it in errors)."""
    try:
        for c in instances["categories"]:
            if c.get("frequency") not in FREQUENCIES:
                raise DatasetError(f"{where}: category {c['id']} ({c.get('name')!r}) has "
                                   f"frequency {c.get('frequency')!r}, expected one of "
                                   f"{'/'.join(FREQUENCIES)}; not an LVIS file?")
        rare = {int(c["id"]) for c in instances["categories"]
                if c["frequency"] in NOVEL_FREQUENCIES}
        if not rare:
            raise DatasetError(f"{where}: no rare category (frequency 'r'); nothing would be novel")
        anns = [a for a in instances["annotations"] if int(a["category_id"]) not in rare]
        images = [{**im, **{k: [c for c in im[k] if int(c) not in rare]
                            for k in IMAGE_ID_LISTS if k in im}}
                  for im in instances["images"]]
        cats = []
        for c in instances["categories"]:
            novel = int(c["id"]) in rare
            zeroed = {k: 0 for k in CATEGORY_COUNTS if k in c} if novel else {}
            cats.append({**c, **zeroed, "split": "novel" if novel else "base"})
    except (KeyError, TypeError, AttributeError) as e:
        raise DatasetError(f"{where}: malformed LVIS record (missing or bad field {e})") from None
    return {**instances, "images": images, "annotations": anns, "categories": cats}


def _id_list_total(instances: dict, key: str) -> int:
    return sum(len(im.get(key, ())) for im in instances["images"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", help="official LVIS train JSON "
                   "(default: $OVD_DATASETS/lvis/lvis_v1_train.json)")
    p.add_argument("--output", help="OV file to write "
                   "(default: $OVD_DATASETS/lvis/lvis_v1_train_ov_base.json)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return cli.run(_run, p.parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    official = roots.lvis_paths("train", check=False)[0]
    src = Path(args.input) if args.input else roots.require(official, roots.LVIS_LAYOUT)
    dst = Path(args.output) if args.output else roots.lvis_paths("train_ov", check=False)[0]
    check_distinct(src, dst)
    data = read_instances(src)
    print(f"read {src}: {summary(data)}")
    out = make_ov_lvis(data, where=src)
    write_instances(dst, out)
    stripped = ", ".join(f"{_id_list_total(data, k) - _id_list_total(out, k)} rare ids from {k}"
                         for k in IMAGE_ID_LISTS)
    print(f"wrote {dst} (LVIS-OV train): {summary(out)}; removed "
          f"{len(data['annotations']) - len(out['annotations'])} rare annotations, {stripped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
