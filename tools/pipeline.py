"""The main job: the whole embedded pipeline, each stage reused when already done.

    python -m tools.pipeline [--config configs/shapes/pipeline.yaml] [key=value ...]

Stages so far: the synthetic world. Later stages (teacher, proposals, cache,
students, evaluation) append to this file's ``STAGES``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from distill.config import atomic_write_text, save_config
from distill.data.synthetic import generate_world, summarize
from tools import cli


def main(argv: list[str] | None = None) -> int:
    args = cli.config_parser(__doc__.splitlines()[0], "configs/shapes/pipeline.yaml").parse_args(argv)
    return cli.run(_run, args)


def _run(args) -> int:
    cfg = cli.load(args)
    out = Path(cfg.output_dir)
    save_config(cfg, out / "config.yaml")
    summary: dict = {"config": str(out / "config.yaml")}

    t = time.perf_counter()
    world = generate_world(cfg.world)
    print(summarize(world))
    summary["world"] = {"path": str(world.root), "seconds": round(time.perf_counter() - t, 2)}

    atomic_write_text(out / "pipeline.json", json.dumps(summary, indent=2) + "\n")
    print(f"results: {out / 'pipeline.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
