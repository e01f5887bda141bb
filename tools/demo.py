"""Run an exported student on images (or folders) -> PNGs with its findings drawn + JSON.

    python -m tools.demo --student exported/vild --output demo/ photo.jpg more/ \\
                         [--vocabulary vocab/] [--score-threshold 0.3]

Each image is written to ``--output`` under its own name (as PNG) with the boxes
drawn, novel classes in magenta and training classes in cyan (a student with a mask
head also fills each detection's mask, semi-transparent, in its colour); every
detection goes to ``predictions.json`` (box xyxy pixels, score, name, novel, and
for masks ``mask``: COCO compressed RLE ``{"size": [H, W], "counts": str}``).
``--vocabulary`` takes a vocabulary directory written by
``tools/export.py --vocabulary-only`` (the student's own by default).
``--show-teacher`` draws, right of the student's result, ViLD's "teacher on cropped
regions" on the same image: the student's RPN proposes, the teacher recorded in the
export (its open_clip model and checkpoint, which must be at hand) names the crops.

An exported segmenter gets its label map painted over each image with a legend of the
names found (novel ones marked "*", unlabelled pixels left clear), the map itself as
``<stem>_labels.png`` (vocabulary indices), and in ``predictions.json`` each name found
with its share of the pixels.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from ovdistill.report import draw, save_png

from . import cli

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--student", required=True, help="exported student directory")
    p.add_argument("--output", required=True, help="directory for the PNGs and predictions.json")
    p.add_argument("--vocabulary", default=None, help="vocabulary directory (tools/export.py)")
    p.add_argument("--score-threshold", type=float, default=None,
                   help="minimum score (default: the export's)")
    p.add_argument("--show-teacher", action="store_true",
                   help="draw the teacher-on-proposals result beside the student's")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return cli.run(_run, p.parse_args(argv))


def image_paths(items: list[str]) -> list[Path]:
    """Files as given; folders expanded to their images (sorted)."""
    paths = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            paths += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"image not found: {p}")
    return paths


def teacher_predictor(student, score_threshold: float):
    """``predict(path) -> found`` of the teacher on the student's proposals (needs open_clip)."""
    from detectors.inference import teacher_on_proposals
    from distill.config import TeacherConfig
    from distill.export import as_image_tensor
    from distill.teacher import Teacher

    info = student.config.get("teacher", {})
    if "config" not in info:
        raise ValueError("this export records no teacher config: re-export it to use "
                         "--show-teacher")
    teacher = Teacher.from_config(TeacherConfig(**info["config"]))
    if teacher.fingerprint != info.get("fingerprint"):
        raise ValueError(f"teacher {teacher.fingerprint} is not the one the student was "
                         f"distilled from ({info.get('fingerprint')})")
    predict = teacher_on_proposals(student.model, teacher, student.vocabulary.embeddings,
                                   info.get("temperature", 0.01))

    def run(path) -> dict:
        with student.model.scores_at_least(score_threshold):
            det = predict([as_image_tensor(path)])[0]
        keep = det["scores"] >= score_threshold
        labels = (det["labels"][keep] - 1).tolist()
        vocab = student.vocabulary
        return {"boxes": det["boxes"][keep].numpy(), "scores": det["scores"][keep].numpy(),
                "names": [vocab.names[k] for k in labels],
                "novel": [bool(vocab.novel[k]) for k in labels]}

    return run


def _side_by_side(left, right):
    from PIL import Image

    both = Image.new("RGB", (left.width + right.width + 4, max(left.height, right.height)),
                     (255, 255, 255))
    both.paste(left, (0, 0))
    both.paste(right, (left.width + 4, 0))
    return both


def _run(args) -> int:
    from PIL import Image

    from detectors import load_student
    from distill.config import atomic_write

    if json.loads((Path(args.student) / "config.json").read_text()).get("task") == \
            "segmentation":
        return _segment(args)
    student = load_student(args.student)
    if args.vocabulary:
        student.set_vocabulary(args.vocabulary)
    threshold = student.score_threshold if args.score_threshold is None else args.score_threshold
    teacher = teacher_predictor(student, threshold) if args.show_teacher else None
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for path in tqdm(image_paths(args.images), desc="demo", disable=args.no_progress):
        found = student.predict(path, score_threshold=threshold)
        with Image.open(path) as im:
            drawn = draw(im, found)
            if teacher is not None:
                drawn = _side_by_side(drawn, draw(im, teacher(path)))
        save_png(drawn, out / f"{path.stem}.png")
        detections = [
            {"box": [round(float(v), 2) for v in b], "score": round(float(s), 4), "name": n,
             "novel": nv}
            for b, s, n, nv in zip(found["boxes"], found["scores"], found["names"],
                                   found["novel"], strict=True)]
        if "masks" in found:
            from distill.evaluation import encode_masks

            masks = found["masks"]
            for d, rle in zip(detections, encode_masks(masks, *masks.shape[1:]), strict=True):
                d["mask"] = rle
        records.append({"image": str(path), "detections": detections})
    atomic_write(out / "predictions.json", json.dumps(records, indent=2) + "\n")
    total = sum(len(r["detections"]) for r in records)
    print(f"{len(records)} images, {total} detections: {out}")
    return 0



def _segment(args) -> int:
    """An exported segmenter: each image's label map drawn over it with a legend
    (``<stem>.png``), the map itself (``<stem>_labels.png``: vocabulary indices, 255 for an
    unlabelled pixel or an index past 254), and per image the names found with their share
    of pixels; ``--score-threshold`` overrides the export's pixel threshold."""
    import numpy as np
    from PIL import Image

    from distill.config import atomic_write
    from ovdistill.report import draw_label_map
    from segmentors import load_student

    if args.show_teacher:
        raise ValueError("--show-teacher is for detection students")
    student = load_student(args.student)
    if args.vocabulary:
        student.set_vocabulary(args.vocabulary)
    out = Path(args.output)
    records = []
    for path in tqdm(image_paths(args.images), desc="demo", disable=args.no_progress):
        found = student.predict(path, threshold=args.score_threshold)
        with Image.open(path) as im:
            save_png(draw_label_map(im, found), out / f"{path.stem}.png")
        labels = found["labels"]
        save_png(Image.fromarray(np.where((labels < 0) | (labels > 254), 255,
                                          labels).astype(np.uint8)),
                 out / f"{path.stem}_labels.png")
        index = {n: k for k, n in enumerate(found["names"])}
        records.append({"image": str(path), "labels": str(out / f"{path.stem}_labels.png"),
                        "present": [{"name": n, "novel": bool(found["novel"][index[n]]),
                                     "share": round(float((labels == index[n]).mean()), 4)}
                                    for n in found["present"]]})
    atomic_write(out / "predictions.json", json.dumps(records, indent=2) + "\n")
    print(f"{len(records)} images segmented: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
