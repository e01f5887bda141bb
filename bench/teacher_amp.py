"""The teacher under autocast against float32: cosine per region embedding (and per dense
location), the fidelity of ``teacher.amp_dtype`` (the real configs extract in bfloat16).

    python bench/teacher_amp.py [--model ViT-B-32] [--device cpu|cuda] [--images 2]
                                [--boxes 64] [--dtypes bfloat16 float16] [--json out.json]

Builds the teacher (open_clip ``--model`` with random weights, or ``--model-config`` for a
local JSON such as configs/shapes/teacher/tiny_vit.json; ``--pretrained`` for a weights
file), embeds the same seeded images and boxes in float32 and under autocast to each dtype
(crop regions, ViLD's 1x + 1.5x, and the dense map), and prints a table: mean, 1st
percentile and minimum cosine to float32, and the time of each. On CUDA the teacher's own
``amp_dtype`` switch is used; on the CPU the same autocast is entered around it (CPU
float16 autocast is not offered by torch, so only bfloat16 runs there, slowly).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.config import atomic_write  # noqa: E402
from distill.teacher import build_teacher  # noqa: E402


def _inputs(n_images: int, n_boxes: int, size: tuple[int, int], seed: int):
    g = torch.Generator().manual_seed(seed)
    h, w = size
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
              for _ in range(n_images)]
    boxes = []
    for _ in images:
        xy = torch.rand(n_boxes, 2, generator=g) * torch.tensor([w * 0.8, h * 0.8])
        wh = (0.05 + 0.3 * torch.rand(n_boxes, 2, generator=g)) * torch.tensor([w, h])
        boxes.append(torch.cat([xy, (xy + wh).minimum(torch.tensor([w, h]))], 1))
    return images, boxes


def _embed(teacher, images, boxes, dtype: str | None, device: str):
    teacher.amp_dtype = dtype
    outer = torch.autocast("cpu", dtype=getattr(torch, dtype)) \
        if dtype and device == "cpu" else contextlib.nullcontext()
    t = time.perf_counter()
    with outer:
        regions = torch.cat(teacher.regions(images, boxes, mode="crop"))
        dense = torch.stack([teacher.dense(im) for im in images])
    if device == "cuda":
        torch.cuda.synchronize()
    return regions.float().cpu(), dense.float().cpu(), time.perf_counter() - t


def _cosines(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    c = F.cosine_similarity(a, b, dim=-1).double().flatten()
    return {"mean": float(c.mean()), "p1": float(c.quantile(0.01)), "min": float(c.min())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--model-config", default=None)
    p.add_argument("--pretrained", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--boxes", type=int, default=64)
    p.add_argument("--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    p.add_argument("--dtypes", nargs="+", default=None,
                   help="autocast dtypes (default: bfloat16 on the CPU, both on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    teacher = build_teacher(args.model, args.pretrained, args.model_config,
                            templates="simple", device=args.device)
    images, boxes = _inputs(args.images, args.boxes, tuple(args.size), args.seed)
    dtypes = args.dtypes or (["bfloat16"] if args.device == "cpu" else ["bfloat16", "float16"])
    _embed(teacher, images[:1], boxes[:1], None, args.device)  # warm-up
    ref_regions, ref_dense, ref_s = _embed(teacher, images, boxes, None, args.device)
    rows = {"float32": {"seconds": ref_s}}
    for dtype in dtypes:
        regions, dense, s = _embed(teacher, images, boxes, dtype, args.device)
        rows[dtype] = {"seconds": s, "regions": _cosines(regions, ref_regions),
                       "dense": _cosines(dense.movedim(1, -1), ref_dense.movedim(1, -1))}
    print(f"teacher {args.model_config or args.model} on {args.device}, "
          f"{args.images} images of {args.size[0]}x{args.size[1]}, {args.boxes} boxes each")
    print("| precision | region cosine mean / p1 / min | dense cosine mean / p1 / min | s |")
    print("|---|---|---|---:|")
    for name, r in rows.items():
        if name == "float32":
            print(f"| float32 | 1 | 1 | {r['seconds']:.2f} |")
            continue
        reg, den = r["regions"], r["dense"]
        print(f"| {name} | {reg['mean']:.5f} / {reg['p1']:.5f} / {reg['min']:.5f} | "
              f"{den['mean']:.5f} / {den['p1']:.5f} / {den['min']:.5f} | {r['seconds']:.2f} |")
    if args.json:
        atomic_write(args.json, json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
