"""What a person reads after a run: pictures of detections and ``report.md`` with its PNGs.

    draw(image, found)                      # a PIL image with boxes, names and scores
    draw_val_pictures(export, val, out, 8)  # val images through an exported student
    write_report(out, summary)              # out/report.md + out/report/*.png
    table(rows), seg_table(rows)            # box AP / mIoU per method, as markdown

Novel names are drawn in magenta, training (base) names in cyan; the plots use
:mod:`distill.evaluation.plots`' colours (novel hatched). Every file is written atomically.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from distill.config import atomic_write
from distill.evaluation.plots import BASE_COLOR, NOVEL_COLOR, figure_png

NOVEL, BASE = (255, 0, 255), (0, 220, 255)
MASK_ALPHA = 0.45  # opacity of a mask's fill
CELL = 320  # side of a picture in the predictions grid, pixels
MAX_BARS = 40  # classes per panel of the per-class plot (the first, in val order)
LABELS = {"vild_text": "ViLD-text", "vild_image": "ViLD-image", "vild": "ViLD",
          "vild_ensemble": "ViLD-ensemble", "vild_text_tower": "ViLD-text on the tower",
          "vild_tower": "ViLD on the tower", "vild_ensemble_tower": "ViLD-ensemble on the tower",
          "baron_tower": "ViLD + BARON on the tower", "fvlm": "F-VLM (frozen tower, fused)",
          "teacher": "teacher on proposals"}  # detection stages and methods
SEG_LABELS = {"seg_supervised": "base-only student", "seg_distill": "pixel-distilled student",
              "seg_distill_pseudo": "pixel-distilled + pseudo-labels",
              "seg_teacher": "teacher (MaskCLIP, zero-shot)"}  # segmentation stages


def draw(image: Image.Image, found: dict) -> Image.Image:
    """A copy of ``image`` with each detection's box and ``name score`` drawn, over its mask
    (``found["masks"]`` (N, H, W) bool, when given) filled in the same colour."""
    image = image.convert("RGB")
    if len(found.get("masks", ())):
        pixels = np.asarray(image, dtype=np.float32).copy()
        for mask, novel in zip(found["masks"], found["novel"], strict=True):
            colour = np.asarray(NOVEL if novel else BASE, dtype=np.float32)
            pixels[mask] = (1 - MASK_ALPHA) * pixels[mask] + MASK_ALPHA * colour
        image = Image.fromarray(pixels.round().astype(np.uint8))
    pen = ImageDraw.Draw(image)
    for box, score, name, novel in zip(found["boxes"], found["scores"], found["names"],
                                       found["novel"], strict=True):
        colour = NOVEL if novel else BASE
        x0, y0, x1, y1 = (float(v) for v in box)
        pen.rectangle([x0, y0, x1, y1], outline=colour, width=2)
        label = f"{name} {score:.2f}"
        left, top, right, bottom = pen.textbbox((x0, y0), label)
        ty = max(0.0, y0 - (bottom - top) - 2)
        pen.rectangle([x0, ty, x0 + right - left + 2, ty + bottom - top + 2], fill=colour)
        pen.text((x0 + 1, ty), label, fill=(0, 0, 0))
    return image


def draw_label_map(image: Image.Image, found: dict) -> Image.Image:
    """``image`` with a segmenter's label map (``found``: ``labels`` (H, W) vocabulary
    indices, ``names``, ``novel``, ``present``) painted over it, unlabelled pixels left
    clear, and a legend of the names present (by area, novel ones marked "*") on the right."""
    from distill.evaluation.sem_seg import overlay, palette

    painted = overlay(np.asarray(image.convert("RGB")), found["labels"], found["names"],
                      found["novel"])
    colours = palette(len(found["names"]))
    index = {n: k for k, n in enumerate(found["names"])}
    pen = ImageDraw.Draw(painted)
    rows = [(index[n], n + (" *" if found["novel"][index[n]] else "")) for n in found["present"]]
    width = 16 + max([int(pen.textlength(text)) for _, text in rows] or [0]) + 8
    sheet = Image.new("RGB", (painted.width + width, max(painted.height, 14 * len(rows) + 4)),
                      (255, 255, 255))
    sheet.paste(painted, (0, 0))
    pen = ImageDraw.Draw(sheet)
    for row, (k, text) in enumerate(rows):
        x, y = painted.width + 4, 2 + 14 * row
        pen.rectangle([x, y, x + 10, y + 10], fill=tuple(int(c) for c in colours[k]))
        pen.text((x + 14, y), text, fill=(0, 0, 0))
    return sheet


def save_png(image: Image.Image, path: Path) -> Path:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write(path, buf.getvalue())
    return path


def draw_val_pictures(export: Path, val, out: Path, count: int) -> list[Path]:
    """The first ``count`` val images (those with a novel object first) through the exported
    student at its default score threshold, drawn into ``out/<stem>.png``; returns the paths."""
    from detectors import load_student

    if count <= 0:
        return []
    student = load_student(export)
    novel = {k + 1 for k, n in enumerate(val.novel) if n}
    order = sorted(range(len(val)), key=lambda i: not any(
        int(label) in novel for label in val.targets(i)["labels"]))
    paths = []
    for i in order[:count]:
        path = val.image_path(i)
        found = student.predict(path)
        with Image.open(path) as im:
            paths.append(save_png(draw(im, found), out / f"{path.stem}.png"))
    return paths


def grid(paths: list[Path], columns: int = 4, cell: int = CELL) -> Image.Image:
    """The pictures side by side, ``columns`` a row, each fitted into a ``cell`` square."""
    rows = max(1, math.ceil(len(paths) / columns))
    sheet = Image.new("RGB", (columns * cell, rows * cell), (255, 255, 255))
    for k, path in enumerate(paths):
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = cell / max(im.size)
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                           Image.Resampling.BILINEAR)
            sheet.paste(im, ((k % columns) * cell, (k // columns) * cell))
    return sheet


def training_curves(runs: dict[str, Path]) -> bytes:
    """Each run's logged losses (``metrics.jsonl``) against iterations, a panel a run."""
    fig = Figure(figsize=(5.5 * len(runs), 3.6))
    for k, (label, run) in enumerate(runs.items()):
        ax = fig.add_subplot(1, len(runs), k + 1)
        lines = (run / "metrics.jsonl").read_text().splitlines()
        records = [r for r in map(json.loads, lines) if "loss" in r]
        keys = ["loss", *sorted({key for r in records for key in r
                                 if key.startswith("loss_")})]
        for key in keys:
            points = [(r["iter"], r[key]) for r in records if key in r and r[key] > 0]
            if points:
                ax.plot(*zip(*points, strict=True), label=key, marker="o", markersize=2,
                        linewidth=2 if key == "loss" else 1)
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
        ax.set_title(label, fontsize=9)
        ax.legend(fontsize=7)
    return figure_png(fig)


