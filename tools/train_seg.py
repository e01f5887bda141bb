"""Train (or only evaluate) a student segmenter; or score the teacher's own segmentation.

    python -m tools.train_seg --config configs/shapes/seg_distill.yaml [key=value ...]
                              [--eval-only] [--teacher-baseline]

The recipe is ``segmentors/recipe.py``: every class of the dataset trains, pixels of
novel classes unlabelled for ``seg.supervised``; the teacher's dense (MaskCLIP) targets
come online or from the cache (``seg.dense_source``); evaluation is mIoU on the val split
with every class named, into ``output_dir/eval``. ``--teacher-baseline`` scores the teacher
alone (dense embeddings vs. text, upsampled) into ``output_dir/eval``. Rerunning the
same command resumes from the last checkpoint, as tools/train.py does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from segmentors import recipe

from . import cli


def main(argv: list[str] | None = None) -> int:
    parser = cli.config_parser(__doc__.splitlines()[0], "configs/shapes/seg_distill.yaml")
    parser.add_argument("--eval-only", action="store_true", help="evaluate the final weights")
    parser.add_argument("--teacher-baseline", action="store_true",
                        help="score the teacher's own dense segmentation instead")
    parser.add_argument("--no-progress", action="store_true")
    return cli.run(_run, parser.parse_args(argv))


def _run(args) -> int:
    cfg = cli.load(args)
    if args.teacher_baseline:
        metrics = recipe.teacher_baseline(cfg, progress=not args.no_progress)
    else:
        if not args.eval_only:
            cli.check_rerun(cfg)  # a rerun resumes from the last checkpoint
        metrics = recipe.train(cfg, resume=True, eval_only=args.eval_only,
                               progress=not args.no_progress)
    print(json.dumps(metrics, indent=2))
    print(f"results: {Path(cfg.output_dir) / 'eval'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

