"""Evaluate a trained student on the val split (generalized setting: every class name).

    python -m tools.eval --config configs/shapes/vild.yaml [output_dir=...] [key=value ...]

Loads ``output_dir/model_final.safetensors`` (or the last checkpoint), writes the
COCO results JSON, ``metrics.json``, the per-class AP50 plot and ``summary.json``
to ``output_dir/eval``. Same as ``python -m tools.train --eval-only``.
"""

from __future__ import annotations

import sys

from tools import train


def main(argv: list[str] | None = None) -> int:
    return train.main(["--eval-only", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
