"""The official LVIS evaluator, as the reference for tests and bench/eval.py only.

``lvis`` 0.5.3 (the ``dev`` extra; it needs ``opencv-python``) is what LVIS numbers are
defined by; the product evaluates with :class:`distill.evaluation.lvis.LVISEvaluator`
(faster-coco-eval) and never imports this module. Nothing here reuses code of that
evaluator, so the two stay independent computations.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def numpy_float_alias() -> Iterator[None]:
    """Provide ``np.float`` while the block runs.

    lvis 0.5.3's ``LVISEval.accumulate`` calls ``astype(dtype=np.float)``; the alias of
    the builtin ``float`` was removed in NumPy 1.24. It is set only if missing and
    removed again afterwards, so NumPy's namespace is left as found (not thread-safe
    against other code probing ``np.float`` at the same moment).
    """
    added = "float" not in np.__dict__
    if added:
        setattr(np, "float", float)  # noqa: B010
    try:
        yield
    finally:
        if added:
            delattr(np, "float")


@contextlib.contextmanager
def _lvis_quiet(verbose: bool) -> Iterator[None]:
    logger = logging.getLogger("lvis")
    level = logger.level
    with warnings.catch_warnings():
        # LVISResults calls the deprecated Logger.warn
        warnings.filterwarnings("ignore", message=".*warn.*deprecated", category=DeprecationWarning)
        if not verbose:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            logger.setLevel(level)


def _lvis() -> Any:
    try:
        import lvis  # calls logging.basicConfig, imports cv2
    except ImportError as e:
        raise ImportError("the official LVIS reference needs the dev extra: "
                          "pip install -e '.[dev]'") from e
    return lvis


def load_official_gt(path: str | Path, verbose: bool = False) -> Any:
    """``lvis.LVIS`` of an annotation json (note: ``LVISEval`` rewrites its mask polygons to
    RLE in place, so load one per segm evaluation when timing)."""
    lvis = _lvis()
    with _lvis_quiet(verbose):
        return lvis.LVIS(str(path))


def official_lvis_eval(gt: Any, results: list[dict], iou_type: str, max_dets: int = 300,
                       verbose: bool = False) -> dict[str, float]:
    """Metrics of the official ``LVISEval`` (evaluate, accumulate, summarize).

    gt: annotation json path or an ``lvis.LVIS``; results: COCO-format results (deep-copied:
    ``LVISResults`` adds keys); max_dets: ``LVISResults``' per-image cap. Returns
    ``LVISEval.get_results()`` as floats (AP, AP50, ..., APr, APc, APf, AR@300, ...).
    """
    lvis = _lvis()
    with _lvis_quiet(verbose), numpy_float_alias():
        if not isinstance(gt, lvis.LVIS):
            gt = lvis.LVIS(str(gt))
        if results:
            res = lvis.LVISResults(gt, copy.deepcopy(results), max_dets=max_dets)
        else:  # LVISResults indexes results[0]: the gt index without annotations instead
            res = lvis.LVISResults.__new__(lvis.LVISResults)
            res.logger = logging.getLogger("lvis.results")
            res.dataset = {**gt.dataset, "annotations": []}
            res._create_index()
        E = lvis.LVISEval(gt, res, iou_type=iou_type)
        E.run()
        if verbose:
            E.print_results()
    return {k: float(v) for k, v in E.get_results().items()}