def per_class_bars(per_class: dict[str, dict[str, float]], novel: set[str]) -> bytes:
    """AP50 per class, one bar per method side by side; base classes left, novel right (the
    first :data:`MAX_BARS` of each, in val order)."""
    groups = [("base classes", [c for c in next(iter(per_class.values())) if c not in novel]),
              ("novel classes", [c for c in next(iter(per_class.values())) if c in novel])]
    groups = [(title, names[:MAX_BARS]) for title, names in groups if names]
    fig = Figure(figsize=(6 * len(groups), max(2.5, 0.3 * max(len(n) for _, n in groups)
                                               * len(per_class) / 2 + 1.2)))
    width = 0.8 / len(per_class)
    for k, (title, names) in enumerate(groups):
        ax = fig.add_subplot(1, len(groups), k + 1)
        for m, (label, values) in enumerate(per_class.items()):
            y = [i + m * width for i in range(len(names))]
            colour = NOVEL_COLOR if title.startswith("novel") else BASE_COLOR
            ax.barh(y, [max(values.get(n, 0.0), 0.0) for n in names], height=width,
                    color=colour, alpha=1.0 - 0.55 * m / max(1, len(per_class) - 1),
                    hatch="//" if title.startswith("novel") else None, label=label)
        ax.set_yticks([i + 0.4 - width / 2 for i in range(len(names))], names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("AP50")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    return figure_png(fig)


def pct(value: float) -> str:
    """A metric in percent, one decimal; "-" for -1 (no ground truth to score)."""
    return "-" if value < 0 else f"{100 * value:.1f}"


def table(rows: dict[str, dict]) -> str:
    """Box AP per method: novel / base / all AP50 and AP (COCO-style metrics), or LVIS's
    APr / APc / APf and AP where the rows have no AP50 by group."""
    keys = ("AP50_novel", "AP50_base", "AP50_all", "AP")
    if not all("AP50_novel" in m for m in rows.values()):
        keys = ("APr", "APc", "APf", "AP")
    heads = [k.replace("AP50_", "") + " AP50" if k.startswith("AP50_") else k for k in keys]
    lines = [f"| method | {' | '.join(heads)} | images/s |", "|---|" + "---:|" * 5]
    for name, m in rows.items():
        lines.append(f"| {LABELS.get(name, name)} | {' | '.join(pct(m[k]) for k in keys)} | "
                     f"{m['images_per_s']:.1f} |")
    return "\n".join(lines)


def seg_table(rows: dict[str, dict]) -> str:
    """mIoU per method; for students, the 3-name figures (segmentors/few_names.py) with every
    pixel named and with the "none of these" cut chosen on val."""
    lines = ["| method | base mIoU | novel mIoU | harmonic | all mIoU | images/s | 3-name mIoU, "
             "no cut / cut | unnamed pixels painted, no cut / cut | cut |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in rows.items():
        few = "| - | - | - |"
        if "mIoU_3names" in m:
            few = (f"| {100 * m['mIoU_3names_no_cut']:.1f} / {100 * m['mIoU_3names']:.1f} | "
                   f"{100 * m['unnamed_painted_no_cut']:.0f} % / "
                   f"{100 * m['unnamed_painted_3names']:.0f} % | {m['pixel_threshold']:.1f} |")
        lines.append(f"| {SEG_LABELS[name]} | {100 * m['mIoU_base']:.1f} | "
                     f"{100 * m['mIoU_novel']:.1f} | {100 * m['hIoU']:.1f} | "
                     f"{100 * m['mIoU']:.1f} | {m['images_per_s']:.1f} {few}")
    return "\n".join(lines)


def write_report(out: Path, summary: dict) -> Path:
    """``out/report.md`` from the main job's ``summary`` (ovdistill/pipeline.py), with its
    PNGs in ``out/report/``: per-class AP50, training curves, val predictions."""
    figures = out / "report"
    data, students = summary["data"], summary["students"]
    novel = set(data["novel"])
    per_class = {}  # COCO-style evaluations only (LVIS's reports APr / APc / APf)
    for name, m in students.items():
        metrics = Path(m["eval"]) / "metrics.json"
        bbox = json.loads(metrics.read_text())["bbox"] if metrics.is_file() else {}
        if "per_class_AP50" in bbox:
            per_class[LABELS.get(name, name)] = bbox["per_class_AP50"]
    if per_class:
        atomic_write(figures / "per_class_ap50.png", per_class_bars(per_class, novel))
    runs = {LABELS.get(n, n): Path(m["run"]) for n, m in students.items() if "run" in m}
    atomic_write(figures / "training_curves.png", training_curves(runs))
    sheet = figures / "predictions.png"
    if summary["pictures"]:
        save_png(grid([Path(p) for p in summary["pictures"]]), sheet)

    text, distilled = students["vild_text"], students["vild"]
    novel_key, novel_label, base_key, base_label = (
        ("AP50_novel", "novel", "AP50_base", "base AP50") if "AP50_novel" in text
        else ("APr", "APr (novel: rare)", "APf", "APf (frequent)"))
    teacher = summary["teacher"]["zero_shot"]
    lines = [
        "# Run report", "",
        f"Config: `{summary['config']}`. Train: {data['train']['images']} images "
        f"(`{data['train']['instances']}`); val: {data['val']['images']} images "
        f"(`{data['val']['instances']}`).", "",
        f"- **Base classes** (trained on, {len(data['base'])}): {', '.join(data['base'])}",
        f"- **Novel classes** ({len(data['novel'])}, {data['novel_from']}): "
        f"{', '.join(data['novel']) or 'none: this run measures the base classes only'}"]
    if data["untrained"]:
        lines.append(f"- In the vocabulary, never annotated: {', '.join(data['untrained'])}")
    lines += [
        f"- Teacher: `{summary['teacher']['model']}` ({summary['teacher']['fingerprint']}), "
        f"zero-shot top-1 on val object crops: base {_share(teacher['top1_base'])}, "
        f"novel {_share(teacher['top1_novel'])}", "",
        "## Box AP on val (generalized setting: every val class named)", "",
        summary["table"], "",
        f"Retention: the text-only student (ViLD-text, plain fine-tuning on the base classes) "
        f"reaches {pct(text[novel_key])} {novel_label} / {pct(text[base_key])} {base_label}; "
        f"the distilled student (ViLD) {pct(distilled[novel_key])} / "
        f"{pct(distilled[base_key])}.", ""]
    if per_class:
        lines += ["![AP50 per class](report/per_class_ap50.png)", ""]
    lines += ["## Training", "", "![training curves](report/training_curves.png)", ""]
    if "seg_table" in summary:
        lines += ["## Segmentation mIoU on val", "", summary["seg_table"], ""]
    lines += ["## The exported student", "",
              f"`{summary['export']}`: `model.safetensors`, the vocabulary and its text "
              f"embeddings (`python -m tools.demo --student {summary['export']} --output demo "
              f"photo.jpg`). Val pictures through it at its default score threshold, novel "
              f"names in magenta, base names in cyan:", ""]
    if summary["pictures"]:
        lines += ["![val predictions](report/predictions.png)", ""]
    path = out / "report.md"
    atomic_write(path, "\n".join(lines))
    return path


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"
