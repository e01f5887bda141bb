"""The segmentation ablation on the embedded world: three students and the teacher, per seed.

    python -m tools.seg_ablation [--seeds 0 1] [--results docs/results.md] [--jobs N]
                                 [--output-dir outputs/shapes/seg] [key=value ...]

For each world seed (``world.seed``): the base-only student (``seg_supervised``),
the pixel-distilled one (``seg_distill``), pixel distillation + MaskCLIP+ pseudo-labels
(``seg_distill_pseudo``) and the teacher's own zero-shot segmentation
(``seg_teacher``). Each stage lives in ``output_dir/<name>-<fingerprint>``
(ovdistill/stages.py) and is reused by a rerun. Seeds run side by side as in ``tools/ablation.py``.

Prints and (``--results``) writes the table (mIoU on base / novel classes, their
harmonic mean, all-class mIoU, images/s on the val split, every class named)
and the floors: the pixel-distilled student's novel mIoU >= 2x the base-only
student's and >= the teacher's; the whole run <= 20 minutes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ovdistill.ablations import seg_ablation

from . import cli


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--results", default=None, help="markdown file for the table")
    p.add_argument("--output-dir", default="outputs/shapes/seg")
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    command = "python -m tools.seg_ablation " + " ".join(argv if argv is not None else sys.argv[1:])
    return cli.run(lambda a: _run(a, command), args)


def _run(args, command: str) -> int:
    seg_ablation(Path(args.output_dir), list(args.overrides), args.seeds, command, args.results,
                 args.jobs, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
