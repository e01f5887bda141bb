"""GPU smoke run of the real configs: a few training steps and a few inference images each.

    torchrun --nproc_per_node 1 bench/gpu_smoke.py [--device cuda] [--steps 6] [--images 4]
    python bench/gpu_smoke.py --tiny          # the same code at toy sizes on the CPU

For COCO-OV ViLD (``configs/coco_ov/vild.yaml``), LVIS ViLD (``configs/lvis/vild.yaml``) and
the MaskCLIP+ segmenters of ADE20k and PASCAL Context-59
(``configs/{ade20k,pascal_context}/maskclip_plus.yaml``), at the config's own
input size and batch, with randomly initialised teacher and student (nothing is downloaded)
and random pictures: ``--steps`` training steps through the engine (the batch moved to the
device, the model in DistributedDataParallel: a process group of one is made when the
script is not under torchrun; the configs' bf16 autocast and loader workers), then
``--images`` pictures through the trained student. For the detectors also: the sharded
evaluation (``detectors.inference.evaluate_detector`` on ``--images`` pictures per process
written as a COCO-format set: each rank predicts its share, rank 0 gathers and scores), and
the teacher's region embedding (ViLD's 1x + 1.5x crops of 32 boxes a picture) in float32
and under the config's ``teacher.amp_dtype`` autocast: regions/s of each and the lowest
cosine between them.
Prints seconds per training iteration (the median after the first), inference images/s and
peak device memory (``torch.cuda.max_memory_allocated``; on the CPU the process's peak RSS),
and writes them as JSON with ``--output``. The configs' schedules are run as written
(``train.reference_batch=0``: no scaling to this run's batch).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from detectors import recipe as detection  # noqa: E402
from detectors.criterion import DetectionCriterion  # noqa: E402
from distill import engine  # noqa: E402
from distill.config import load_config  # noqa: E402
from distill.data.coco import collate  # noqa: E402
from distill.data.semantic import IGNORE, collate_semantic  # noqa: E402
from distill.teacher import Teacher  # noqa: E402
from segmentors import recipe as segmentation  # noqa: E402
from segmentors.criterion import SegmentationCriterion  # noqa: E402
from segmentors.inference import segment_logits  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"coco_ov": "configs/coco_ov/vild.yaml", "lvis": "configs/lvis/vild.yaml",
           "ade20k": "configs/ade20k/maskclip_plus.yaml",
           "pascal_context": "configs/pascal_context/maskclip_plus.yaml"}
CLASSES = {"coco_ov": 48, "lvis": 866, "ade20k": 150,
           "pascal_context": 59}  # training vocabulary sizes
TEACHER_TINY = [f"teacher.model_config={REPO / 'configs/shapes/teacher/tiny_vit.json'}",
                "teacher.model=tiny_vit", "teacher.dense_short_side=0"]
TINY = {"detection": ["model.name=vild_r10_fpn", "model.norm=gn", "model.image_size=128",
                      "model.hidden=32", "model.box_batch_size_per_image=32",
                      "model.rpn_post_nms_top_n_test=50", "cache.num_proposals=16"],
        "segmentation": ["seg.name=seg_r10_fpn", "seg.norm=gn", "seg.short_side=96", "seg.crop_size=96",
                         "seg.window=96", "seg.stride=64"]}


class RandomDetection(torch.utils.data.Dataset):
    """``size`` x ``size`` random pictures with 5 boxes of ``classes`` (each with its box
    filled as its mask, for a student with a mask head: ``masks``) and ``proposals`` cached
    boxes with unit teacher embeddings: :class:`detectors.recipe.DistillationSet`'s samples."""

    def __init__(self, n, size, classes, proposals, dim, masks=False):
        self.n, self.size, self.classes, self.proposals, self.dim = n, size, classes, proposals, dim
        self.masks = masks

    def __len__(self):
        return self.n

    def _boxes(self, k, g):
        xy = torch.rand(k, 2, generator=g) * self.size * 0.7
        return torch.cat([xy, xy + 8 + torch.rand(k, 2, generator=g) * self.size * 0.3], 1)

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        image = torch.randint(0, 256, (3, self.size, self.size), dtype=torch.uint8, generator=g)
        target = {"boxes": self._boxes(5, g),
                  "labels": torch.randint(1, self.classes + 1, (5,), generator=g)}
        if self.masks:
            masks = torch.zeros(5, self.size, self.size, dtype=torch.uint8)
            for m, (x0, y0, x1, y1) in zip(masks, target["boxes"].long().tolist(), strict=True):
                m[y0:y1, x0:x1] = 1
            target["masks"] = masks
        distill = {"boxes": self._boxes(self.proposals, g),
                   "embeddings": F.normalize(torch.randn(self.proposals, self.dim, generator=g),
                                             dim=-1)}
        return {"image": image, "target": target, "distill": distill, "image_id": i}


