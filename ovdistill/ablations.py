"""The two ablations on the embedded world: experiments over the stages of
``ovdistill/stages.py``, per world seed, with their floors and their markdown.

The ViLD ablation (``tools/ablation.py``) runs every detection student and the teacher on
proposals per world seed; the segmentation ablation (``tools/seg_ablation.py``) three
student segmenters and the teacher. Seeds run side by side (:func:`run_seeds`); every stage
is the main job's kind, so a rerun reuses what is done.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from detectors.few_names import measure_run
from distill.config import ExperimentConfig, atomic_write, load_config, save_config
from ovdistill.export import SCORE_THRESHOLD
from ovdistill.report import LABELS, SEG_LABELS, pct, seg_table, table
from ovdistill.stages import CONFIGS, run_world, seg_stage

# the students on a scratch ResNet-10, then on the teacher's tower (all from the same cache)
METHODS = ["vild_text", "vild_image", "vild", "vild_ensemble", "vild_text_tower", "vild_tower",
           "vild_ensemble_tower", "baron_tower", "fvlm", "teacher"]
STUDENTS = {name: CONFIGS / "shapes" / f"{name}.yaml" for name in METHODS[:-1]}
SEG_STAGES = list(SEG_LABELS)  # configs/shapes/<name>.yaml, the teacher's zero-shot last
MARK_BEGIN, MARK_END = "<!-- ablation -->", "<!-- /ablation -->"
SEG_MARKS = ("<!-- seg-ablation -->", "<!-- /seg-ablation -->")
SEG_KEYS = ("mIoU_base", "mIoU_novel", "hIoU", "mIoU", "images_per_s", "mIoU_3names",
            "unnamed_painted_3names", "mIoU_3names_no_cut", "unnamed_painted_no_cut",
            "pixel_threshold")  # the 3-name figures: students only


# model.scoring -> rounds of 3-name vocabularies: the default in full; ViLD's softmax (the same
# weights) to compare with, one round (6 vocabularies; its generalized AP is the floor's)
FEW_NAMES_ROUNDS = {"reference": 3, "softmax": 1}


def few_names_stage(run: Path, progress: bool) -> dict[str, dict]:
    """detectors/few_names.py on a trained ViLD run, per scoring of ``FEW_NAMES_ROUNDS``, at
    0.3 and the exports' default score threshold, into ``run/eval/few_names.json`` (reused
    when it holds those cuts)."""
    path = run / "eval" / "few_names.json"
    cuts = sorted({0.3, SCORE_THRESHOLD})
    rows = json.loads(path.read_text()) if path.is_file() else {}
    for r in rows.values():  # JSON keys are strings
        for k in ("unnamed_per_image", "named_per_image"):
            r[k] = {float(t): v for t, v in r[k].items()}
    if set(rows) != set(FEW_NAMES_ROUNDS) or any(
            not set(cuts) <= set(r["unnamed_per_image"]) for r in rows.values()):
        rows = measure_run(run, FEW_NAMES_ROUNDS, cuts, progress=progress)
        atomic_write(path, json.dumps(rows, indent=2) + "\n")
    return rows


# --------------------------------------------------------------------------- the ViLD ablation


def mean_rows(per_seed: dict[int, dict[str, dict]]) -> dict[str, dict]:
    """Mean of every metric over the seeds, per method."""
    methods = next(iter(per_seed.values())).keys()
    return {m: {k: statistics.fmean(r[m][k] for r in per_seed.values())
                for k in ("AP50_novel", "AP50_base", "AP50_all", "AP", "images_per_s")}
            for m in methods}


def ablation_floors(mean: dict[str, dict], seconds: float,
                    per_seed: dict[int, dict[str, dict]] | None = None
                    ) -> list[tuple[str, float, str, bool]]:
    """(what, value, floor, pass) for each floor of the ablation (issue 23), on the means over
    seeds; ``per_seed``: the seeds' rows, for the floor that must hold on every seed."""
    novel = {m: r["AP50_novel"] for m, r in mean.items()}
    students = [m for m in mean if m != "teacher"]
    best = max(students, key=lambda m: novel[m])
    second = max(("vild_ensemble_tower", "fvlm"), key=lambda m: novel[m])
    gap = 100 * (novel["vild_tower"] - novel["vild_text_tower"])
    seeds = per_seed or {0: mean}
    every = min(100 * (r["vild_tower"]["AP50_novel"] - r["vild_text_tower"]["AP50_novel"])
                for r in seeds.values())
    speed = mean[best]["images_per_s"] / max(mean["teacher"]["images_per_s"], 1e-9)
    label = LABELS.get(best, best)
    return [
        (f"best student ({label}) novel AP50 / teacher-on-proposals novel AP50",
         novel[best] / max(novel["teacher"], 1e-9), ">= 0.9", novel[best] >= 0.9 * novel["teacher"]),
        ("ViLD on the tower - ViLD-text on the tower, novel AP50 (points), mean", gap, ">= 5",
         gap >= 5),
        ("ViLD on the tower - ViLD-text on the tower, novel AP50 (points), worst seed", every,
         "> 0", every > 0),
        ("ViLD-ensemble novel AP50 - ViLD novel AP50 (points), ResNet-10 students",
         100 * (novel["vild_ensemble"] - novel["vild"]), ">= 0",
         novel["vild_ensemble"] >= novel["vild"]),
        (f"{LABELS[second]} novel AP50 - ViLD on the tower novel AP50 (points)",
         100 * (novel[second] - novel["vild_tower"]), ">= 0",
         novel[second] >= novel["vild_tower"]),
        (f"best student ({label}) images/s / teacher-on-proposals images/s", speed, ">= 20",
         speed >= 20),
        ("ablation wall time (minutes)", seconds / 60, "<= 45", seconds <= 45 * 60),
    ]


