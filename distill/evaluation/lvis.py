"""LVIS evaluation (federated protocol) on the ``lvis`` package.

Same interface as :class:`distill.evaluation.coco.OVCocoEvaluator`: :meth:`add` per
image, :meth:`evaluate`, :meth:`write`. ``LVISEval`` applies the federated rules
(detections of classes neither annotated nor listed in an image's
``neg_category_ids`` are dropped; unmatched detections of its
``not_exhaustive_category_ids`` are ignored); we keep the top-300 detections per image
by score (the LVIS limit, also ``LVISResults``' own ``max_dets``) and report AP, AP50,
AP75, APs/m/l, APr/APc/APf (and the package's AR@300 figures) for boxes and optionally
masks. Values are fractions; -1.0 means no ground truth in that group (e.g. no rare
class in the evaluated images).

Note: ``import lvis`` calls ``logging.basicConfig`` (a no-op if the root logger is
already configured); this module is imported lazily by ``distill.evaluation``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from lvis import LVIS, LVISEval, LVISResults

from distill.config import atomic_write
from distill.evaluation.coco import DetectionCollector
from distill.evaluation.plots import plot_groups

MAX_DETS_PER_IMAGE = 300


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


class LVISEvaluator(DetectionCollector):
    """LVIS evaluator. gt: LVIS annotation json path or a loaded ``LVIS``; iou_types:
    ("bbox",) or ("bbox", "segm"); verbose=True shows the package's log and summary."""

    def __init__(
        self,
        gt: str | Path | LVIS,
        iou_types: Sequence[str] = ("bbox",),
        max_dets_per_image: int = MAX_DETS_PER_IMAGE,
        verbose: bool = False,
    ) -> None:
        self.gt = gt if isinstance(gt, LVIS) else LVIS(str(gt))
        super().__init__(self.gt.imgs, self.gt.get_cat_ids(), iou_types, max_dets_per_image, verbose)

    @contextlib.contextmanager
    def _lvis_quiet(self) -> Iterator[None]:
        logger = logging.getLogger("lvis")
        level = logger.level
        with self._quiet(), warnings.catch_warnings():
            # LVISResults calls the deprecated Logger.warn
            warnings.filterwarnings("ignore", message=".*warn.*deprecated", category=DeprecationWarning)
            if not self.verbose:
                logger.setLevel(logging.ERROR)
            try:
                yield
            finally:
                logger.setLevel(level)

    def _lvis_results(self, results: list[dict]) -> LVISResults:
        if results:
            return LVISResults(self.gt, results, max_dets=self.max_dets_per_image)
        # LVISResults indexes results[0]; an empty result set is the gt index without annotations.
        res = LVISResults.__new__(LVISResults)
        res.logger = logging.getLogger("lvis.results")
        res.dataset = {**self.gt.dataset, "annotations": []}
        res._create_index()
        return res

    def run_lvis_eval(self, iou_type: str) -> LVISEval:
        """Run LVISEval (evaluate, accumulate, summarize) on the capped results."""
        with self._lvis_quiet(), numpy_float_alias():
            E = LVISEval(self.gt, self._lvis_results(self._results_for(iou_type)), iou_type=iou_type)
            E.run()
            if self.verbose:
                E.print_results()
        return E

    def evaluate(self) -> dict[str, dict[str, float]]:
        """{iou_type: {AP, AP50, AP75, APs, APm, APl, APr, APc, APf, AR@300, ARs@300, ...}}."""
        if self._metrics is None:
            self._metrics = {t: {k: float(v) for k, v in self.run_lvis_eval(t).get_results().items()}
                             for t in self.iou_types}
        return copy.deepcopy(self._metrics)

    def write(self, out_dir: str | Path, prefix: str = "") -> dict[str, Path]:
        """Write ``<prefix>results.json`` (capped COCO-format results), ``metrics.json`` and
        ``<prefix>AP_groups_<iou_type>.png`` to out_dir, each atomically.
        Returns {"results", "metrics", "plot_<iou_type>": path}."""
        out, metrics, paths = self._write_results(out_dir, prefix)
        for t in self.iou_types:
            paths[f"plot_{t}"] = out / f"{prefix}AP_groups_{t}.png"
            groups = {k: metrics[t][k] for k in ("AP", "APr", "APc", "APf", "AP50")}
            atomic_write(paths[f"plot_{t}"], plot_groups(
                groups, title=f"LVIS {t} AP by frequency group", ylabel=f"{'box' if t == 'bbox' else 'mask'} AP"))
        return paths
