"""The segmentation ablation on the embedded world: three students and the teacher, per seed.

    python -m tools.seg_ablation [--seeds 0 1] [--results docs/results.md] [--jobs N]
                                 [--output-dir outputs/shapes/seg] [key=value ...]

For each world seed (``world.seed``): the base-only student (``seg_supervised``),
the pixel-distilled one (``seg_distill``), pixel distillation + MaskCLIP+ pseudo-labels
(``seg_distill_pseudo``) and the teacher's own zero-shot segmentation
(``seg_teacher``). Each stage lives in ``output_dir/<name>-<hash of its config>``
and is reused by a rerun. Seeds run side by side as in ``tools/ablation.py``.

Prints and (``--results``) writes the table (mIoU on base / novel classes, their
harmonic mean, all-class mIoU, images/s on the val split, every class named)
and the floors: the pixel-distilled student's novel mIoU >= 2x the base-only
student's and >= the teacher's; the whole run <= 20 minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

from distill.config import atomic_write, load_config
from tools import ablation, cli, pipeline

STAGES = {"seg_supervised": "base-only student", "seg_distill": "pixel-distilled student",
          "seg_distill_pseudo": "pixel-distilled + pseudo-labels",
          "seg_teacher": "teacher (MaskCLIP, zero-shot)"}
MARKS = ("<!-- seg-ablation -->", "<!-- /seg-ablation -->")
KEYS = ("mIoU_base", "mIoU_novel", "hIoU", "mIoU", "images_per_s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--results", default=None, help="markdown file for the table")
    p.add_argument("--output-dir", default="outputs/shapes/seg")
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    args = p.parse_args(argv)
    command = "python -m tools.seg_ablation " + " ".join(argv if argv is not None else sys.argv[1:])
    return cli.run(lambda a: _run(a, command), args)


def stage(name: str, overrides: list[str], root: Path, progress: bool) -> dict:
    """Train and evaluate (or reuse) one stage; returns its metrics."""
    from tools import train_seg

    cfg = load_config(cli.REPO / f"configs/shapes/{name}.yaml", overrides)
    out = pipeline._stage_dir(root, name, cfg, unread=())
    summary = out / "eval" / "summary.json"
    if summary.is_file():
        print(f"{name}: reusing {out}", flush=True)
        return {**json.loads(summary.read_text()), "reused": True}
    import dataclasses

    cfg = dataclasses.replace(cfg, output_dir=str(out))
    t = time.perf_counter()
    if name == "seg_teacher":
        metrics = train_seg.teacher_baseline(cfg, progress)
    else:
        metrics = train_seg.run(cfg, resume=True, progress=progress)
    metrics["seconds"] = round(time.perf_counter() - t, 1)
    atomic_write(summary, json.dumps(metrics, indent=2) + "\n")
    print(f"{name} ({overrides[-1] if overrides else ''}): novel mIoU "
          f"{metrics['mIoU_novel']:.3f} in {metrics['seconds']:.0f} s", flush=True)
    return metrics


def _seed(overrides: list[str], root: Path, progress: bool) -> dict[str, dict]:
    return {name: stage(name, overrides, root, progress) for name in STAGES}


def table(rows: dict[str, dict]) -> str:
    lines = ["| method | base mIoU | novel mIoU | harmonic | all mIoU | images/s |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, m in rows.items():
        lines.append(f"| {STAGES[name]} | {100 * m['mIoU_base']:.1f} | "
                     f"{100 * m['mIoU_novel']:.1f} | {100 * m['hIoU']:.1f} | "
                     f"{100 * m['mIoU']:.1f} | {m['images_per_s']:.1f} |")
    return "\n".join(lines)


def floors(mean: dict[str, dict], seconds: float) -> list[tuple[str, float, str, bool]]:
    """Issue floors for each distilled student: novel mIoU >= 2x the base-only student's
    and >= the teacher's; the whole ablation <= 20 minutes."""
    b, t = (mean[k]["mIoU_novel"] for k in ("seg_supervised", "seg_teacher"))
    rows = []
    for name in ("seg_distill", "seg_distill_pseudo"):
        d = mean[name]["mIoU_novel"]
        ratio = d / b if b > 0 else (math.inf if d > 0 else 0.0)
        rows += [(f"{STAGES[name]}: novel mIoU / base-only novel mIoU", ratio, ">= 2",
                  d > 0 and d >= 2 * b),
                 (f"{STAGES[name]}: novel mIoU - teacher novel mIoU (points)", 100 * (d - t),
                  ">= 0", d >= t)]
    return rows + [("segmentation ablation wall time (minutes)", seconds / 60, "<= 20",
                    seconds <= 20 * 60)]


def report(per_seed: dict[int, dict[str, dict]], seconds: float, command: str) -> str:
    mean = {n: {k: statistics.fmean(r[n][k] for r in per_seed.values()) for k in KEYS}
            for n in STAGES}
    earlier = [f"{s}/{n}" for s, rows in per_seed.items() for n, r in rows.items()
               if r.get("reused")]
    wall = f"wall time {seconds / 60:.1f} min on this machine"
    if earlier:
        wall += f", with {len(earlier)} stage(s) taken from earlier runs"
    lines = [f"Command: `{command}`", "",
             f"mIoU on the val split of the embedded world (16 shapes, 4 of them novel, + 4 "
             f"stuff classes; every name in the vocabulary), mean over world seeds "
             f"{', '.join(map(str, per_seed))}; {wall}.", "", table(mean), ""]
    if len(per_seed) > 1:
        for s, rows in per_seed.items():
            lines += [f"World seed {s}:", "", table(rows), ""]
    lines += ["| floor | value | target | |", "|---|---:|---|---|"]
    for what, value, target, ok in floors(mean, seconds):
        verdict = "PASS" if ok else "FAIL"
        if what.startswith("segmentation ablation wall") and earlier:
            verdict = "n/a: stages reused"
        lines.append(f"| {what} | {value:.2f} | {target} | {verdict} |")
    return "\n".join(lines) + "\n"


def _run(args, command: str) -> int:
    root = Path(args.output_dir)
    progress = not args.no_progress
    t = time.perf_counter()
    results = ablation.run_seeds(_seed, [[*args.overrides, f"world.seed={s}"]
                                         for s in args.seeds], root, progress, args.jobs)
    seconds = time.perf_counter() - t
    per_seed = dict(zip(args.seeds, results, strict=True))
    section = report(per_seed, seconds, command)
    print("\n" + section)
    atomic_write(root / "seg_ablation.json", json.dumps(
        {"command": command, "seconds": round(seconds, 1), "seeds": per_seed}, indent=2) + "\n")
    if args.results:
        ablation.write_section(Path(args.results), section, MARKS)
        print(f"table written to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
