"""Wall time of the one-command pipeline on a user's own data: the embedded world as plain files.

    python bench/pipeline_custom.py [--root /tmp/custom_bench] [--seed 0] [key=value ...]

Writes the embedded world of ``world.seed`` (2000 train + 300 val images by default) as
plain COCO files a user would bring: the instances JSONs without the ``split`` tags (so the
pipeline finds the novel classes as those annotated in val only), the PNGs copied, the
category ids moved to 101, 102, ... Then runs ``python -m tools.pipeline --config
configs/custom/pipeline.yaml`` on them in a fresh output directory and cache (no stage
reused), and prints a table of the run's wall time and results.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.config import WorldConfig  # noqa: E402
from distill.data.synthetic import generate_world  # noqa: E402


def plain_copy(world, split: str, out: Path) -> tuple[Path, Path]:
    """``split`` of ``world`` as an untagged instances JSON (ids shifted by 100) + PNGs."""
    data = json.loads(Path(world.instances[split]).read_text())
    for c in data["categories"]:
        c.pop("split", None)
        c["id"] += 100
    for a in data["annotations"]:
        a["category_id"] += 100
    images = out / f"{split}_images"
    if not images.is_dir():
        shutil.copytree(world.images[split], images)
    ann = out / f"{split}.json"
    ann.write_text(json.dumps(data))
    return ann, images


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="/tmp/custom_bench")
    p.add_argument("--seed", type=int, default=0, help="world.seed of the embedded world")
    p.add_argument("overrides", nargs="*", help="passed on to tools.pipeline")
    args = p.parse_args()
    root = Path(args.root)
    world = generate_world(WorldConfig(seed=args.seed), progress=False)
    (train, train_images), (val, val_images) = (plain_copy(world, s, root / "data")
                                                for s in ("train", "val"))
    out = root / f"run-{int(time.time())}"
    cmd = [sys.executable, "-m", "tools.pipeline", "--config", "configs/custom/pipeline.yaml",
           "--no-progress", f"output_dir={out}", f"cache.root={out / 'cache'}",
           f"data.train_instances={train}", f"data.train_images={train_images}",
           f"data.val_instances={val}", f"data.val_images={val_images}", *args.overrides]
    print(" ".join(cmd), flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    minutes = (time.perf_counter() - t) / 60
    summary = json.loads((out / "pipeline.json").read_text())
    images = summary["data"]["train"]["images"] + summary["data"]["val"]["images"]
    print(f"\n| images (train + val) | novel classes | wall time (min) | ViLD novel AP50 | "
          f"ViLD base AP50 |\n|---:|---|---:|---:|---:|\n| {images} | "
          f"{', '.join(summary['data']['novel'])} | {minutes:.1f} | "
          f"{100 * summary['students']['vild']['AP50_novel']:.1f} | "
          f"{100 * summary['students']['vild']['AP50_base']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
