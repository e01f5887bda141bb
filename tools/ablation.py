"""The ViLD ablation on the embedded world: every student and the teacher baseline, per seed.

    python -m tools.ablation [--config configs/shapes/pipeline.yaml] [--seeds 0 1]
                             [--results docs/results.md] [key=value ...]

For each world seed (``world.seed``): ViLD-text (whose RPN proposes for the
rest), proposals, the teacher's region cache, ViLD-image, ViLD, ViLD-ensemble,
and the teacher classifying the RPN's proposals (ViLD's "CLIP on cropped
regions"). The stages are the main job's (``tools/pipeline.py``): seed 0's
ViLD-text and ViLD are reused from it, and a rerun reuses everything.

Seeds run side by side, ``--jobs`` at a time (default: one per 1 CPU core, at most
one per seed), each process with cores / jobs threads: these small students are
bound by Python and per-image work, so two 1-thread runs on 2 cores train at about
the speed of one 2-thread run each (0.45-0.49 s against 0.43 s an iteration here).

Prints the table (box AP50 on novel / base / all classes of the val split,
generalized setting; inference images/s), the mean over seeds and each seed,
then the floors of the issue; writes ``output_dir/ablation.json`` and, with
``--results``, the table and the command into that markdown file (between the
``<!-- ablation -->`` markers, rest of the file kept).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from distill.config import atomic_write, save_config
from tools import cli, pipeline

METHODS = ["vild_text", "vild_image", "vild", "vild_ensemble", "teacher"]
MARK_BEGIN, MARK_END = "<!-- ablation -->", "<!-- /ablation -->"


def main(argv: list[str] | None = None) -> int:
    parser = cli.config_parser(__doc__.splitlines()[0], "configs/shapes/pipeline.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="world seeds (0 1)")
    parser.add_argument("--results", default=None,
                        help="markdown file to write the table into (e.g. docs/results.md)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="seeds run at once (default: min(seeds, CPU cores))")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    command = "python -m tools.ablation " + " ".join(argv if argv is not None else sys.argv[1:])
    return cli.run(lambda a: _run(a, command), args)


def mean_rows(per_seed: dict[int, dict[str, dict]]) -> dict[str, dict]:
    """Mean of every metric over the seeds, per method."""
    methods = next(iter(per_seed.values())).keys()
    return {m: {k: statistics.fmean(r[m][k] for r in per_seed.values())
                for k in ("AP50_novel", "AP50_base", "AP50_all", "AP", "images_per_s")}
            for m in methods}


def floors(mean: dict[str, dict], seconds: float) -> list[tuple[str, float, str, bool]]:
    """(what, value, floor, pass) for each floor of the ablation, on the means over seeds."""
    novel = {m: r["AP50_novel"] for m, r in mean.items()}
    speed = mean["vild"]["images_per_s"] / max(mean["teacher"]["images_per_s"], 1e-9)
    return [
        ("ViLD novel AP50 / ViLD-text novel AP50", novel["vild"] / max(novel["vild_text"], 1e-9),
         ">= 2", novel["vild"] >= 2 * novel["vild_text"]),
        ("ViLD-ensemble novel AP50 - ViLD novel AP50 (points)",
         100 * (novel["vild_ensemble"] - novel["vild"]), ">= 0",
         novel["vild_ensemble"] >= novel["vild"]),
        ("ViLD novel AP50 / teacher-on-proposals novel AP50",
         novel["vild"] / max(novel["teacher"], 1e-9), ">= 0.8",
         novel["vild"] >= 0.8 * novel["teacher"]),
        ("ViLD images/s / teacher-on-proposals images/s", speed, ">= 20", speed >= 20),
        ("ablation wall time (minutes)", seconds / 60, "<= 45", seconds <= 45 * 60),
    ]


def reused(per_seed: dict[int, dict[str, dict]]) -> list[str]:
    """``seed/method`` of every stage this run took from an earlier one."""
    return [f"{seed}/{m}" for seed, rows in per_seed.items() for m, r in rows.items()
            if r.get("reused")]


def report(per_seed: dict[int, dict[str, dict]], seconds: float, command: str) -> str:
    """The markdown section: mean table, per-seed tables, floors."""
    mean = mean_rows(per_seed)
    seeds = ", ".join(str(s) for s in per_seed)
    earlier = reused(per_seed)
    wall = f"wall time {seconds / 60:.1f} min on this machine"
    if earlier:
        wall += f", with {len(earlier)} stage(s) taken from earlier runs"
    lines = [f"Command: `{command}`", "",
             f"Box AP on the val split of the embedded world, generalized setting (all 16 "
             f"object classes in the vocabulary), mean over world seeds {seeds}; {wall}.",
             "", pipeline._table(mean), ""]
    if len(per_seed) > 1:
        for seed, rows in per_seed.items():
            lines += [f"World seed {seed}:", "", pipeline._table(rows), ""]
    lines += ["| floor | value | target | |", "|---|---:|---|---|"]
    for what, value, target, ok in floors(mean, seconds):
        verdict = "PASS" if ok else "FAIL"
        if what.startswith("ablation wall time") and earlier:
            verdict = "n/a: stages reused"
        lines.append(f"| {what} | {value:.2f} | {target} | {verdict} |")
    if earlier:
        lines += ["", f"Reused from earlier runs (their own time not counted above): "
                      f"{', '.join(earlier)}."]
    return "\n".join(lines) + "\n"


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
    one per core) in spawned processes of cores / jobs threads; progress bars only alone."""
    cores = os.cpu_count() or 1
    jobs = max(1, min(jobs or cores, len(overrides)))
    if jobs == 1:
        return [fn(o, out, progress) for o in overrides]
    print(f"running {len(overrides)} seeds, {jobs} at a time, {max(1, cores // jobs)} "
          f"thread(s) each")
    with ProcessPoolExecutor(jobs, multiprocessing.get_context("spawn"),
                             initializer=_set_threads, initargs=(max(1, cores // jobs),)) as pool:
        return list(pool.map(fn, overrides, [out] * len(overrides),
                             [False] * len(overrides)))


def _set_threads(n: int) -> None:
    """Worker set-up: ``n`` torch threads; lines reach a redirected stdout as printed."""
    import torch

    torch.set_num_threads(n)
    sys.stdout.reconfigure(line_buffering=True)


def _seed(overrides: list[str], out: Path, progress: bool) -> dict[str, dict]:
    """Every stage of one world seed (the last override names it)."""
    print(f"\n=== {overrides[-1]} ===", flush=True)
    return pipeline.run_world(overrides, out, progress, METHODS[:-1], teacher_baseline=True)


def _run(args, command: str) -> int:
    cfg = cli.load(args)
    progress = not args.no_progress
    out = Path(cfg.output_dir)
    save_config(cfg, out / "ablation_config.yaml")
    t = time.perf_counter()
    results = run_seeds(_seed, [[*args.overrides, f"world.seed={s}"] for s in args.seeds], out,
                        progress, args.jobs)
    seconds = time.perf_counter() - t
    per_seed = dict(zip(args.seeds, results, strict=True))
    seconds = time.perf_counter() - t
    section = report(per_seed, seconds, command)
    print("\n" + section)
    atomic_write(out / "ablation.json", json.dumps(
        {"command": command, "seconds": round(seconds, 1), "seeds": per_seed,
         "mean": mean_rows(per_seed)}, indent=2) + "\n")
    if args.results:
        write_section(Path(args.results), section)
        print(f"table written to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
