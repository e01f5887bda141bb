"""Per-image costs of the real-benchmark configs (FLOPs counted, CPU seconds timed, cache
bytes), and the ``short`` detection schedule they give (configs/vild_r50_short.yaml).

    python bench/costs.py [--crops 32] [--reps 1] [--threads N] [--json costs.json]
    python bench/costs.py --smoke gpu_smoke.json   # the short schedule from a GPU's s/iter

For docs/reproduce.md's time and disk estimates. Models are the configs' own (open_clip
ViT-B/32 and ViT-B/16 teachers, ViLD R50-FPN at 1024 px, R50-FPN segmenter on 512 crops)
with random weights (the cost does not depend on them; nothing is downloaded). FLOPs come
from ``torch.utils.flop_counter`` (matmuls and convolutions; RoIAlign and NMS are not
counted), seconds from ``--reps`` timed runs on this machine's CPU; teacher costs are
measured on ``--crops`` crops / one window and scaled to a whole image (per-crop cost is
constant). Rows, per image of the benchmark:

- extract: ViT-B/32 on 300 proposals x 2 crops (1x, 1.5x) at 224 px (ViLD's recipe);
- train: one ViLD R50-FPN step (forward + backward, 300 cached embeddings) on the
  1024 x 1024 input that large-scale jitter makes (COCO-OV: no mask head);
- train LVIS: the same step with the LVIS config's mask head (Mask R-CNN's 4-conv head on
  the positive RoIs, 28 x 28 targets), 866 training names and 12 objects (LVIS v1 train's
  mean);
- infer: ViLD R50-FPN inference on a 768 x 1024 image (COCO's typical 480 x 640 scaled to
  the 1024 long side; 1000 proposals, the configs' test setting);
- ade teacher: ViT-B/16 dense passes over the sliding 512-px windows (stride 341) of a
  512 x 683 image (ADE20k's typical 4:3 at short side 512: 2 windows), key smoothing off;
- ade train: one R50-FPN segmenter step on a 512 crop + the teacher's dense pass on it.

Left out of every row: data loading and decoding, RoIAlign, NMS, the loss reductions and
the optimizer step (all small against the convolutions on a GPU), so the FLOPs are lower
bounds and the hours derived from them estimates.

The short schedule is the number of images 8 GPUs train on in 24 hours, at the seconds
per image of ``bench/gpu_smoke.py``'s COCO-OV row (``--smoke``) or, without one, of the
train row's FLOPs at an assumed 50 TFLOP/s per GPU (labelled as such), in iterations of
16 images with ViLD's steps at 90 % and 95 %.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from detectors import build_detector  # noqa: E402
from detectors.criterion import DetectionCriterion  # noqa: E402
from distill.config import load_config  # noqa: E402
from distill.teacher import build_teacher  # noqa: E402
from segmentors import build_segmenter  # noqa: E402
from segmentors.inference import window_starts  # noqa: E402

PROPOSALS = 300
ASSUMED_FLOPS = 50e12  # per GPU and second: an assumption (docs/reproduce.md), not measured
SHORT = {"gpus": 8, "hours": 24, "batch": 16}  # a lab's day on 8 GPUs, 2 images per GPU
EMBED_BYTES = 512 * 2  # float16 embedding of a ViT-B teacher
BOX_BYTES = 4 * 4 + 4  # float32 xyxy + score


def measure(fn, reps: int) -> tuple[float, float]:
    """(FLOPs of one call, median seconds over ``reps`` calls after the counted one). The
    counted call runs with PyTorch's fused attention fast path off: its kernel
    (``_native_multi_head_attention``, taken by open_clip's towers in inference) is invisible
    to the counter, which then misses a ViT's attention projections (ViT-B/32 at 224 px:
    5.9 GFLOPs counted with it, 8.7 without); the timed calls run as deployed."""
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(counter.get_total_flops()), sorted(times)[len(times) // 2]


def short_schedule(seconds_per_image: float, gpus: int = SHORT["gpus"],
                   hours: float = SHORT["hours"], batch: int = SHORT["batch"]) -> dict:
    """The iterations of ``batch`` images that ``gpus`` GPUs run in ``hours`` at
    ``seconds_per_image`` per image and GPU (rounded down to 1000), with ViLD's lr steps at
    90 % and 95 % of them."""
    images = gpus * hours * 3600 / seconds_per_image
    iters = int(images // batch // 1000 * 1000)
    return {"max_iters": iters, "steps": [iters * 9 // 10, iters * 19 // 20],
            "images": iters * batch}


def print_short(seconds_per_image: float, source: str) -> dict:
    short = short_schedule(seconds_per_image)
    print(f"\nshort schedule ({SHORT['gpus']} GPUs x {SHORT['hours']} h at "
          f"{seconds_per_image:.4f} s per image and GPU, {source}): "
          f"{short['images'] / 1e6:.2f}M images, configs/vild_r50_short.yaml:")
    print(f"  train.max_iters: {short['max_iters']}\n  train.schedule.steps: {short['steps']}")
    return short


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--crops", type=int, default=32, help="teacher crops timed (scaled to 600)")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--smoke", default=None,
                   help="bench/gpu_smoke.py's JSON: the short schedule from its COCO-OV s/iter")
    a = p.parse_args(argv)
    if a.smoke:
        row = next(r for r in json.loads(Path(a.smoke).read_text())
                   if r["config"].endswith("coco_ov/vild.yaml"))
        print_short(row["s_per_iter"] / row["batch"],
                    f"measured by bench/gpu_smoke.py on {row['device']}")
        return 0
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rows = {}

    b32 = build_teacher("ViT-B-32", pretrained=None)
    image = torch.randint(0, 256, (3, 480, 640), dtype=torch.uint8)
    xy = torch.rand(a.crops // 2, 2) * 400
    boxes = torch.cat([xy, xy + 32 + torch.rand(a.crops // 2, 2) * 200], 1)
    flops, sec = measure(lambda: b32.regions(image, boxes), a.reps)
    scale = 2 * PROPOSALS / a.crops  # crops per image / crops measured
    rows["extract (ViT-B/32, 600 crops)"] = (flops * scale, sec * scale)

    dim = b32.embed_dim
    model = dataclasses.asdict(load_config(REPO / "configs/coco_ov/vild.yaml").model)
    det = build_detector(**model, embed_dim=dim)  # ViLD's R50-FPN, 4conv+1fc head, 1024 px
    det.set_vocabulary(F.normalize(torch.randn(48, dim), dim=-1))
    big = torch.randint(0, 256, (3, 768, 1024), dtype=torch.uint8)  # inference: 4:3 image
    square = torch.randint(0, 256, (3, 1024, 1024), dtype=torch.uint8)  # training: jittered
    target = {"boxes": torch.tensor([[100.0, 100, 300, 400], [500, 200, 700, 600]]),
              "labels": torch.tensor([1, 2])}
    pxy = torch.rand(PROPOSALS, 2) * 800
    distill = {"boxes": torch.cat([pxy, pxy + 16 + torch.rand(PROPOSALS, 2) * 200], 1),
               "embeddings": F.normalize(torch.randn(PROPOSALS, dim), dim=-1)}
    criterion = DetectionCriterion({"vild_text": 1.0, "box_reg": 1.0, "vild_image": 0.5,
                           "objectness": 1.0, "rpn_box_reg": 1.0})

    def step(model, sample):
        def run():
            model.train()
            loss = sum(criterion(model([square], [sample], [distill["boxes"]]),
                                 {"distill_targets": distill["embeddings"]}).values())
            loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    rows["train (ViLD R50-FPN step, 1024 x 1024)"] = measure(step(det, target), a.reps)
    lvis = dataclasses.asdict(load_config(REPO / "configs/lvis/vild.yaml").model)
    det_lvis = build_detector(**lvis, embed_dim=dim)
    det_lvis.set_vocabulary(F.normalize(torch.randn(866, dim), dim=-1))
    # LVIS v1 train: 1.27M annotations on 100k images, about 12 an image (the mask head runs
    # on the positive RoIs, up to 128 of the 512 sampled)
    gxy = torch.rand(12, 2) * 800
    gt = torch.cat([gxy, gxy + 40 + torch.rand(12, 2) * 180], 1)
    masks = torch.zeros(12, 1024, 1024, dtype=torch.uint8)
    for m, (x0, y0, x1, y1) in zip(masks, gt.long().tolist(), strict=True):
        m[y0:y1, x0:x1] = 1
    rows["train LVIS (ViLD R50-FPN + mask head step, 12 objects, 1024 x 1024)"] = measure(
        step(det_lvis, {"boxes": gt, "labels": torch.randint(1, 867, (12,)), "masks": masks}),
        a.reps)
    del det_lvis

    def infer():
        det.eval()
        with torch.no_grad():
            det([big])

    rows["infer (ViLD R50-FPN, 768 x 1024)"] = measure(infer, a.reps)

    b16 = build_teacher("ViT-B-16", pretrained=None)
    window = torch.randint(0, 256, (1, 3, 512, 512), dtype=torch.uint8)
    flops, sec = measure(lambda: b16.dense(window), a.reps)
    windows = len(window_starts(512, 512, 341)) * len(window_starts(683, 512, 341))
    rows[f"ade teacher (ViT-B/16, {windows} windows)"] = (flops * windows, sec * windows)

    seg = build_segmenter("seg_r50_fpn", embed_dim=b16.embed_dim, fpn_channels=256)
    seg.set_vocabulary(F.normalize(torch.randn(150, b16.embed_dim), dim=-1))

    def seg_step():
        seg.train()
        out = seg(window)
        dense = b16.dense(window)
        target = F.interpolate(dense, size=out["pixel_embeddings"].shape[-2:], mode="bilinear")
        (out["pixel_embeddings"] - target).abs().mean().backward()
        seg.zero_grad(set_to_none=True)

    rows["ade train (R50-FPN step + teacher, 512 crop)"] = measure(seg_step, a.reps)

    cache = PROPOSALS * (EMBED_BYTES + BOX_BYTES)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs; per image of the benchmark:\n")
    print("| work | GFLOPs | CPU s |")
    print("|---|---:|---:|")
    for name, (flops, sec) in rows.items():
        print(f"| {name} | {flops / 1e9:.0f} | {sec:.2f} |")
    print(f"\ncache per image: {PROPOSALS} x ({EMBED_BYTES} + {BOX_BYTES}) B = {cache / 1e3:.0f} kB")
    train_flops = rows["train (ViLD R50-FPN step, 1024 x 1024)"][0]
    short = print_short(train_flops / ASSUMED_FLOPS,
                        f"FLOP estimate at an assumed {ASSUMED_FLOPS / 1e12:.0f} TFLOP/s")
    if a.json:
        Path(a.json).write_text(json.dumps(
            {"per_image": {k: {"flops": f, "cpu_seconds": s} for k, (f, s) in rows.items()},
             "cache_bytes_per_image": cache, "threads": torch.get_num_threads(),
             "short_schedule": short}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
