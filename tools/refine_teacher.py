"""Refine the teacher's image tower by self-distillation (CLIPSelf) and score it before and after.

    python -m tools.refine_teacher [--config configs/shapes/refine.yaml] [key=value ...]

The recipe is ``distill/teacher/refine.py``: random grids of regions on the train images,
the trainable tower's dense features pooled over each region pulled to the frozen tower's
crop embedding of it. Writes ``refine.output`` (a safetensors state_dict of the whole CLIP
model that open_clip loads with ``pretrained=<path>``; the text tower unchanged) and,
beside it, ``<name>.json`` with the command, time, images and the zero-shot top-1 of crop
and dense region embeddings before and after. A rerun resumes from the last checkpoint in
``output_dir``.
"""

from __future__ import annotations

import sys

from distill.teacher.refine import refine_and_save

from . import cli

COMMAND = ["python", "-m", "tools.refine_teacher"]


def main(argv: list[str] | None = None) -> int:
    parser = cli.config_parser(__doc__.splitlines()[0], "configs/shapes/refine.yaml")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    return cli.run(lambda a: _run(a, argv if argv is not None else sys.argv[1:]), args)


def _run(args, argv: list[str]) -> int:
    from distill.data.synthetic import generate_world
    from distill.teacher.pretrain import region_accuracy

    cfg = cli.load(args)
    world = generate_world(cfg.world, progress=False) if cfg.data.train_instances is None \
        and cfg.data.benchmark is None else None
    measure = (lambda teacher: region_accuracy(teacher, world)) if world is not None else None
    record = refine_and_save(cfg, not args.no_progress, COMMAND + argv, measure)
    print(f"refined teacher: {record['checkpoint']} ({record['seconds']:.0f} s)")
    for when in ("before", "after"):
        if when in record:
            r = record[when]
            print(f"  {when}: zero-shot top-1 on val objects: crop {r['crop_top1']:.3f}, "
                  f"dense {r['dense_top1']:.3f} (dense path on the object's own crop "
                  f"{r['dense_on_crop_top1']:.3f}); crop-dense cosine {r['cosine']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
