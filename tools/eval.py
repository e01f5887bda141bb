"""Evaluate a trained student on the val split (generalized setting: every class name).

    python -m tools.eval --config configs/shapes/vild.yaml [output_dir=...] [key=value ...]

Loads ``output_dir/model_final.safetensors`` (or the last checkpoint), writes the
COCO results JSON, ``metrics.json``, the per-class AP50 plot and ``summary.json``
to ``output_dir/eval``. Same as ``python -m tools.train --eval-only``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from detectors import recipe

from . import cli


def main(argv: list[str] | None = None) -> int:
    parser = cli.config_parser(__doc__.splitlines()[0], "configs/shapes/vild.yaml")
    parser.add_argument("--no-progress", action="store_true")
    return cli.run(_run, parser.parse_args(argv))


def _run(args) -> int:
    cfg = cli.load(args)
    metrics = recipe.train(cfg, eval_only=True, progress=not args.no_progress)
    print(json.dumps(metrics, indent=2))
    print(f"results: {Path(cfg.output_dir) / 'eval'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
