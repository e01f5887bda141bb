"""Runtime parity on other machines: the comparison rules of tests/parity.py, and the parity
tests rerun under the CPU kernel sets that other machines of this kind pick.

PyTorch chooses its CPU kernels at start-up (``ATEN_CPU_CAPABILITY``): a machine with
AVX-512 runs other reductions than one with AVX2 only, so a detection that sits on a
threshold may flip there and not here. Running the parity tests under each capability
(and, inside them, at 1 and 2 threads) makes such a test fail here first.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.parity import match_detections, threshold_between

REPO = Path(__file__).resolve().parents[1]
PARITY_TESTS = [
    "tests/test_export.py::test_onnx_runtime_matches_pytorch",
    "tests/test_masks.py::test_onnx_exports_the_mask_branch",
    "tests/test_segmentor.py::test_exported_segmenter_round_trip_onnx_and_no_open_clip",
    "tests/test_segmentor.py::"
    "test_clip_trunk_student_starts_from_the_teacher_and_exports_without_open_clip",
]


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_parity_tests_pass_under_another_cpu_capability(capability, tmp_path):
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp",
         str(tmp_path / "t"), *PARITY_TESTS], cwd=REPO, env=env, capture_output=True,
        text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "8 passed" in done.stdout  # 4 tests x 2 thread counts, none skipped


def _dets(*rows):
    """rows of (name, score, x0, y0, x1, y1) -> a predict-style dict."""
    return {"names": [r[0] for r in rows], "scores": np.array([r[1] for r in rows]),
            "boxes": np.array([r[2:] for r in rows], dtype=float).reshape(-1, 4)}


def test_unpaired_detections_are_allowed_on_a_boundary_only():
    a = ("cat", 0.9, 0, 0, 10, 10)
    b = ("dog", 0.5, 20, 20, 30, 30)
    same = _dets(a, b)
    assert match_detections(same, _dets(b, a)) == [(0, 1), (1, 0)]
    # a score 1e-7 under the threshold on one side only: allowed, but only at that threshold
    edge = ("cow", 0.3 - 1e-7, 40, 40, 50, 50)
    assert match_detections(same, _dets(a, b, edge), thresholds=[0.3]) == [(0, 0), (1, 1)]
    with pytest.raises(AssertionError, match=r"ref detection 2 \('cow'.*no counterpart"):
        match_detections(same, _dets(a, b, edge), thresholds=[0.2])
    # another name, a moved box or a score off by 1e-4 is no match
    for other in [("cat", 0.9, 0, 0, 10, 11), ("cat", 0.9001, 0, 0, 10, 10), ("cow",) + a[1:]]:
        with pytest.raises(AssertionError, match="no counterpart"):
            match_detections(same, _dets(other, b))
    # the top-2 cut: the lowest of three may be missing from a side that is full
    low = ("cow", 0.5 - 1e-7, 40, 40, 50, 50)
    assert len(match_detections(_dets(a, b, low), same, cap=2)) == 2
    with pytest.raises(AssertionError, match="no counterpart"):
        match_detections(_dets(a, b, low), same, cap=3)
    # NMS at 0.5: a box at IoU 0.5 with a better one of its class may go either way, and so
    # may one that ties the score of a box it overlaps more; a clear overlap of 0.6 may not
    # be dropped on one side only, nor a box of another class
    half = ("cat", 0.8, 0, 0, 10, 20 / 3)  # IoU with a = 0.667; below: IoU = 0.5
    at_nms = ("cat", 0.8, 0, 0, 10, 5)
    assert len(match_detections(_dets(a, at_nms), _dets(a), nms_thresh=0.5)) == 1
    tie = ("cat", 0.9 - 1e-7, 0, 0, 10, 20 / 3)
    assert len(match_detections(_dets(a, tie), _dets(a), nms_thresh=0.5)) == 1
    with pytest.raises(AssertionError, match="no counterpart"):
        match_detections(_dets(a, half), _dets(a), nms_thresh=0.5)
    with pytest.raises(AssertionError, match="no counterpart"):
        match_detections(_dets(a, ("dog",) + at_nms[1:]), _dets(a), nms_thresh=0.5)


def test_threshold_between_lies_in_a_gap():
    scores = [0.9, 0.5, 0.5 - 1e-7, 0.4, 0.1]
    cut = threshold_between(scores)
    assert min(abs(cut - s) for s in scores) > 1e-5
    assert cut == pytest.approx(0.45)  # the widest-enough gap nearest the middle
    with pytest.raises(AssertionError, match="no gap"):
        threshold_between([0.5, 0.5 + 1e-6])