def few_names_lines(few: dict[int, dict[str, dict]]) -> list[str]:
    """The ViLD student's scores with 3-name vocabularies (few_names_stage) per seed and
    scoring, as markdown lines."""
    cut = SCORE_THRESHOLD
    lines = [f"ViLD with random 3-name vocabularies (detectors/few_names.py: each class's AP50 "
             f"with every name and averaged over the 3-name vocabularies that name it; "
             f"detections per image scoring at least {cut:g}, the exports' default, on objects "
             f"of unnamed / of named classes), beside the generalized-setting AP50:", "",
             "| seed | scoring | novel AP50 | base AP50 | per-class AP50, all names | 3 names "
             f"| ratio | unnamed / named per image >= {cut:g} | unnamed per image >= 0.3 | "
             "vocabularies |", "|---|---|" + "---:|" * 8]
    for seed, rows in few.items():
        for scoring, r in rows.items():
            lines.append(
                f"| {seed} | {scoring} | {pct(r['AP50_novel'])} | {pct(r['AP50_base'])} | "
                f"{pct(r['all'])} | {pct(r['few'])} | {r['few_over_all']:.2f} | "
                f"{r['unnamed_per_image'][cut]:.2f} / {r['named_per_image'][cut]:.2f} | "
                f"{r['unnamed_per_image'][0.3]:.2f} | {r['subsets']} |")
    return lines + [""]


def few_names_floors(few: dict[int, dict[str, dict]]) -> list[tuple[str, float, str, bool]]:
    """Issue 25's floors on the means over seeds: the default scoring's 3-name / all-names
    AP50 >= 0.9 and <= 0.2 detections per image on unnamed objects at the default threshold;
    its generalized novel and base AP50 no lower than softmax's, within the seed spread (the
    range of softmax's over the seeds)."""
    def mean(scoring, key, cut=None):
        return statistics.fmean(r[scoring][key] if cut is None else r[scoring][key][cut]
                                for r in few.values())

    ratio = mean("reference", "few_over_all")
    unnamed = mean("reference", "unnamed_per_image", SCORE_THRESHOLD)
    rows = [("3-name AP50 / all-names AP50, per class (reference scoring)", ratio, ">= 0.9",
             ratio >= 0.9),
            (f"detections per image >= {SCORE_THRESHOLD:g} on unnamed objects, 3 names",
             unnamed, "<= 0.2", unnamed <= 0.2)]
    for key, group in (("AP50_novel", "novel"), ("AP50_base", "base")):
        soft = [r["softmax"][key] for r in few.values()]
        spread = max(soft) - min(soft)
        change = mean("reference", key) - statistics.fmean(soft)
        rows.append((f"generalized {group} AP50, reference - softmax (points)", 100 * change,
                     f">= -{100 * spread:.1f} (seed spread)", change >= -spread))
    return rows


def reused(per_seed: dict[int, dict[str, dict]]) -> list[str]:
    """``seed/method`` of every stage this run took from an earlier one."""
    return [f"{seed}/{m}" for seed, rows in per_seed.items() for m, r in rows.items()
            if r.get("reused")]


