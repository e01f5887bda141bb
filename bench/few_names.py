"""A trained detector with 3 names against every name, for each way of scoring names.

    python bench/few_names.py --run outputs/shapes/vild-<hash> [--thresholds 0.3 0.5] [--rounds 3]

For each ``model.scoring`` (reference, the default: each name against the background and
the training names; softmax: ViLD's, over [background, names]; pairwise: each name
against the background alone), on the run's val split: the generalized-setting
novel / base AP50 (every name), the per-class AP50 averaged over classes with every name
and with random 3-name vocabularies containing the class (detectors/few_names.py), their
ratio, and the detections per image at or above each of ``--thresholds`` on objects of
unnamed (and of named) classes with 3 names. Prints a table; ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from detectors.few_names import measure_run  # noqa: E402
from detectors.vild import SCORING  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, action="append", help="a trained run (repeatable)")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.5, 0.7, 0.9])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--scoring", nargs="+", default=list(SCORING), choices=SCORING,
                   help="model.scoring values to measure (default: each)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = []
    for run in args.run:
        for scoring, r in measure_run(run, dict.fromkeys(args.scoring, args.rounds),
                                      args.thresholds, progress=False).items():
            rows.append({"run": run, "scoring": scoring, **r})
            print(f"{run} {scoring}: novel {r['AP50_novel']:.3f} base {r['AP50_base']:.3f} "
                  f"all-names {r['all']:.3f} 3-names {r['few']:.3f} "
                  f"unnamed/img {r['unnamed_per_image']}", flush=True)
    cuts = " | ".join(f"unnamed / named >= {t:g}" for t in args.thresholds)
    print(f"\n| run | scoring | novel AP50 | base AP50 | per-class AP50, all names | 3 names | "
          f"ratio | {cuts} |\n|---|---|" + "---:|" * (5 + len(args.thresholds)))
    for r in rows:
        counts = " | ".join(f"{r['unnamed_per_image'][t]:.2f} / {r['named_per_image'][t]:.2f}"
                            for t in args.thresholds)
        print(f"| {Path(r['run']).name} | {r['scoring']} | {100 * r['AP50_novel']:.1f} | "
              f"{100 * r['AP50_base']:.1f} | {100 * r['all']:.1f} | {100 * r['few']:.1f} | "
              f"{r['few_over_all']:.2f} | {counts} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