class RandomSegmentation(torch.utils.data.Dataset):
    """``size``-square random crops with random labels of ``classes`` (some ignored)."""

    def __init__(self, n, size, classes):
        self.n, self.size, self.classes = n, size, classes

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        labels = torch.randint(0, self.classes, (self.size, self.size), generator=g)
        labels[: self.size // 8] = IGNORE
        return {"image": torch.randint(0, 256, (3, self.size, self.size), dtype=torch.uint8,
                                       generator=g), "labels": labels, "file_name": f"{i}.png"}


def _peak_memory(device: torch.device) -> float:
    """GiB: the device's peak allocation since the last reset, or the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _seconds_per_iter(out: Path) -> float:
    times = [json.loads(line)["time_per_iter"] for line in
             (out / "metrics.jsonl").read_text().splitlines() if "time_per_iter" in line]
    return statistics.median(times[1:] if len(times) > 1 else times)


def run(bench: str, device: str, steps: int, images: int, tiny: bool) -> dict:
    """One config: ``steps`` training steps and ``images`` inference pictures; the figures."""
    task = "segmentation" if bench in ("ade20k", "pascal_context") else "detection"
    overrides = ["teacher.pretrained=null", f"teacher.device={device}", f"train.device={device}",
                 f"train.max_iters={steps}", "train.log_period=1", "train.reference_batch=0",
                 f"train.checkpoint_period={steps}", "train.keep_checkpoints=1",
                 "train.schedule.warmup_iters=0",
                 # random student weights too: no ImageNet file needed
                 "model.backbone_weights=null", "seg.backbone_weights=null"]
    if engine.resolve_device(device).type != "cuda":
        overrides.append("train.amp=false")  # the configs' bf16 autocast is for CUDA
    if tiny:
        overrides += [*TEACHER_TINY, *TINY[task], "train.batch_size=2", "train.num_workers=0"]
    cfg = load_config(REPO / CONFIGS[bench], overrides)
    dev = engine.resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    teacher = Teacher.from_config(cfg.teacher)
    classes = CLASSES[bench]
    engine.seed_all(0)
    with tempfile.TemporaryDirectory() as tmp:
        if task == "detection":
            model = detection.build_student(cfg, teacher)
            model.set_vocabulary(F.normalize(torch.randn(classes, teacher.embed_dim), dim=-1))
            size = cfg.model.image_size
            data = RandomDetection(cfg.train.batch_size * steps, size, classes,
                                   cfg.cache.num_proposals, teacher.embed_dim,
                                   masks=cfg.model.mask_head)
            criterion = DetectionCriterion.from_config(cfg.loss)
            engine.train(model, detection.training_step(criterion, distill=True), data,
                         cfg.train, tmp, criterion=criterion, collate_fn=collate,
                         tensorboard=False, progress=False)
            pictures = [data[i]["image"].to(dev) for i in range(images)]

            def infer(picture):
                return model([picture])
        else:
            model = segmentation.build_student(cfg, teacher)
            text = F.normalize(torch.randn(classes, teacher.embed_dim, device=teacher.device),
                               dim=-1)
            model.set_vocabulary(text)
            size = cfg.seg.crop_size
            data = RandomSegmentation(cfg.train.batch_size * steps, size, classes)
            criterion = SegmentationCriterion.from_config(cfg.seg)
            engine.train(model, segmentation.training_step(criterion, teacher, text, cfg.seg),
                         data, cfg.train, tmp, criterion=criterion, collate_fn=collate_semantic,
                         tensorboard=False, progress=False)
            pictures = [torch.randint(0, 256, (1, 3, cfg.seg.short_side,
                                               cfg.seg.short_side * 4 // 3),
                                      dtype=torch.uint8).to(dev) for _ in range(images)]

            def infer(picture):
                return segment_logits(lambda x: model(x)["pixel_logits"], picture, 0,
                                      cfg.seg.window, cfg.seg.stride)
        seconds = _seconds_per_iter(Path(tmp))
    model.eval()
    with torch.no_grad():
        infer(pictures[0])  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t = time.perf_counter()
        for picture in pictures:
            infer(picture)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        per_s = len(pictures) / (time.perf_counter() - t)
    row = {"config": CONFIGS[bench], "device": str(dev), "input": size,
           "batch": cfg.train.batch_size, "s_per_iter": round(seconds, 4),
           "images_per_s": round(per_s, 2), "peak_memory_gib": round(_peak_memory(dev), 2),
           "memory": "max_memory_allocated" if dev.type == "cuda" else "peak RSS (process)",
           "ddp": torch.distributed.is_initialized()}
    if task == "detection":
        row.update(sharded_evaluation(model, teacher, data, images, classes))
        row.update(extraction_precision(teacher, [data[i]["image"] for i in range(images)]))
    return row


def sharded_evaluation(model, teacher, data, images: int, classes: int) -> dict:
    """``images`` pictures per process of ``data`` as a COCO-format val set (boxes, a box
    polygon each), evaluated by every rank on its share, gathered and scored on rank 0."""
    from PIL import Image

    from detectors.inference import evaluate_detector
    from distill.data.coco import CocoDetection

    n = images * engine.get_world_size()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        recs, anns = [], []
        for i in range(n):
            s = data[i % len(data)]
            h, w = s["image"].shape[-2:]
            Image.fromarray(s["image"].permute(1, 2, 0).numpy()).save(tmp / f"{i}.png")
            recs.append({"id": i + 1, "file_name": f"{i}.png", "height": h, "width": w})
            for b, c in zip(s["target"]["boxes"].tolist(), s["target"]["labels"].tolist(),
                            strict=True):
                x0, y0, x1, y1 = b
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": c,
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                             "iscrowd": 0, "segmentation": [[x0, y0, x1, y0, x1, y1, x0, y1]]})
        cats = [{"id": k + 1, "name": f"class {k}"} for k in range(classes)]
        if engine.get_rank() == 0:
            (tmp / "val.json").write_text(json.dumps({"images": recs, "annotations": anns,
                                                      "categories": cats}))
        engine.barrier()
        val = CocoDetection(tmp / "val.json", tmp)
        text = F.normalize(torch.randn(classes, teacher.embed_dim), dim=-1)
        t = time.perf_counter()
        metrics = evaluate_detector(model, val, text, [k % 4 == 0 for k in range(classes)],
                                    tmp / "eval", progress=False)
        seconds = time.perf_counter() - t
        engine.barrier()  # rank 0 has written its files before the folder goes
    return {"eval_images": n, "eval_images_per_s_total": round(n / seconds, 2),
            "eval_AP50_all": round(metrics.get("AP50_all", -1.0), 4)}


def extraction_precision(teacher, pictures: list[torch.Tensor], boxes: int = 32) -> dict:
    """The teacher's crop regions of ``pictures`` in float32 and under its ``amp_dtype``
    (on CUDA): regions/s of each and the lowest cosine between the two."""
    g = torch.Generator().manual_seed(0)
    h, w = pictures[0].shape[-2:]
    xy = [torch.rand(boxes, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
          for _ in pictures]
    rects = [torch.cat([p, p + 16 + torch.rand(boxes, 2, generator=g) * 0.3 * min(h, w)], 1)
             for p in xy]
    configured, out = teacher.amp_dtype, {}
    for name, dtype in (("fp32", None), ("amp", configured)):
        teacher.amp_dtype = dtype
        teacher.regions(pictures[:1], rects[:1])  # warm-up
        if teacher.device.type == "cuda":
            torch.cuda.synchronize(teacher.device)
        t = time.perf_counter()
        emb = torch.cat(teacher.regions(pictures, rects)).float().cpu()
        if teacher.device.type == "cuda":
            torch.cuda.synchronize(teacher.device)
        out[name] = (emb, len(emb) / (time.perf_counter() - t))
    teacher.amp_dtype = configured
    cosine = F.cosine_similarity(out["fp32"][0], out["amp"][0], dim=-1).min()
    return {"teacher_amp_dtype": configured if teacher.device.type == "cuda" else None,
            "regions_per_s_fp32": round(out["fp32"][1], 1),
            "regions_per_s_amp": round(out["amp"][1], 1),
            "regions_amp_min_cosine": round(float(cosine), 6)}


def _process_group(device: str) -> None:
    """A process group of one when not launched by torchrun, so the engine wraps in DDP."""
    if "RANK" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    engine.init_distributed(device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --tiny")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--tiny", action="store_true", help="toy sizes (the test suite's run)")
    p.add_argument("--output", default=None, help="JSON file for the rows")
    a = p.parse_args(argv)
    device = a.device or ("cpu" if a.tiny else "cuda")
    _process_group(device)
    rows = [run(bench, device, a.steps, a.images, a.tiny) for bench in a.configs]
    if engine.get_rank() == 0:
        print("| config | device | input | batch | s/iter | images/s | peak memory GiB | "
              "sharded eval images/s (all ranks) | teacher regions/s fp32 / amp | amp min "
              "cosine |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|")
        for r in rows:
            extra = (f"{r['eval_images_per_s_total']:.2f} | {r['regions_per_s_fp32']:.0f} / "
                     f"{r['regions_per_s_amp']:.0f} | {r['regions_amp_min_cosine']:.5f}"
                     if "eval_images" in r else "- | - | -")
            print(f"| {r['config']} | {r['device']} | {r['input']} | {r['batch']} | "
                  f"{r['s_per_iter']:.3f} | {r['images_per_s']:.2f} | "
                  f"{r['peak_memory_gib']:.2f} ({r['memory']}) | {extra} |")
        if a.output:
            Path(a.output).write_text(json.dumps(rows, indent=2) + "\n")
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