def ablation_report(per_seed: dict[int, dict[str, dict]], seconds: float, command: str) -> str:
    """The markdown section: mean table, per-seed tables, floors."""
    mean = mean_rows(per_seed)
    seeds = ", ".join(str(s) for s in per_seed)
    earlier = reused(per_seed)
    lines = [f"Command: `{command}`", "",
             f"Box AP on the val split of the embedded world, generalized setting (all 16 "
             f"object classes in the vocabulary), mean over world seeds {seeds}; "
             f"{wall_time(seconds, earlier)}.", ""]
    lines += seed_tables(mean, per_seed, table)
    few = {seed: rows["vild"]["few_names"] for seed, rows in per_seed.items()}
    lines += few_names_lines(few)
    lines += floor_lines(ablation_floors(mean, seconds, per_seed) + few_names_floors(few),
                          earlier)
    if earlier:
        lines += ["", f"Reused from earlier runs (their own time not counted above): "
                      f"{', '.join(earlier)}."]
    return "\n".join(lines) + "\n"


def wall_time(seconds: float, earlier: list[str]) -> str:
    wall = f"wall time {seconds / 60:.1f} min on this machine"
    if earlier:
        wall += f", with {len(earlier)} stage(s) taken from earlier runs"
    return wall


def seed_tables(mean: dict, per_seed: dict[int, dict], render) -> list[str]:
    """The mean table, then each seed's when there are several (markdown lines)."""
    lines = [render(mean), ""]
    if len(per_seed) > 1:
        for seed, rows in per_seed.items():
            lines += [f"World seed {seed}:", "", render(rows), ""]
    return lines


def floor_lines(floors: list[tuple[str, float, str, bool]], earlier: list[str]) -> list[str]:
    """The floors as a markdown table; a wall-time floor is n/a when stages were reused."""
    lines = ["| floor | value | target | |", "|---|---:|---|---|"]
    for what, value, target, ok in floors:
        verdict = "PASS" if ok else "FAIL"
        if "wall time" in what and earlier:
            verdict = "n/a: stages reused"
        lines.append(f"| {what} | {value:.2f} | {target} | {verdict} |")
    return lines


def write_section(path: Path, section: str, marks: tuple[str, str] = (MARK_BEGIN, MARK_END)
                  ) -> None:
    """Replace the text between the ``marks`` of ``path`` (appended when absent)."""
    begin, end = marks
    text = path.read_text() if path.is_file() else "# Results\n"
    block = f"{begin}\n{section}{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write(path, text)


