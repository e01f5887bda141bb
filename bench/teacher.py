"""Teacher benchmark: encoder vs crop pipeline vs dense regions, and cache size / int8 error.

    python bench/teacher.py [--images 2 --boxes 300 --b32-crop-boxes 32 --repeat 2
                             --tiny-config configs/shapes/teacher/tiny_vit.json
                             --tiny-repeat 3 --threads N --json results.json]

Runs, in one process on the same seeded images and boxes, (a) open_clip ViT-B-32
with random weights (224 px, float32) and (b) the tiny teacher of ``--tiny-config``
(random weights; the cost is the same as trained ones), and prints a markdown table:

- bare ``model.encode_image`` throughput on pre-cut crops (crops/s), the very crops
  and encoder batches the crop pipeline makes;
- ``Teacher.regions(mode="crop")`` regions/s (ViLD: 1x and 1.5x crop per box), as
  crops/s (regions/s x number of crop scales) over the bare encoder: floor >= 0.85;
- ``Teacher.regions(mode="dense")`` regions/s with ``--boxes`` (300) boxes per image,
  over crop-mode regions/s: floor >= 20;
- stored bytes per region (fp16 / int8) and the mean cosine of int8-stored region
  embeddings (written to and read back from a real ``EmbeddingCache`` in a temporary
  directory) to the float32 ones: floor >= 0.995.

``--accuracy CONFIG [--refined FILE]`` instead measures the dense-vs-crop protocol on the
config's world (``distill.teacher.pretrain.region_accuracy``): zero-shot top-1 over the
object names of every val object box from crops and from the dense map at the config's
dense input size, and their mean cosine; with a CLIPSelf-refined file, side by side for the
teacher as configured, the refined tower on the dense path only
(``teacher.dense_pretrained``) and the refined model for both. A diagnostic column runs
the dense path on each object's own crop (the tower's input size, averaged over its map):
the dense path's accuracy without the rest of the image or a change of scale.

Diagnostics: crop cutting alone (crops/s, the step the pipeline adds to
the encoder), the rest of the pipeline time, and the tiny teacher's dense mode on the
images and boxes downscaled by ``--tiny-dense-scale``. Each timing is the median of
``--repeat`` (ViT-B-32) or ``--tiny-repeat`` rounds after a warm-up; a round times
bare, cut, crop and dense once each, so load changes hit all four alike. On a shared,
oversubscribed machine ``--threads 1`` gives far steadier numbers than the default
(OpenMP threads wait on each other when a core is taken by another process).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from distill.cache import EmbeddingCache, bytes_per_region
from distill.config import atomic_write
from distill.teacher import Teacher, build_teacher
from distill.teacher.dense import dense_stride

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = "configs/shapes/teacher/tiny_rn.json"
FLOORS = {"pipeline_over_bare": 0.85, "dense_over_crop": 20.0, "int8_cosine": 0.995}


# --------------------------------------------------------------------------- inputs


def make_images(n: int, height: int, width: int, seed: int) -> list[Tensor]:
    """n random-ish RGB images (3, H, W) uint8: smooth colour fields at two scales, fine
    noise and a few filled rectangles and ellipses, seeded."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(height, dtype=torch.float32),
                            torch.arange(width, dtype=torch.float32), indexing="ij")
    images = []
    for _ in range(n):
        img = torch.zeros(3, height, width)
        for cells, amp in (((3, 4), 60.0), ((12, 16), 25.0)):
            grid = torch.randn(1, 3, *cells, generator=g)
            img += amp * F.interpolate(grid, size=(height, width), mode="bicubic",
                                       align_corners=False)[0]
        img += 128 + 6 * torch.randn(3, height, width, generator=g)
        for _ in range(12):
            colour = torch.rand(3, 1, generator=g) * 255
            cx, cy = torch.rand(1, generator=g).item() * width, torch.rand(1, generator=g).item() * height
            rx = 10 + torch.rand(1, generator=g).item() * width / 5
            ry = 10 + torch.rand(1, generator=g).item() * height / 5
            if torch.rand(1, generator=g).item() < 0.5:
                mask = ((xx - cx).abs() < rx) & ((yy - cy).abs() < ry)
            else:
                mask = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
            img[:, mask] = colour
        images.append(img.clamp(0, 255).round().to(torch.uint8))
    return images


