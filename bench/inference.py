"""Inference speed: the exported student (PyTorch, ONNX Runtime) vs. the teacher on proposals.

    python bench/inference.py --run outputs/shapes/vild-<hash> [--images 60 --threads N]

Exports the run's student (with ONNX) to a temporary directory, then times, image
by image on the run's val images, in turn: the exported student's ``predict`` in
PyTorch, the same in ONNX Runtime, and ViLD's "teacher on cropped regions" (the
student's RPN proposes its 300 boxes, the teacher embeds their 1x + 1.5x crops).
One image per call, as a user's ``predict`` runs, at the export's score threshold
(every method post-processes only the class scores above it); medians per image.
Floor: exported student (PyTorch) >= 20x teacher-on-proposals images/s.
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
from detectors.predictor import as_image_tensor  # noqa: E402
from distill.config import load_config  # noqa: E402
from distill.data.coco import CocoDetection, dataset_paths  # noqa: E402
from distill.teacher import Teacher  # noqa: E402
from tools import export  # noqa: E402


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
        if export.main(["--run", a.run, "--output", f"{tmp}/student", "--onnx"]) != 0:
            return 1
        student = load_student(f"{tmp}/student")
        onnx = OnnxDetector(f"{tmp}/student", threads=torch.get_num_threads())
        teacher = Teacher.from_config(cfg.teacher)
        teach = teacher_on_proposals(student.model, teacher, student.vocabulary.embeddings,
                                     cfg.model.temperature)
        thresh = student.score_threshold

        def teacher(im):  # post-processed above the students' threshold, as theirs
            with student.model.scores_at_least(thresh):
                return teach([as_image_tensor(im)])

        runs = {"student (PyTorch)": lambda im: student.predict(im),
                "student (ONNX Runtime)": lambda im: onnx.predict(im),
                "teacher on proposals": teacher}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for fn in runs.values():  # warm-up
            fn(images[0])
        for im in images:
            for k, fn in runs.items():
                t = time.perf_counter()
                fn(im)
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    teacher_rate = 1 / med["teacher on proposals"]
    print(f"settings: {cfg.model.name} at {cfg.model.image_size} px, teacher {cfg.teacher.model}, "
          f"{len(images)} val images, one per call, threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.2f}")
    print("| method | ms / image (median) | images/s | x teacher on proposals |")
    print("|---|---:|---:|---:|")
    for k, s in med.items():
        print(f"| {k} | {1000 * s:.1f} | {1 / s:.1f} | {(1 / s) / teacher_rate:.1f} |")
    ratio = (1 / med["student (PyTorch)"]) / teacher_rate
    print(f"floor: exported student (PyTorch) / teacher on proposals = {ratio:.1f}x "
          f"{'PASS' if ratio >= 20 else 'FAIL'} (>= 20)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
