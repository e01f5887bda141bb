"""Train (or only evaluate) a ViLD-family student detector.

    python -m tools.train --config configs/shapes/vild.yaml [key=value ...] [--eval-only]

The recipe is ``detectors/recipe.py``: the train split's base categories are the
training vocabulary; distillation targets (``loss.vild_image`` > 0) come from the cache
written by ``tools/extract.py``; the final evaluation names every val category
(generalized setting).

Rerunning the same command resumes from the last checkpoint in ``output_dir`` (a
killed run ends with the weights an uninterrupted one gets); a rerun with another
config into an ``output_dir`` that holds checkpoints is refused. With
``data.on_error=skip`` the records and images left out are listed in
``output_dir/skipped.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from detectors import recipe

from . import cli


def main(argv: list[str] | None = None) -> int:
    parser = cli.config_parser(__doc__.splitlines()[0], "configs/shapes/vild.yaml")
    parser.add_argument("--eval-only", action="store_true", help="evaluate the final weights")
    parser.add_argument("--no-progress", action="store_true")
    return cli.run(_run, parser.parse_args(argv))


def _run(args) -> int:
    cfg = cli.load(args)
    if not args.eval_only:
        cli.check_rerun(cfg)
    metrics = recipe.train(cfg, resume=True, eval_only=args.eval_only,
                           progress=not args.no_progress)
    print(json.dumps(metrics, indent=2))
    print(f"results: {Path(cfg.output_dir) / 'eval'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
