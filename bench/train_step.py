"""Time per training iteration: the ViLD student (cached embeddings) vs. torchvision Faster R-CNN.

    python bench/train_step.py [--model vild_r10_fpn --iters 10 --batch 4 --size 128
                                --roi-sampling-ratio 1 --proposals 32 --threads N]

Defaults are the embedded world's students (configs/shapes/base.yaml). Both models use
the same ResNet/FPN-64 backbone, input size, RPN, RoI pooler and RoI sampling;
the student adds the embedding head, the text classifier and the ViLD-image L1
on ``--proposals`` cached boxes per image (no teacher runs). Iterations alternate
between the two models so that machine load hits both alike; medians are reported.
Floor: student / Faster R-CNN <= 1.15.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.models.detection import FasterRCNN

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from detectors import build_detector  # noqa: E402
from detectors.criterion import DetectionCriterion  # noqa: E402
from distill.backbones import resnet_fpn  # noqa: E402


def batch(n: int, size: int, proposals: int, dim: int, g: torch.Generator):
    images = [torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
              for _ in range(n)]
    targets, distill = [], []
    for _ in range(n):
        xy = torch.rand(3, 2, generator=g) * (size - 64)
        wh = 24 + torch.rand(3, 2, generator=g) * 40
        targets.append({"boxes": torch.cat([xy, xy + wh], 1),
                        "labels": torch.randint(1, 13, (3,), generator=g)})
        pxy = torch.rand(proposals, 2, generator=g) * (size - 64)
        pwh = 16 + torch.rand(proposals, 2, generator=g) * 48
        distill.append({"boxes": torch.cat([pxy, pxy + pwh], 1),
                        "embeddings": F.normalize(torch.randn(proposals, dim, generator=g), dim=-1)})
    return images, targets, distill


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--model", default="vild_r10_fpn", choices=["vild_r10_fpn", "vild_r18_fpn"])
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--roi-sampling-ratio", type=int, default=1)
    p.add_argument("--proposals", type=int, default=32, help="cached proposals per image")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--rois", type=int, default=128, help="sampled RoIs per image")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dim = 128
    torch.manual_seed(0)
    student = build_detector(a.model, embed_dim=dim, image_size=a.size, hidden=a.hidden,
                             box_batch_size_per_image=a.rois,
                             roi_sampling_ratio=a.roi_sampling_ratio)
    depth = int(a.model.split("_r")[1].split("_")[0])
    student.set_vocabulary(F.normalize(torch.randn(12, dim), dim=-1))
    criterion = DetectionCriterion()
    # the same parts, with torchvision's own box head / predictor / losses
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    frcnn = FasterRCNN(resnet_fpn(depth, (2, 3, 4), 64, "gn"), num_classes=None,
                       min_size=a.size, max_size=a.size,
                       rpn_anchor_generator=student.rpn.anchor_generator,
                       box_roi_pool=student.roi_heads.box_roi_pool,
                       box_head=TwoMLPHead(64 * 49, a.hidden),
                       box_predictor=FastRCNNPredictor(a.hidden, 13),
                       box_batch_size_per_image=a.rois, box_positive_fraction=0.25,
                       rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=1000)
    opts = {m: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for m in (student, frcnn)}
    g = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {"vild": [], "frcnn": []}

    def step(name):
        images, targets, distill = batch(a.batch, a.size, a.proposals, dim, g)
        model = student if name == "vild" else frcnn
        model.train()
        t = time.perf_counter()
        if name == "vild":
            losses = criterion(student(images, targets, [d["boxes"] for d in distill]),
                               {"distill_targets": torch.cat([d["embeddings"] for d in distill])})
        else:
            losses = frcnn([im.float() / 255 for im in images], targets)
        loss = sum(losses.values())
        opts[model].zero_grad()
        loss.backward()
        opts[model].step()
        return time.perf_counter() - t

    for _ in range(2):  # warm-up
        step("vild"), step("frcnn")
    for _ in range(a.iters):
        for name in ("vild", "frcnn"):
            times[name].append(step(name))
    v, f = statistics.median(times["vild"]), statistics.median(times["frcnn"])
    ratio = v / f
    print(f"settings: {a.model}, batch {a.batch}, {a.size} px, {a.rois} RoIs/image (RoIAlign "
          f"sampling {a.roi_sampling_ratio}), {a.proposals} cached "
          f"proposals/image, hidden {a.hidden}, {a.iters} iterations each (alternating), "
          f"threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}")
    print("| model | s / iteration (median) |\n|---|---:|")
    print(f"| torchvision Faster R-CNN (R{depth}-FPN-64) | {f:.3f} |")
    print(f"| ViLD student + cached embeddings | {v:.3f} |")
    print(f"| ratio student / Faster R-CNN | {ratio:.2f} {'PASS' if ratio <= 1.15 else 'FAIL'} "
          "(floor <= 1.15) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
