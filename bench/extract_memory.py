"""Peak memory of extraction against the size of the proposals file.

    python bench/extract_memory.py [--extra 0 50000 250000] [--boxes 100] [--json out.json]

A tiny embedded world (16 train images) is extracted by ``tools.extract`` from a proposals
file that holds its images plus ``--extra`` other image ids of ``--boxes`` boxes each (the
file grows as OV-COCO's 118k x 1000 boxes do; extraction reads only its own images). Each
extraction runs in a fresh process, which reports its peak RSS. Beside it, the peak RSS of
a process that reads the same file whole into per-image arrays (what ``load_proposals``
did before it read lazily) shows what the file would cost. One table: file size, then
both peaks (``VmHWM``, the peak RSS since the program started); flat = extraction's peak
does not grow with the file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.config import WorldConfig, atomic_write  # noqa: E402
from distill.data.coco import CocoDetection  # noqa: E402
from distill.data.proposals import save_proposals  # noqa: E402
from distill.data.synthetic import generate_world  # noqa: E402

WORLD = dict(num_train=16, num_val=4, image_size=96)
# VmHWM, the peak RSS of this program since its exec: getrusage's ru_maxrss would carry the
# forking parent's RSS over the exec (and the parent holds the proposals it wrote)
PEAK = ("import re; print('PEAK_KIB', re.search(r'VmHWM:\\s+(\\d+)', "
        "open('/proc/self/status').read()).group(1))")
EXTRACT = "import sys; from tools import extract; rc = extract.main(sys.argv[1:]); " + PEAK
EAGER = ("import sys; from safetensors.numpy import load_file; t = load_file(sys.argv[1]); "
         "import numpy as np; s = np.concatenate([[0], np.cumsum(t['counts'])]); "
         "d = {int(i): (t['boxes'][s[k]:s[k + 1]].astype(np.float32), "
         "t['scores'][s[k]:s[k + 1]].astype(np.float32)) for k, i in enumerate(t['image_ids'])}; "
         + PEAK)


def _peak(cmd: list[str]) -> float:
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return int(out.split("PEAK_KIB")[-1].split()[0]) / 1024


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--extra", type=int, nargs="+", default=[0, 50_000, 250_000])
    p.add_argument("--boxes", type=int, default=100)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        world = generate_world(WorldConfig(root=str(tmp / "world"), **WORLD), progress=False)
        ids = CocoDetection(world.instances["train"], world.images["train"]).ids
        rng = np.random.default_rng(0)
        for extra in args.extra:
            path = tmp / f"proposals_{extra}.safetensors"
            xy = rng.uniform(0, 60, (args.boxes, 2)).astype(np.float32)
            boxes = np.concatenate([xy, xy + 20], 1)
            scores = np.linspace(1, 0, args.boxes, dtype=np.float32)
            props = {i: (boxes, scores) for i in ids}
            props.update({10_000_000 + k: (boxes, scores) for k in range(extra)})
            save_proposals(path, props)
            del props
            overrides = [f"world.root={tmp / 'world'}",
                         *(f"world.{k}={v}" for k, v in WORLD.items()),
                         f"cache.root={tmp / 'cache'}", f"cache.name=x{extra}",
                         f"cache.proposals={path}", "cache.num_proposals=32"]
            lazy = _peak([sys.executable, "-c", EXTRACT, "--config",
                          str(ROOT / "configs/shapes/extract.yaml"), "--no-progress",
                          *overrides])
            eager = _peak([sys.executable, "-c", EAGER, str(path)])
            rows.append({"images_in_file": len(ids) + extra,
                         "file_mib": path.stat().st_size / 2**20,
                         "extract_peak_mib": lazy, "eager_read_peak_mib": eager})
            path.unlink()
    print(f"tools.extract of {len(ids)} images (tiny teacher) from a proposals file of "
          f"{args.boxes} boxes per image; peak RSS of each process")
    print("| images in the file | file MiB | extraction peak MiB | reading the file whole, "
          "peak MiB |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['images_in_file']} | {r['file_mib']:.0f} | {r['extract_peak_mib']:.0f} | "
              f"{r['eager_read_peak_mib']:.0f} |")
    if args.json:
        atomic_write(args.json, json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
