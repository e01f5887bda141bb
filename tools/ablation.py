"""The ViLD ablation on the embedded world: every student and the teacher baseline, per seed.

    python -m tools.ablation [--config configs/shapes/pipeline.yaml] [--seeds 0 1]
                             [--results docs/results.md] [key=value ...]

For each world seed (``world.seed``): ViLD-text on a scratch ResNet-10 (whose RPN
proposes for the rest), proposals, the teacher's region cache, ViLD-image, ViLD,
ViLD-ensemble, ViLD-text and ViLD on the teacher's tower, F-VLM, and the teacher
classifying the RPN's proposals (ViLD's "CLIP on cropped regions"). The stages are
the main job's kind (``ovdistill/stages.py``; the ablation: ``ovdistill/ablations.py``); a rerun reuses everything.

Seeds run side by side, ``--jobs`` at a time (default: one per 1 CPU core, at most
one per seed), each process with cores / jobs threads: these small students are
bound by Python and per-image work, so two 1-thread runs on 2 cores train at about
the speed of one 2-thread run each (0.45-0.49 s against 0.43 s an iteration here).

Prints the table (box AP50 on novel / base / all classes of the val split,
generalized setting; inference images/s), the mean over seeds and each seed,
then the floors of the issue; writes ``output_dir/ablation.json`` and, with
``--results``, the table and the command into that markdown file (between the
``<!-- ablation -->`` markers, rest of the file kept).
"""

from __future__ import annotations

import sys

from ovdistill.ablations import ablation

from . import cli


def main(argv: list[str] | None = None) -> int:
    parser = cli.config_parser(__doc__.splitlines()[0], "configs/shapes/pipeline.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="world seeds (0 1)")
    parser.add_argument("--results", default=None,
                        help="markdown file to write the table into (e.g. docs/results.md)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="seeds run at once (default: min(seeds, CPU cores))")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    command = "python -m tools.ablation " + " ".join(argv if argv is not None else sys.argv[1:])
    return cli.run(lambda a: _run(a, command), args)


def _run(args, command: str) -> int:
    ablation(cli.load(args), list(args.overrides), args.seeds, command, args.results,
             args.jobs, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
