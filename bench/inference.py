"""Inference speed: the exported student (PyTorch, ONNX Runtime) vs. the teacher on proposals.

    python bench/inference.py --run outputs/shapes/vild-<hash> [--images 60 --threads N]

Exports the run's student (with ONNX) to a temporary directory, then times, image
by image on the run's val images, in turn: the exported student's ``predict`` in
PyTorch, the same in ONNX Runtime, and ViLD's "teacher on cropped regions" (the
student's RPN proposes its 300 boxes, the teacher embeds their 1x + 1.5x crops).
One image per call, as a user's ``predict`` runs, at the export's score threshold
(every method post-processes only the class scores above it); medians per image.
Then each student scores the whole val split at the RoI heads' own threshold
(box AP50 on novel and base classes, every class in the vocabulary, as in
docs/results.md; the teacher's is the ablation's). Floor: exported student >= 20x
teacher-on-proposals images/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from detectors import load_student  # noqa: E402
from detectors.inference import teacher_on_proposals  # noqa: E402
from detectors.onnx import OnnxDetector  # noqa: E402
from distill.config import load_config  # noqa: E402
from distill.data.coco import CocoDetection, dataset_paths, is_novel  # noqa: E402
from distill.evaluation import OVCocoEvaluator  # noqa: E402
from distill.export import as_image_tensor  # noqa: E402
from distill.teacher import Teacher  # noqa: E402
from ovdistill.export import export_run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="training output directory of a ViLD student")
    p.add_argument("--images", type=int, default=60)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = load_config(Path(a.run) / "config.yaml")
    val = CocoDetection(*dataset_paths(cfg, "val"))
    images = [val.image_path(i) for i in range(min(a.images, len(val)))]  # read per call
    with tempfile.TemporaryDirectory() as tmp:
        export_run(a.run, f"{tmp}/student", onnx=True)
        student = load_student(f"{tmp}/student")
        onnx = OnnxDetector(f"{tmp}/student", threads=torch.get_num_threads())
        teacher = Teacher.from_config(cfg.teacher)
        teach = teacher_on_proposals(student.model, teacher, student.vocabulary.embeddings,
                                     teacher.temperature)
        thresh = student.score_threshold

        def teacher(im):  # post-processed above the students' threshold, as theirs
            with student.model.scores_at_least(thresh):
                return teach([as_image_tensor(im)])

        students = {"student (PyTorch)": student, "student (ONNX Runtime)": onnx}
        runs = {k: m.predict for k, m in students.items()} | {"teacher on proposals": teacher}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for fn in runs.values():  # warm-up
            fn(images[0])
        for im in images:
            for k, fn in runs.items():
                t = time.perf_counter()
                fn(im)
                times[k].append(time.perf_counter() - t)
        load = os.getloadavg()[0]
        ap = {k: box_ap50(m, val, student.model.roi_heads.score_thresh)
              for k, m in students.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    teacher_rate = 1 / med["teacher on proposals"]
    print(f"settings: {cfg.model.name} at {cfg.model.image_size} px, teacher {cfg.teacher.model}, "
          f"{len(images)} val images, one per call, threads {torch.get_num_threads()}, "
          f"load {load:.2f}; AP50 on all {len(val)} val images")
    print("| method | ms / image (median) | images/s | x teacher on proposals "
          "| novel AP50 | base AP50 |")
    print("|---|---:|---:|---:|---:|---:|")
    for k, s in med.items():
        novel, base = (f"{100 * ap[k][0]:.1f}", f"{100 * ap[k][1]:.1f}") if k in ap else ("", "")
        print(f"| {k} | {1000 * s:.1f} | {1 / s:.1f} | {(1 / s) / teacher_rate:.1f} "
              f"| {novel} | {base} |")
    for k in students:
        ratio = (1 / med[k]) / teacher_rate
        print(f"floor: exported {k} / teacher on proposals = {ratio:.1f}x "
              f"{'PASS' if ratio >= 20 else 'FAIL'} (>= 20)")
    return 0


def box_ap50(model, val: CocoDetection, threshold: float) -> tuple[float, float]:
    """(novel, base) box AP50 of ``model.predict`` over ``val``, every class competing."""
    ids = {c["name"]: int(c["id"]) for c in val.categories}
    evaluator = OVCocoEvaluator(val.instances_json, category_ids=ids.values(),
                                novel_category_ids=[int(c["id"]) for c in val.categories
                                                    if is_novel(c)])
    for i in range(len(val)):
        p = model.predict(val.image_path(i), score_threshold=threshold)
        evaluator.add(val.ids[i], p["boxes"], p["scores"], [ids[n] for n in p["names"]])
    m = evaluator.evaluate()["bbox"]
    return m["AP50_novel"], m["AP50_base"]


if __name__ == "__main__":
    sys.exit(main())
