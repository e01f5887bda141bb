"""Pretrain the tiny open_clip teacher of the embedded world and report its zero-shot accuracy.

    python -m tools.pretrain_teacher [--config configs/shapes/teacher.yaml] [key=value ...]
    python -m tools.pretrain_teacher --evaluate-only      # score the existing checkpoint

Writes ``pretrain.output`` (a safetensors state_dict that open_clip loads with
``pretrained=<path>``) and, beside it, ``<name>.json`` with the command, the
world it was trained on, the time taken and the zero-shot accuracy (val object
crops, all object classes, prompt-ensembled text classifier; base and novel).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from safetensors.torch import save_file

from distill.config import atomic_write
from distill.data.synthetic import generate_world
from distill.teacher import Teacher
from distill.teacher.pretrain import pretrain, zero_shot_accuracy
from tools import cli


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
        record = evaluate_and_record(cfg, world, argv)
    else:
        record = pretrain_and_save(cfg, world, not args.no_progress, argv)
    acc = record["zero_shot"]
    print(f"teacher {record['checkpoint']} ({record['fingerprint']}): zero-shot top-1 on val "
          f"object crops: all {acc['top1_all']:.3f}, base {acc['top1_base']:.3f}, "
          f"novel {acc['top1_novel']:.3f}")
    return 0


def pretrain_and_save(cfg, world, progress: bool, argv: list[str]) -> dict:
    """Pretrain ``cfg.teacher`` on ``world``, write ``cfg.pretrain.output`` atomically, score it."""
    t = time.perf_counter()
    model = pretrain(world, cfg.teacher, cfg.pretrain, progress=progress)
    seconds = round(time.perf_counter() - t, 1)
    out = Path(cfg.pretrain.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, out)
    return evaluate_and_record(cfg, world, argv, seconds)


def evaluate_and_record(cfg, world, argv: list[str], seconds: float | None = None) -> dict:
    """Zero-shot accuracy of the checkpoint; written to ``<checkpoint>.json`` with how it was made."""
    out = Path(cfg.pretrain.output)
    record_path = out.with_suffix(".json")
    teacher = Teacher.from_config(dataclasses.replace(cfg.teacher, pretrained=str(out)))
    previous = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record = {
        "checkpoint": str(out),
        "command": "python -m tools.pretrain_teacher " + " ".join(argv),
        "teacher": dataclasses.asdict(cfg.teacher),
        "pretrain": dataclasses.asdict(cfg.pretrain),
        "world": world.fingerprint,
        "fingerprint": teacher.fingerprint,
        "pretrain_seconds": seconds if seconds is not None else previous.get("pretrain_seconds"),
        "zero_shot": zero_shot_accuracy(teacher, world),
    }
    atomic_write(record_path, json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    sys.exit(main())
