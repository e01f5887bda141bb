"""Write a trained student's class-agnostic RPN proposals for a split (ViLD's offline recipe).

    python -m tools.proposals --config configs/coco_ov/vild_text.yaml [--split train] [key=value ...]

Loads ``output_dir``'s final weights (else its last checkpoint), runs the RPN, trained
on base classes only, on every image of the split and writes its top
``model.rpn_post_nms_top_n_test`` (300) boxes per image with their objectness to
``output_dir/proposals_<split>.safetensors`` (``--output`` to change). Extraction
then embeds them: ``python -m tools.extract ... cache.proposals=<that file>``. Under
``torchrun`` each process proposes for its share of the images and rank 0 writes the file.
"""

from __future__ import annotations

import sys

from detectors import recipe

from . import cli


def main(argv: list[str] | None = None) -> int:
    parser = cli.config_parser(__doc__.splitlines()[0], "configs/shapes/vild_text.yaml")
    parser.add_argument("--split", default="train", choices=("train", "val"))
    parser.add_argument("--output", default=None, help="proposals file to write")
    parser.add_argument("--no-progress", action="store_true")
    return cli.run(_run, parser.parse_args(argv))


def _run(args) -> int:
    recipe.write_split_proposals(cli.load(args), args.split, args.output,
                                 progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