def make_boxes(n: int, height: int, width: int, gen: torch.Generator,
               min_side: float = 16.0) -> Tensor:
    """(n, 4) xyxy float32: width log-uniform in [min_side, W], aspect h/w log-uniform in
    [1/3, 3], centre uniform; clipped to the image (at least 4 px a side)."""
    u = torch.rand(n, 4, generator=gen)
    w = min_side * (width / min_side) ** u[:, 0]
    h = (w * 3.0 ** (2 * u[:, 1] - 1)).clamp(max=height)
    cx, cy = u[:, 2] * width, u[:, 3] * height
    x1 = (cx - w / 2).clamp(0, width - 4)
    y1 = (cy - h / 2).clamp(0, height - 4)
    x2 = torch.maximum((cx + w / 2).clamp(max=width), x1 + 4)
    y2 = torch.maximum((cy + h / 2).clamp(max=height), y1 + 4)
    return torch.stack([x1, y1, x2, y2], dim=1)


# --------------------------------------------------------------------------- timing


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Median wall seconds of ``repeat`` calls of ``fn`` (after the caller's warm-up)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def int8_cosines(embeddings: Tensor, counts: list[int], dim: int) -> dict[str, float]:
    """Write ``embeddings`` (N, D) float32 to fp16 and int8 stores, read back, and compare."""
    ref = F.normalize(embeddings.float(), dim=-1)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float16", "int8"):
            path = Path(tmp) / dtype
            plan = list(range(len(counts)))
            rows = ref.split(counts)
            with EmbeddingCache.create_or_open(path, plan, fingerprint="bench", dataset_id="bench",
                                               dim=dim, dtype=dtype) as writer:
                for i, emb in zip(plan, rows, strict=True):
                    writer.add(i, np.zeros((len(emb), 4), np.float32),
                               np.zeros(len(emb), np.float32), emb)
            cache = EmbeddingCache.open(path)
            back = torch.cat([torch.from_numpy(cache.get(i)["embeddings"]) for i in plan])
            cos = F.cosine_similarity(back, ref, dim=-1)
            out[f"{dtype}_cos_mean"] = cos.mean().item()
            out[f"{dtype}_cos_min"] = cos.min().item()
            out[f"{dtype}_store_bytes_per_region"] = cache.bytes_per_region
    return out


# --------------------------------------------------------------------------- one teacher


def bench_teacher(name: str, teacher: Teacher, images: list[Tensor], boxes: list[Tensor],
                  crop_boxes: int, repeat: int, log: Callable[[str], None],
                  dense_scale: float = 0.0) -> dict:
    """All measurements of one teacher; ``crop_boxes`` boxes per image in crop mode."""
    res: dict = {"teacher": name, "input_px": teacher.image_size[0], "embed_dim": teacher.embed_dim,
                 "visual_params_M": sum(p.numel() for p in teacher.model.visual.parameters()) / 1e6,
                 "batch_size": teacher.batch_size, "crop_scales": list(teacher.crop_scales),
                 "repeat": repeat}
    cboxes = [b[:crop_boxes] for b in boxes]
    n_crop_regions = sum(len(b) for b in cboxes)
    n_scales = len(teacher.crop_scales)
    res["crop_boxes_per_image"] = crop_boxes
    res["crop_regions"] = n_crop_regions
    res["crops"] = n_crop_regions * n_scales

    # warm-up: crop and dense paths on a few boxes, the encoder on 16 crops (a full batch of
    # ViT-B-32 would cost half a minute; the rounds below showed no first-call effect)
    log(f"[{name}] warm-up")
    t0 = time.perf_counter()
    teacher.regions(images[:1], [boxes[0][:4]], mode="crop")
    teacher.regions(images[:1], [boxes[0][:4]], mode="dense")
    with torch.inference_mode():
        stacked = teacher._stack(images)
        rois = teacher.crop_rois(images, cboxes)
        crops = teacher.crops(stacked, rois)  # pre-cut crops, the ones the pipeline encodes
        teacher.model.encode_image(crops[:16])
    res["warmup_s"] = time.perf_counter() - t0

    def bare():
        with torch.inference_mode():
            for c in crops.split(teacher.batch_size):
                teacher.model.encode_image(c)

    def cut():
        with torch.inference_mode():
            pyramid: dict = {}
            for r in rois.split(teacher.batch_size):
                teacher.crops(stacked, r, pyramid)

    crop_emb: list[Tensor] = []
    dense_emb: list[Tensor] = []

    def crop_pipeline():
        crop_emb[:] = teacher.regions(images, cboxes, mode="crop")

    def dense_pipeline():
        dense_emb[:] = teacher.regions(images, boxes, mode="dense")

    n_dense_regions = sum(len(b) for b in boxes)
    steps = {"bare": (bare, f"bare encode_image, {len(crops)} pre-cut crops"),
             "cut": (cut, f"crop cutting alone, {len(crops)} crops"),
             "crop": (crop_pipeline, f"crop pipeline, {n_crop_regions} boxes"),
             "dense": (dense_pipeline, f"dense regions, {n_dense_regions} boxes")}
    # rounds interleave the steps, so a change in the machine's load hits all of them alike
    times: dict[str, list[float]] = {k: [] for k in steps}
    for r in range(repeat):
        for key, (fn, what) in steps.items():
            times[key].append(timed(fn, 1))
            log(f"[{name}] round {r + 1}/{repeat}: {what}: {times[key][-1]:.2f} s")
    t_bare, t_cut, t_crop, t_dense = (statistics.median(times[k]) for k in steps)
    res["times_s"] = times
    h, w = images[0].shape[-2:]
    dh, dw = teacher.dense_size(h, w)
    sy, sx = dense_stride(teacher.model.visual)
    grid = (dh // sy, dw // sx)

    res.update({
        "bare_s": t_bare, "cut_s": t_cut, "crop_s": t_crop, "dense_s": t_dense,
        "bare_crops_per_s": len(crops) / t_bare,
        "cut_crops_per_s": len(crops) / t_cut,
        "crop_regions_per_s": n_crop_regions / t_crop,
        "crop_crops_per_s": n_crop_regions * n_scales / t_crop,
        "crop_other_s": t_crop - t_bare - t_cut,
        "dense_boxes_per_image": len(boxes[0]),
        "dense_regions": n_dense_regions,
        "dense_input": [dh, dw],
        "dense_grid": list(grid),
        "dense_regions_per_s": n_dense_regions / t_dense,
        "bytes_per_region_fp16": bytes_per_region(teacher.embed_dim, "float16"),
        "bytes_per_region_int8": bytes_per_region(teacher.embed_dim, "int8"),
    })
    res["pipeline_over_bare"] = res["crop_crops_per_s"] / res["bare_crops_per_s"]
    res["dense_over_crop"] = res["dense_regions_per_s"] / res["crop_regions_per_s"]
    res["cut_share_of_crop_pipeline"] = t_cut / t_crop
    # encoder + cutting alone, one after the other: the ratio the pipeline can reach at best
    res["pipeline_over_bare_from_parts"] = t_bare / (t_bare + t_cut)

    # int8 / fp16 store error on the teacher's own region embeddings (crop and dense mode)
    emb = torch.cat(crop_emb + dense_emb)
    counts = [len(e) for e in crop_emb + dense_emb]
    q = int8_cosines(emb, counts, teacher.embed_dim)
    assert q["int8_store_bytes_per_region"] == res["bytes_per_region_int8"]
    res["int8_cosine"] = q["int8_cos_mean"]
    res["int8_cosine_min"] = q["int8_cos_min"]
    res["fp16_cosine"] = q["float16_cos_mean"]
    res["int8_cosine_crop"] = int8_cosines(torch.cat(crop_emb), [len(e) for e in crop_emb],
                                           teacher.embed_dim)["int8_cos_mean"]
    res["int8_cosine_dense"] = int8_cosines(torch.cat(dense_emb), [len(e) for e in dense_emb],
                                            teacher.embed_dim)["int8_cos_mean"]
    if dense_scale > 0:  # diagnostic: dense mode on the same images and boxes, downscaled
        small = [F.interpolate(im[None].float(), scale_factor=dense_scale, mode="bilinear",
                               antialias=True, align_corners=False)[0].round().clamp(0, 255)
                 .to(torch.uint8) for im in images]
        sboxes = [b * dense_scale for b in boxes]
        teacher.regions(small[:1], [sboxes[0][:4]], mode="dense")
        log(f"[{name}] dense regions at x{dense_scale} ({small[0].shape[-1]}x{small[0].shape[-2]})")
        t_small = timed(lambda: teacher.regions(small, sboxes, mode="dense"), repeat)
        sh, sw = teacher.dense_size(*small[0].shape[-2:])
        res["dense_small"] = {"scale": dense_scale, "image": list(small[0].shape[-2:]),
                              "grid": [sh // sy, sw // sx], "s": t_small,
                              "regions_per_s": n_dense_regions / t_small,
                              "over_crop": n_dense_regions / t_small / res["crop_regions_per_s"]}
    res["floors"] = {k: {"value": res[k], "floor": f, "pass": bool(res[k] >= f)}
                     for k, f in FLOORS.items()}
    return res


# --------------------------------------------------------------------------- report


def _pf(res: dict, key: str) -> str:
    return "PASS" if res["floors"][key]["pass"] else "FAIL"


def table(results: list[dict]) -> str:
    rows: list[tuple[str, Callable[[dict], str], str]] = [
        ("input px / embed dim / visual params", lambda r: f"{r['input_px']} / {r['embed_dim']} / "
         f"{r['visual_params_M']:.1f} M", ""),
        ("boxes per image timed in crop mode", lambda r: f"{r['crop_boxes_per_image']} "
         f"({r['crops']} crops)", ""),
        ("bare `encode_image` on pre-cut crops (crops/s)", lambda r: f"{r['bare_crops_per_s']:.1f}", ""),
        ("crop pipeline (regions/s)", lambda r: f"{r['crop_regions_per_s']:.1f}", ""),
        ("crop pipeline (crops/s = regions/s x 2)", lambda r: f"{r['crop_crops_per_s']:.1f}", ""),
        ("**pipeline / bare** (crops/s)", lambda r: f"{r['pipeline_over_bare']:.2f} "
         f"{_pf(r, 'pipeline_over_bare')}", ">= 0.85"),
        ("  pipeline / bare from parts: bare / (bare + cut) time", lambda r:
         f"{r['pipeline_over_bare_from_parts']:.2f}", "diag."),
        ("  crop cutting alone (crops/s)", lambda r: f"{r['cut_crops_per_s']:.1f}", "diag."),
        ("  share of crop-pipeline time: cut / encode / rest", lambda r:
         f"{r['cut_s'] / r['crop_s']:.0%} / {r['bare_s'] / r['crop_s']:.0%} / "
         f"{r['crop_other_s'] / r['crop_s']:.0%}", "diag."),
        ("dense input -> grid", lambda r: f"{r['dense_input'][0]}x{r['dense_input'][1]} -> "
         f"{r['dense_grid'][0]}x{r['dense_grid'][1]}", ""),
        ("dense regions/s (all boxes/image)", lambda r: f"{r['dense_regions_per_s']:.1f} "
         f"({r['dense_boxes_per_image']}/image)", ""),
        ("**dense / crop** (regions/s)", lambda r: f"{r['dense_over_crop']:.1f} "
         f"{_pf(r, 'dense_over_crop')}", ">= 20"),
        ("  dense at downscaled image: size -> grid", lambda r: "-" if "dense_small" not in r else
         f"x{r['dense_small']['scale']:g}: {r['dense_small']['image'][1]}x"
         f"{r['dense_small']['image'][0]} -> {r['dense_small']['grid'][0]}x"
         f"{r['dense_small']['grid'][1]}", "diag."),
        ("  dense regions/s, dense / crop at that size", lambda r: "-" if "dense_small" not in r
         else f"{r['dense_small']['regions_per_s']:.1f}, {r['dense_small']['over_crop']:.1f}x",
         "diag."),
        ("bytes/region fp16", lambda r: f"{r['bytes_per_region_fp16']}", ""),
        ("bytes/region int8", lambda r: f"{r['bytes_per_region_int8']}", ""),
        ("**int8 mean cosine to fp32** (min)", lambda r: f"{r['int8_cosine']:.5f} "
         f"({r['int8_cosine_min']:.5f}) {_pf(r, 'int8_cosine')}", ">= 0.995"),
        ("  fp16 mean cosine (reference)", lambda r: f"{r['fp16_cosine']:.6f}", ""),
    ]
    head = "| metric | " + " | ".join(r["teacher"] for r in results) + " | floor |"
    sep = "|---|" + "---:|" * len(results) + "---|"
    lines = [head, sep]
    for label, fmt, floor in rows:
        lines.append(f"| {label} | " + " | ".join(fmt(r) for r in results) + f" | {floor} |")
    return "\n".join(lines)


def accuracy(config: str, refined: str | None, out: str | None) -> int:
    """Print (and write as JSON) the dense-vs-crop protocol for ``config``'s teacher and,
    with ``refined``, its refined variants."""
    import dataclasses

    from distill.config import load_config
    from distill.data.synthetic import generate_world
    from distill.teacher.pretrain import region_accuracy

    cfg = load_config(config)
    world = generate_world(cfg.world, progress=False)
    variants = {"as configured": cfg.teacher}
    if refined:
        variants["refined dense path (teacher.dense_pretrained)"] = dataclasses.replace(
            cfg.teacher, dense_pretrained=refined)
        variants["refined model (teacher.pretrained)"] = dataclasses.replace(
            cfg.teacher, pretrained=refined)
    rows = {}
    for name, tcfg in variants.items():
        teacher = Teacher.from_config(tcfg)
        rows[name] = {**region_accuracy(teacher, world),
                      "dense_input": list(teacher.dense_size(cfg.world.image_size,
                                                             cfg.world.image_size))}
    print(f"dense-vs-crop protocol, {config} (world seed {cfg.world.seed}, val):\n")
    print("| teacher | crop top-1 | dense top-1 | dense path on own crop (diag.) | "
          "crop-dense cosine | dense input |")
    print("|---|---:|---:|---:|---:|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['crop_top1']:.3f} | {r['dense_top1']:.3f} | "
              f"{r['dense_on_crop_top1']:.3f} | {r['cosine']:.3f} | {r['dense_input'][0]} px |")
    if out:
        atomic_write(out, json.dumps(rows, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2, help="images (default 2)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--boxes", type=int, default=300,
                   help="boxes per image: dense mode, and crop mode for the tiny teacher (300)")
    p.add_argument("--b32-crop-boxes", type=int, default=32,
                   help="the first N of those boxes per image time ViT-B-32's crop mode and bare "
                        "encoder (default 32: 2 images x 32 x 2 crops = 128 crops, one batch; "
                        "regions/s is per box, so fewer boxes only shorten the run)")
    p.add_argument("--tiny-crop-boxes", type=int, default=None,
                   help="same for the tiny teacher (default: all --boxes)")
    p.add_argument("--repeat", type=int, default=2,
                   help="timed rounds (bare, cut, crop, dense interleaved), median (ViT-B-32; 2)")
    p.add_argument("--tiny-repeat", type=int, default=3, help="same for the tiny teacher (3)")
    p.add_argument("--tiny-dense-scale", type=float, default=0.25,
                   help="diagnostic: also time the tiny teacher's dense mode on the images and "
                        "boxes scaled by this (0.25: 160x120, a 20x15 grid; 0 = off)")
    p.add_argument("--tiny-dense-side", type=int, default=160,
                   help="tiny teacher dense input short side (teacher.dense_short_side; the "
                        "shapes configs use 160, its world's image size)")
    p.add_argument("--tiny-config", default=TINY_CONFIG, help=f"tiny teacher JSON ({TINY_CONFIG})")
    p.add_argument("--batch-size", type=int, default=256, help="teacher batch_size (crops per call)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-b32", action="store_true", help="tiny teacher only (quick check)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--accuracy", default=None, metavar="CONFIG",
                   help="the dense-vs-crop accuracy protocol on this config's world instead")
    p.add_argument("--refined", default=None, help="with --accuracy: a refined teacher file")
    args = p.parse_args(argv)
    if args.accuracy:
        return accuracy(args.accuracy, args.refined, args.json)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "no pretrained weights" warning

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    tiny_cfg = Path(args.tiny_config)
    if not tiny_cfg.is_absolute() and not tiny_cfg.exists():
        tiny_cfg = ROOT / tiny_cfg
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    images = make_images(args.images, args.height, args.width, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    boxes = [make_boxes(args.boxes, args.height, args.width, gen) for _ in images]
    specs = [] if args.skip_b32 else [
        ("ViT-B-32", dict(model="ViT-B-32"), args.b32_crop_boxes, args.repeat, 0.0)]
    specs.append((tiny_cfg.stem, dict(model=tiny_cfg.stem, model_config=str(tiny_cfg),
                                      dense_short_side=args.tiny_dense_side),
                  args.tiny_crop_boxes or args.boxes, args.tiny_repeat, args.tiny_dense_scale))
    results = []
    for name, kw, crop_boxes, repeat, dense_scale in specs:
        torch.manual_seed(args.seed)
        teacher = build_teacher(pretrained=None, batch_size=args.batch_size, **kw)
        results.append(bench_teacher(name, teacher, images, boxes, min(crop_boxes, args.boxes),
                                     repeat, log, dense_scale))
        del teacher
    load_end = os.getloadavg()
    total = time.perf_counter() - t_start

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    settings = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/teacher.py"] + (argv if argv is not None else sys.argv[1:])),
        "images": args.images, "image_size": [args.height, args.width],
        "boxes_per_image": args.boxes,
        "box_sampling": "width log-uniform in [16, W] px, aspect log-uniform in [1/3, 3], "
                        "centre uniform, clipped",
        "crop_boxes_per_image": {r["teacher"]: r["crop_boxes_per_image"] for r in results},
        "repeat": {r["teacher"]: r["repeat"] for r in results}, "batch_size": args.batch_size, "seed": args.seed,
        "threads": torch.get_num_threads(), "cpu": cpu, "cpus": os.cpu_count(),
        "dtype": "float32", "weights": "random (pretrained=None)",
        "torch": torch.__version__, "loadavg_start": list(load_start),
        "loadavg_end": list(load_end), "total_s": total,
    }
    print(f"## Teacher benchmark ({settings['date']})\n")
    print(f"- command: `{settings['command']}`")
    print(f"- {args.images} images {args.width}x{args.height} (seeded random colour fields + "
          f"shapes), {args.boxes} seeded boxes/image ({settings['box_sampling']})")
    print("- crop mode timed on the first N boxes/image: " + ", ".join(
        f"{k} N={v}" for k, v in settings["crop_boxes_per_image"].items())
        + f"; dense mode on all {args.boxes}; crop scales 1x + 1.5x")
    print(f"- float32, random weights, batch_size {args.batch_size}, torch {torch.__version__}, "
          f"{settings['threads']} threads, {cpu} ({settings['cpus']} CPUs); median of "
          + ", ".join(f"{v} ({k})" for k, v in settings["repeat"].items())
          + " interleaved timed round(s) after a warm-up")
    print(f"- load average (1/5/15 min) at start {load_start[0]:.2f}/{load_start[1]:.2f}/"
          f"{load_start[2]:.2f}, at end {load_end[0]:.2f}/{load_end[1]:.2f}/{load_end[2]:.2f}; "
          f"total {total:.0f} s\n")
    print(table(results))
    fails = [(r["teacher"], k) for r in results for k, f in r["floors"].items() if not f["pass"]]
    print("\nfloors: " + ("all PASS" if not fails else
                          "FAIL " + ", ".join(f"{t}: {k}" for t, k in fails)))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.json, json.dumps({"settings": settings, "floors": FLOORS,
                                               "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
