"""The main job: the whole embedded pipeline, each stage reused when already done.

    python -m tools.pipeline [--config configs/shapes/pipeline.yaml] [key=value ...]

Stages, each cached on disk and reused by the next run:

1. the synthetic world (generated or reused);
2. the tiny teacher: the committed checkpoint ``teacher.pretrained`` (pretrained
   now when that file is missing) and its zero-shot accuracy on val object crops;
3. ViLD-text: a student trained on base-class boxes only (no distillation); its
   RPN, trained on base classes, is the class-agnostic proposal network;
4. proposals: that RPN's top proposals for every training image (300, as ViLD);
5. extraction: teacher embeddings (1x + 1.5x crops) of the top 32 of them (ViLD
   embeds 300; 32 keeps this stage near 2.5 minutes on 2 CPU cores);
6. ViLD: a student trained with ViLD-text + ViLD-image distillation from the cache;
7. the pixel-distilled student segmenter (``configs/shapes/seg_distill.yaml``, the
   segmentation ablation's stage, in ``output_dir/seg``);
8. the result tables (box AP50 on novel, base and all classes, generalized setting;
   mIoU on base, novel and all classes).

Student stages live in ``output_dir/<stage>-<hash of its resolved config>``, so
changing a setting retrains that stage and what follows, and nothing else. The stages
are ``ovdistill/stages.py``; this file parses the command line.
"""

from __future__ import annotations

import sys

from ovdistill.stages import main_job

from . import cli


def main(argv: list[str] | None = None) -> int:
    parser = cli.config_parser(__doc__.splitlines()[0], "configs/shapes/pipeline.yaml")
    parser.add_argument("--no-progress", action="store_true")
    return cli.run(_run, parser.parse_args(argv))


def _run(args) -> int:
    main_job(cli.load(args), list(args.overrides), progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
