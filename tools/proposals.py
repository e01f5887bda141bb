"""Write a trained student's class-agnostic RPN proposals for a split (ViLD's offline recipe).

    python -m tools.proposals --config configs/coco_ov/vild_text.yaml [--split train] [key=value ...]

Loads ``output_dir``'s final weights (else its last checkpoint), runs the RPN, trained
on base classes only, on every image of the split and writes its top
``model.rpn_post_nms_top_n_test`` (300) boxes per image with their objectness to
``output_dir/proposals_<split>.safetensors`` (``--output`` to change). Extraction
then embeds them: ``python -m tools.extract ... cache.proposals=<that file>``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from distill.config import ExperimentConfig
from tools import cli


def main(argv: list[str] | None = None) -> int:
    parser = cli.config_parser(__doc__.splitlines()[0], "configs/shapes/vild_text.yaml")
    parser.add_argument("--split", default="train", choices=("train", "val"))
    parser.add_argument("--output", default=None, help="proposals file to write")
    parser.add_argument("--no-progress", action="store_true")
    return cli.run(_run, parser.parse_args(argv))


def write(cfg: ExperimentConfig, split: str = "train", output: str | Path | None = None,
          progress: bool = True) -> Path:
    """The proposals file of ``cfg``'s trained student on ``split``; returns its path."""
    from detectors.inference import write_proposals
    from distill.data.coco import CocoDetection, dataset_paths
    from distill.engine import final_weights, load_weights
    from distill.teacher import Teacher
    from tools import train

    out = Path(cfg.output_dir)
    path = Path(output) if output else out / f"proposals_{split}.safetensors"
    weights = final_weights(out)  # before loading the teacher: a missing run fails fast
    model = train.build_student(cfg, Teacher.from_config(cfg.teacher))
    load_weights(model, weights)
    t = time.perf_counter()
    n = write_proposals(model, CocoDetection(*dataset_paths(cfg, split)), path,
                        progress=progress)
    print(f"proposals: {n} boxes written to {path} in {time.perf_counter() - t:.0f} s")
    return path


def _run(args) -> int:
    write(cli.load(args), args.split, args.output, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
