"""What every tool shares: ``--config`` + ``key=value`` overrides, one-line errors."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from distill.config import ConfigError, load_config
from distill.engine import CheckpointError, NonFiniteLossError

REPO = Path(__file__).resolve().parents[1]

# Errors caused by the user's input: reported as one line (no traceback unless --debug).
USER_ERRORS = (ConfigError, CheckpointError, NonFiniteLossError, FileNotFoundError, ValueError)


def config_parser(description: str, default_config: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=str(REPO / default_config),
                   help=f"YAML experiment file (default: {default_config})")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.max_iters=100")
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
