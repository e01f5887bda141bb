"""Train and test an mmdetection 3.x ViLD student built from detectors/mmdet (optional).

    python -m tools.train_mmdet configs/mmdet/vild_r10_fpn_shapes.py \\
        --ovd-config outputs/shapes/vild-<hash>/config.yaml [--work-dir DIR] \\
        [--cfg-options train_cfg.max_iters=100 ...] [--test-only]

``--ovd-config`` (the config.yaml of a native ViLD run: its world, teacher and embedding
cache) replaces every ``ovd_config`` in the mmdet config. mmengine's runner trains, then
tests with ``OVDCocoMetric`` (COCO-OV AP50 novel / base / all, generalized setting);
the metrics go to ``<work-dir>/metrics.json`` and the trained weights to
``<work-dir>/model_final.safetensors`` (what ``--test-only`` loads; mmengine's own
checkpoints there are pickles, which this tool never loads). Needs ``make mmdet``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from distill.config import atomic_write

from . import cli


def set_key(node, key: str, value):
    """Every ``key`` in nested dicts/lists of an mmengine config set to ``value``."""
    if isinstance(node, dict):
        for k in list(node):
            if k == key:
                node[k] = value
            else:
                set_key(node[k], key, value)
    elif isinstance(node, (list, tuple)):
        for v in node:
            set_key(v, key, value)


def build_config(config: str, ovd_config: str, work_dir: str | None, options: list[str]):
    from mmengine.config import Config, DictAction

    if not Path(config).is_file():
        raise FileNotFoundError(f"mmdet config {config} not found")
    if not Path(ovd_config).is_file():
        raise FileNotFoundError(f"--ovd-config {ovd_config} not found: give the config.yaml of "
                                "a native ViLD run (outputs/shapes/vild-*/config.yaml)")
    cfg = Config.fromfile(config)
    if options:
        parsed = argparse.Namespace()
        DictAction(option_strings=["--cfg-options"], dest="o")(None, parsed, options)
        cfg.merge_from_dict(parsed.o)
    set_key(cfg._cfg_dict, "ovd_config", str(ovd_config))
    cfg.work_dir = work_dir or str(Path("outputs/mmdet") / Path(config).stem)
    return cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", help="mmdet config (configs/mmdet/*.py)")
    p.add_argument("--ovd-config", required=True, help="a native ViLD run's config.yaml")
    p.add_argument("--work-dir", default=None)
    p.add_argument("--cfg-options", nargs="+", default=[], metavar="key=value")
    p.add_argument("--test-only", action="store_true",
                   help="test <work-dir>/model_final.safetensors")
    p.add_argument("--debug", action="store_true")
    return cli.run(_run, p.parse_args(argv))


def _run(args) -> int:
    try:
        from mmengine.runner import Runner
    except ImportError:
        raise OSError("mmengine/mmdet are not installed: run `make mmdet` first") from None
    from safetensors.torch import load_file, save_file

    cfg = build_config(args.config, args.ovd_config, args.work_dir, args.cfg_options)
    weights = Path(cfg.work_dir) / "model_final.safetensors"
    if args.test_only and not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: train first (without --test-only)")
    runner = Runner.from_cfg(cfg)
    if args.test_only:  # safetensors, never mmengine's pickled checkpoints
        runner.model.load_state_dict(load_file(weights))
    else:
        runner.train()
        tmp = weights.with_name(f".{weights.name}.tmp")
        save_file({k: v.contiguous() for k, v in runner.model.state_dict().items()}, str(tmp))
        tmp.replace(weights)
    metrics = runner.test()
    out = Path(cfg.work_dir) / "metrics.json"
    atomic_write(out, json.dumps({"config": args.config, "ovd_config": args.ovd_config,
                                  **{k: float(v) for k, v in metrics.items()}}, indent=2) + "\n")
    print(f"metrics written to {out}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
