"""Memory of a detection dataset read by forked loader workers over an epoch.

    python bench/dataset_memory.py [--images 100000] [--workers 4] [--json out.json]

Writes a fake LVIS-style annotation file (``--images`` images, ``--anns`` polygon
annotations each, 1203 categories), opens it as :class:`distill.data.coco.CocoDetection`
(its records packed in one buffer, distill/data/packed.py) and, for comparison, the same
records as the Python lists of dicts the dataset held before; then reads every image's
targets once (``targets(i)``: boxes, labels, no pixels) through a DataLoader with
``--workers`` forked workers. Each worker reports its private memory (USS: the pages only
it holds, which is what copy-on-read grows) and its RSS at 0 %, 25 %, 50 %, 75 % and 100 %
of its share of the epoch. Prints one table, both layouts side by side. RSS counts the
pages a worker shares with its parent too, so copy-on-read leaves it unchanged; the growth
of USS over the epoch, against the worker's RSS at its start, is the measure (flat: under
10 %).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.config import atomic_write  # noqa: E402
from distill.data.coco import CocoDetection  # noqa: E402

MARKS = (0.0, 0.25, 0.5, 0.75, 1.0)


def fake_lvis(path: Path, images: int, anns: int, seed: int = 0) -> None:
    """A COCO-format file shaped like LVIS v1 train: polygons of 16 points, 1203 classes."""
    rng = np.random.default_rng(seed)
    cats = [{"id": k + 1, "name": f"class_{k}", "frequency": "rfc"[k % 3]} for k in range(1203)]
    recs, annotations, next_id = [], [], 1
    for i in range(images):
        recs.append({"id": i + 1, "width": 640, "height": 480, "neg_category_ids": [],
                     "not_exhaustive_category_ids": [],
                     "coco_url": f"http://images.cocodataset.org/train2017/{i + 1:012d}.jpg"})
        xy = rng.uniform(0, 400, (anns, 2)).round(2)
        for x, y in xy:
            t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
            poly = np.stack([x + 30 + 30 * np.cos(t), y + 30 + 30 * np.sin(t)], 1)
            annotations.append({"id": next_id, "image_id": i + 1,
                                "category_id": int(rng.integers(1, 1204)),
                                "bbox": [float(x), float(y), 60.0, 60.0], "area": 2827.0,
                                "segmentation": [poly.round(2).ravel().tolist()]})
            next_id += 1
    path.write_text(json.dumps({"images": recs, "annotations": annotations, "categories": cats}))


def memory() -> tuple[float, float]:
    """(USS, RSS) of this process in MiB, from /proc/self/smaps_rollup."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0])
    uss = fields["Private_Clean"] + fields["Private_Dirty"]
    return uss / 1024, fields["Rss"] / 1024


class AsLists(Dataset):
    """The dataset's records as Python lists of dicts (what CocoDetection held before)."""

    def __init__(self, data: CocoDetection):
        self.data = data
        self.records = list(data._records)  # (image, anns) tuples: millions of objects

    def __len__(self):
        return len(self.records)

    def targets(self, i):
        return self.data._targets(i, *self.records[i])[0]


class Probe(Dataset):
    """``targets(i)`` of every image; at each mark of a worker's share, its memory."""

    def __init__(self, data, workers: int):
        self.data, self.workers = data, workers
        share = len(data) // workers
        self.marks = {min(share - 1, int(m * (share - 1))): m for m in MARKS}

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        t = self.data.targets(i)
        info = torch.utils.data.get_worker_info()
        k = i // self.workers  # the worker's own position (round-robin, batch 1)
        if info is not None and i % self.workers == info.id and k in self.marks:
            return (info.id, self.marks[k], *memory(), len(t["boxes"]))
        return None


def epoch(data, workers: int) -> dict:
    loader = DataLoader(Probe(data, workers), batch_size=None, num_workers=workers,
                        multiprocessing_context="fork")
    seen: dict[int, dict[float, tuple[float, float]]] = {}
    start = time.perf_counter()
    for item in loader:
        if item is not None:
            wid, mark, uss, rss, _ = item
            seen.setdefault(wid, {})[mark] = (uss, rss)
    return {"seconds": time.perf_counter() - start, "workers": seen}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--anns", type=int, default=7, help="annotations per image (LVIS: ~6.7)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lvis_fake.json"
        fake_lvis(path, args.images, args.anns)
        size = path.stat().st_size / 2**20
        data = CocoDetection(path, tmp)
        results = {"packed": epoch(data, args.workers)}
        lists = AsLists(data)
        results["lists"] = epoch(lists, args.workers)
    print(f"{args.images} images, {args.images * args.anns} annotations ({size:.0f} MiB of "
          f"JSON), {args.workers} forked workers, one epoch of targets(i); "
          f"packed records {data._records.nbytes / 2**20:.0f} MiB")
    print("| records | worker | USS MiB at 0 / 25 / 50 / 75 / 100 % | USS growth MiB | "
          "growth / RSS at start | RSS MiB start -> end | epoch s |")
    print("|---|---:|---|---:|---:|---|---:|")
    summary = {}
    for name, r in results.items():
        for wid in sorted(r["workers"]):
            marks = r["workers"][wid]
            uss = [marks[m][0] for m in MARKS if m in marks]
            rss = [marks[m][1] for m in MARKS if m in marks]
            growth = (uss[-1] - uss[0]) / rss[0]
            summary.setdefault(name, []).append(growth)
            print(f"| {name} | {wid} | {' / '.join(f'{u:.0f}' for u in uss)} | "
                  f"{uss[-1] - uss[0]:.0f} | {100 * growth:.1f} % | {rss[0]:.0f} -> "
                  f"{rss[-1]:.0f} | {r['seconds']:.0f} |")
    if args.json:
        atomic_write(args.json, json.dumps({"args": vars(args), "results": results,
                                            "uss_growth_over_rss": summary}, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
