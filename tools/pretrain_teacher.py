"""Pretrain the tiny open_clip teacher of the embedded world and report its zero-shot accuracy.

    python -m tools.pretrain_teacher [--config configs/shapes/teacher.yaml] [key=value ...]
    python -m tools.pretrain_teacher --evaluate-only      # score the existing checkpoint

Writes ``pretrain.output`` (a safetensors state_dict that open_clip loads with
``pretrained=<path>``) and, beside it, ``<name>.json`` with the command, the
world it was trained on, the time taken and the zero-shot accuracy (val object
crops, all object classes, prompt-ensembled text classifier; base and novel).
"""

from __future__ import annotations

import sys
from pathlib import Path

from distill.data.synthetic import generate_world
from distill.teacher.pretrain import evaluate_and_record, pretrain_and_save

from . import cli

COMMAND = ["python", "-m", "tools.pretrain_teacher"]


def main(argv: list[str] | None = None) -> int:
    parser = cli.config_parser(__doc__.splitlines()[0], "configs/shapes/teacher.yaml")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="only measure the zero-shot accuracy of pretrain.output")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    return cli.run(lambda a: _run(a, argv if argv is not None else sys.argv[1:]), args)


def _run(args, argv: list[str]) -> int:
    cfg = cli.load(args)
    world = generate_world(cfg.world, progress=not args.no_progress)
    if args.evaluate_only:
        if not Path(cfg.pretrain.output).is_file():
            raise FileNotFoundError(f"no teacher checkpoint at {cfg.pretrain.output}; "
                                    "run without --evaluate-only")
        record = evaluate_and_record(cfg, world, COMMAND + argv)
    else:
        record = pretrain_and_save(cfg, world, not args.no_progress, COMMAND + argv)
    acc = record["zero_shot"]
    print(f"teacher {record['checkpoint']} ({record['fingerprint']}): zero-shot top-1 on val "
          f"object crops: all {acc['top1_all']:.3f}, base {acc['top1_base']:.3f}, "
          f"novel {acc['top1_novel']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
