"""How closely a trained student reproduces its teacher, on the val split's boxes.

    python bench/distill_fidelity.py --run outputs/shapes/vild-<hash> [--images 120]
                                     [--teacher-checkpoint other.safetensors]

On the first ``--images`` val images (every class annotated, novel included):

- ground-truth boxes: top-1 class (over all val classes) of the teacher's crop
  embeddings and of the student's region embeddings (its image head for
  ViLD-ensemble), their mean cosine, and the student's background probability;
- the student's own RPN proposals (its 300 best): the teacher's top-1 on proposals
  with IoU >= 0.5 to an object (named by that object's class) and the probability
  mass the teacher puts on object classes (text embeddings of the object and the
  stuff classes, softmax at its own temperature) for proposals with IoU >= 0.5 and
  for background proposals (IoU < 0.3 to every object).

``--teacher-checkpoint`` scores another checkpoint of the same teacher model instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import box_iou

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from detectors.recipe import build_student  # noqa: E402
from distill.config import load_config  # noqa: E402
from distill.data.coco import CocoDetection, dataset_paths  # noqa: E402
from distill.data.vocab import STUFF_CLASSES  # noqa: E402
from distill.engine import load_weights  # noqa: E402
from distill.teacher import Teacher  # noqa: E402


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="training output directory of a student")
    p.add_argument("--images", type=int, default=120)
    p.add_argument("--teacher-checkpoint", default=None)
    a = p.parse_args(argv)
    cfg = load_config(Path(a.run) / "config.yaml")
    teacher_cfg = cfg.teacher if a.teacher_checkpoint is None else dataclasses.replace(
        cfg.teacher, pretrained=a.teacher_checkpoint)
    teacher = Teacher.from_config(teacher_cfg)
    student = build_student(cfg, Teacher.from_config(cfg.teacher)).eval()
    load_weights(student, Path(a.run) / "model_final.safetensors")
    val = CocoDetection(*dataset_paths(cfg, "val"))
    text = teacher.text(val.names)
    every = teacher.text([*val.names, *STUFF_CLASSES])  # object + stuff names
    temperature = 1 / teacher.model.logit_scale.exp().item()
    novel = torch.tensor([c.get("split") == "novel" for c in val.categories])
    student.set_vocabulary(text, novel)
    heads = student.roi_heads
    head = heads.image_head or heads.text_head
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in (
        "cos", "student_ok", "teacher_ok", "novel", "bg_prob", "prop_ok", "mass_fg", "mass_bg")}
    for i in range(min(a.images, len(val))):
        s = val[i]
        image, boxes, labels = s["image"], s["boxes"].float(), s["labels"] - 1
        if len(boxes) == 0:
            continue
        t = teacher.regions([image], [boxes])[0]
        image_list, _, original = student._prepare([image])
        features = student.backbone(image_list.tensors)
        pooled = heads.box_roi_pool(
            features, [resize_boxes(boxes, original[0], image_list.image_sizes[0])],
            image_list.image_sizes)
        e = head(pooled)[0]
        rows["cos"].append((e * t).sum(1))
        rows["student_ok"].append((e @ text.T).argmax(1) == labels)
        rows["teacher_ok"].append((t @ text.T).argmax(1) == labels)
        rows["novel"].append(novel[labels])
        rows["bg_prob"].append(heads.class_probs(heads.text_head(pooled)[0])[:, 0])
        proposals = student.propose([image])[0]["boxes"]
        iou, match = box_iou(proposals, boxes).max(1)
        te = teacher.regions([image], [proposals])[0]
        probs = torch.softmax(te @ every.T / temperature, dim=-1)
        fg, bg = iou >= 0.5, iou < 0.3
        rows["prop_ok"].append(((te @ text.T).argmax(1) == labels[match])[fg])
        rows["mass_fg"].append(probs[fg, :len(text)].sum(1))
        rows["mass_bg"].append(probs[bg, :len(text)].sum(1))
    r = {k: torch.cat(v).float() for k, v in rows.items()}
    nov = r["novel"].bool()
    print(f"run {a.run}; teacher {teacher_cfg.pretrained} ({teacher.fingerprint}); "
          f"{min(a.images, len(val))} val images")
    print("| on val ground-truth boxes | base | novel |\n|---|---:|---:|")
    print(f"| teacher top-1 | {r['teacher_ok'][~nov].mean():.3f} | {r['teacher_ok'][nov].mean():.3f} |")
    print(f"| student top-1 | {r['student_ok'][~nov].mean():.3f} | {r['student_ok'][nov].mean():.3f} |")
    print(f"| cosine student / teacher | {r['cos'][~nov].mean():.3f} | {r['cos'][nov].mean():.3f} |")
    print(f"| student background probability | {r['bg_prob'][~nov].mean():.3f} | "
          f"{r['bg_prob'][nov].mean():.3f} |")
    print(f"teacher on the student's proposals: top-1 {r['prop_ok'].mean():.3f} on "
          f"{len(r['prop_ok'])} proposals with IoU >= 0.5; object-class probability mass "
          f"{r['mass_fg'].mean():.3f} there, {r['mass_bg'].mean():.3f} on {len(r['mass_bg'])} "
          f"background proposals (IoU < 0.3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