def run_seeds(fn, overrides: list[list[str]], out: Path, progress: bool,
              jobs: int | None = None) -> list:
    """``fn(overrides_i, out, progress)`` for each seed's overrides, ``jobs`` at a time (default
    one per core) in spawned processes of cores / jobs threads; progress bars only alone. The
    processes end with this one, however it ends (:func:`_end_with`): a killed ablation
    leaves none training into its stage directories."""
    cores = os.cpu_count() or 1
    jobs = max(1, min(jobs or cores, len(overrides)))
    if jobs == 1:
        return [fn(o, out, progress) for o in overrides]
    print(f"running {len(overrides)} seeds, {jobs} at a time, {max(1, cores // jobs)} "
          f"thread(s) each")
    with ProcessPoolExecutor(jobs, multiprocessing.get_context("spawn"),
                             initializer=_set_threads,
                             initargs=(max(1, cores // jobs), os.getpid())) as pool:
        return list(pool.map(fn, overrides, [out] * len(overrides),
                             [False] * len(overrides)))


def _set_threads(n: int, parent: int | None = None) -> None:
    """Worker set-up: ``n`` torch threads; lines reach a redirected stdout as printed; the
    worker ends when process ``parent`` does (:func:`_end_with`)."""
    import torch

    torch.set_num_threads(n)
    sys.stdout.reconfigure(line_buffering=True)
    if parent is not None:
        threading.Thread(target=_end_with, args=(parent,), daemon=True).start()


def _end_with(parent: int, period: float = 1.0) -> None:
    """Exit this process once ``parent`` is gone (this process is handed to another parent):
    the executor's workers outlive a killed parent otherwise."""
    while os.getppid() == parent:
        time.sleep(period)
    os._exit(1)


def ablation_seed(overrides: list[str], out: Path, progress: bool) -> dict[str, dict]:
    """Every stage of one world seed (the last override names it)."""
    print(f"\n=== {overrides[-1]} ===", flush=True)

    def configure(stage: str, extra: list[str]) -> ExperimentConfig:
        return load_config(STUDENTS.get(stage, CONFIGS / "shapes" / "extract.yaml"),
                           [*overrides, *extra])

    rows = run_world(configure, out, progress, METHODS[:-1], teacher_baseline=True)
    rows["vild"]["few_names"] = few_names_stage(Path(rows["vild"]["run"]), progress)
    return rows


def ablation(cfg: ExperimentConfig, overrides: list[str], seeds: list[int], command: str,
             results: str | None = None, jobs: int | None = None, progress: bool = True) -> dict:
    """The ViLD ablation (``tools/ablation.py``) over world ``seeds``: prints the report, writes
    ``output_dir/ablation.json`` and, with ``results``, the report into that markdown file."""
    out = Path(cfg.output_dir)
    save_config(cfg, out / "ablation_config.yaml")
    t = time.perf_counter()
    rows = run_seeds(ablation_seed, [[*overrides, f"world.seed={s}"] for s in seeds], out,
                     progress, jobs)
    seconds = time.perf_counter() - t
    per_seed = dict(zip(seeds, rows, strict=True))
    section = ablation_report(per_seed, seconds, command)
    print("\n" + section)
    atomic_write(out / "ablation.json", json.dumps(
        {"command": command, "seconds": round(seconds, 1), "seeds": per_seed,
         "mean": mean_rows(per_seed)}, indent=2) + "\n")
    if results:
        write_section(Path(results), section)
        print(f"table written to {results}")
    return per_seed


# ------------------------------------------------------------------ the segmentation ablation


def seg_seed(overrides: list[str], root: Path, progress: bool) -> dict[str, dict]:
    return {name: seg_stage(name, overrides, root, progress) for name in SEG_STAGES}


def seg_floors(mean: dict[str, dict], seconds: float) -> list[tuple[str, float, str, bool]]:
    """Issue floors for each distilled student: novel mIoU >= 2x the base-only student's
    and >= the teacher's; the whole ablation <= 20 minutes."""
    b, t = (mean[k]["mIoU_novel"] for k in ("seg_supervised", "seg_teacher"))
    rows = []
    for name in ("seg_distill", "seg_distill_pseudo"):
        d = mean[name]["mIoU_novel"]
        ratio = d / b if b > 0 else (math.inf if d > 0 else 0.0)
        rows += [(f"{SEG_LABELS[name]}: novel mIoU / base-only novel mIoU", ratio, ">= 2",
                  d > 0 and d >= 2 * b),
                 (f"{SEG_LABELS[name]}: novel mIoU - teacher novel mIoU (points)", 100 * (d - t),
                  ">= 0", d >= t)]
    return rows + [("segmentation ablation wall time (minutes)", seconds / 60, "<= 20",
                    seconds <= 20 * 60)]


def seg_report(per_seed: dict[int, dict[str, dict]], seconds: float, command: str) -> str:
    mean = {n: {k: statistics.fmean(r[n][k] for r in per_seed.values()) for k in SEG_KEYS
                if all(k in r[n] for r in per_seed.values())} for n in SEG_STAGES}
    earlier = reused(per_seed)
    lines = [f"Command: `{command}`", "",
             f"mIoU on the val split of the embedded world (16 shapes, 4 of them novel, + 4 "
             f"stuff classes; every name in the vocabulary), mean over world seeds "
             f"{', '.join(map(str, per_seed))}; {wall_time(seconds, earlier)}.", ""]
    lines += seed_tables(mean, per_seed, seg_table)
    lines += floor_lines(seg_floors(mean, seconds), earlier)
    return "\n".join(lines) + "\n"


def seg_ablation(root: Path, overrides: list[str], seeds: list[int], command: str,
                 results: str | None = None, jobs: int | None = None,
                 progress: bool = True) -> dict:
    """The segmentation ablation (``tools/seg_ablation.py``) over world ``seeds`` in ``root``."""
    t = time.perf_counter()
    rows = run_seeds(seg_seed, [[*overrides, f"world.seed={s}"] for s in seeds], root,
                     progress, jobs)
    seconds = time.perf_counter() - t
    per_seed = dict(zip(seeds, rows, strict=True))
    section = seg_report(per_seed, seconds, command)
    print("\n" + section)
    atomic_write(root / "seg_ablation.json", json.dumps(
        {"command": command, "seconds": round(seconds, 1), "seeds": per_seed}, indent=2) + "\n")
    if results:
        write_section(Path(results), section, SEG_MARKS)
        print(f"table written to {results}")
    return per_seed
