"""The main job: annotations in, an exported open-vocabulary student and a report out.

    python -m tools.pipeline [--config configs/shapes/pipeline.yaml] [--with-teacher] [--onnx]
                             [key=value ...]

The embedded world by default; a benchmark with its own config
(``--config configs/coco_ov/pipeline.yaml``); or your own COCO-format files
(``--config configs/custom/pipeline.yaml data.train_instances=... data.train_images=...
data.val_instances=... data.val_images=...``). The stages are ``ovdistill/pipeline.py``;
this file parses the command line.
"""

from __future__ import annotations

import sys

from ovdistill.pipeline import main_job

from . import cli


def main(argv: list[str] | None = None) -> int:
    parser = cli.config_parser(__doc__.splitlines()[0], "configs/shapes/pipeline.yaml")
    parser.add_argument("--with-teacher", action="store_true",
                        help="also score the teacher on proposals (slow on a CPU)")
    parser.add_argument("--onnx", action="store_true", help="export model.onnx too")
    parser.add_argument("--no-progress", action="store_true")
    return cli.run(_run, parser.parse_args(argv))


def _run(args) -> int:
    overrides = list(args.overrides)
    overrides += ["pipeline.teacher_baseline=true"] if args.with_teacher else []
    overrides += ["pipeline.onnx=true"] if args.onnx else []
    main_job(args.config, overrides, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
