"""What every tool shares: ``--config`` + ``key=value`` overrides, one-line errors."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from distill.config import ConfigError, load_config, to_dict
from distill.engine import CheckpointError, NonFiniteLossError, last_checkpoint

REPO = Path(__file__).resolve().parents[1]

# Errors caused by the user's input or the machine (a missing file, a full disk, a read-only
# directory): reported as one line (no traceback unless --debug).
USER_ERRORS = (ConfigError, CheckpointError, NonFiniteLossError, OSError, ValueError)


def config_parser(description: str, default_config: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=str(REPO / default_config),
                   help=f"YAML experiment file (default: {default_config})")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides in order, e.g. train.max_iters=100, or YAML files "
                        "of overrides, e.g. configs/vild_r50_short.yaml")
    return p


def run(body: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Call ``body(args)``; user errors become ``error: <one line>`` and exit code 2."""
    try:
        return body(args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def load(args: argparse.Namespace):
    return load_config(args.config, args.overrides)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_rerun(cfg) -> None:
    """A training command rerun into its ``output_dir`` resumes from the last checkpoint;
    refuse (one line naming the first differing key) when that run had another config
    (``output_dir`` aside: a moved run continues)."""
    out = Path(cfg.output_dir)
    if last_checkpoint(out) is None or not (out / "config.yaml").is_file():
        return
    before, now = _flat(to_dict(load_config(out / "config.yaml"))), _flat(to_dict(cfg))
    for key in sorted((before.keys() | now.keys()) - {"output_dir"}):
        if before.get(key) != now.get(key):
            raise ConfigError(
                f"{out} holds a run of another config ({key}: {before.get(key)!r} there, "
                f"{now.get(key)!r} now): pass another output_dir, or delete "
                f"{out / 'checkpoints'} to start over")
