"""What a multi-GPU run does, on this CPU: the OV-COCO pipeline (ViLD-text, proposals,
extraction, ViLD, evaluation) and the ADE20k segmenter under ``torchrun --nproc_per_node 2``
(gloo), on the fake datasets tree with real COCO's quirks (a zero-height box, a box past the
image, a crowd box, an image without annotations, a greyscale and a CMYK JPEG), then the
same weights evaluated in one process (tests/distributed_pipeline.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from distill.data.proposals import load_proposals
from tests.fake_datasets import add_quirks, fake_datasets

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "distributed_pipeline.py"
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict) -> str:
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory):
    """(output folder, datasets root, quirks added, torchrun's output) after the torchrun run
    and the one-process evaluation of its weights."""
    tmp = tmp_path_factory.mktemp("dist")
    root = tmp / "datasets"
    # 5 val images and 3 ADE val images: shards of unequal size (2 + 3, 1 + 2)
    fake_datasets(root, coco_images=(4, 5), ade_images=3)
    env = {**os.environ, "OVD_DATASETS": str(root), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    env.pop("DETECTRON2_DATASETS", None)
    out = tmp / "out"
    assert subprocess.run([sys.executable, "-m", "tools.make_ov_coco"], env=env, cwd=REPO,
                          capture_output=True).returncode == 0
    added = {}
    for split, name in (("train", "train2017_ov_base"), ("val", "val2017_ov_all")):
        path = root / f"coco/annotations/instances_{name}.json"
        instances = json.loads(path.read_text())
        added[split] = add_quirks(instances, root / f"coco/{split}2017")
        path.write_text(json.dumps(instances))
    log = _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(_free_port()), str(SCRIPT), str(out)], env)
    _run([sys.executable, str(SCRIPT), str(out), "--eval-only"], env)
    return out, root, added, log


def test_sharded_evaluation_equals_one_process(pipeline_runs):
    out, *_ = pipeline_runs
    sharded = json.loads((out / "torchrun.json").read_text())
    single = json.loads((out / "one_process.json").read_text())
    assert sharded.keys() == single.keys() == {"vild_text", "vild", "seg"}
    for run, metrics in sharded.items():
        assert metrics.keys() == single[run].keys()
        for key, value in metrics.items():
            if key != "images_per_s":
                assert value == pytest.approx(single[run][key], abs=1e-6, nan_ok=True), (run, key)
    assert {"AP50_novel", "AP50_base", "AP50_all"} <= set(sharded["vild"])
    assert {"mIoU", "pixel_threshold"} <= set(sharded["seg"])


def test_each_val_image_is_scored_once_and_one_set_of_files(pipeline_runs):
    """Each rank scored its own slice of the val images (together: each image once); the
    results rank 0 gathered are the one-process results, image for image and in the same
    order; the eval folders hold the same files, no rank writes its own."""
    out, root, *_ = pipeline_runs
    val = json.loads((root / "coco/annotations/instances_val2017_ov_all.json").read_text())
    ranks = [json.loads((out / f"scored_torchrun_rank{r}.json").read_text()) for r in (0, 1)]
    one = json.loads((out / "scored_one_process_rank0.json").read_text())
    for run in ("vild_text", "vild"):
        images = [sorted(set(r[run])) for r in ranks]
        assert images[0] and images[1] and not set(images[0]) & set(images[1])
        assert sorted(images[0] + images[1]) == sorted(im["id"] for im in val["images"])
        assert sorted(set(one[run])) == sorted(im["id"] for im in val["images"])
    # ADE's 3 val label maps: rank r takes [r * 3 // 2, (r + 1) * 3 // 2)
    assert [len(r["seg"]) for r in ranks] == [1, 2] and len(one["seg"]) == 3
    for run in ("vild_text", "vild"):
        sharded = json.loads((out / "runs" / run / "eval" / "results.json").read_text())
        single = json.loads((out / "one_process" / run / "eval" / "results.json").read_text())
        assert [(d["image_id"], d["category_id"]) for d in sharded] == \
            [(d["image_id"], d["category_id"]) for d in single]
        for a, b in zip(sharded, single, strict=True):
            assert a["score"] == pytest.approx(b["score"], abs=1e-6)
            assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-4)
        assert {d["image_id"] for d in sharded} <= {im["id"] for im in val["images"]}
        assert _files(out / "runs" / run / "eval") == _files(out / "one_process" / run / "eval")
    assert _files(out / "runs" / "maskclip_plus" / "eval") == \
        _files(out / "one_process" / "maskclip_plus" / "eval")
    # the cache keeps one index per writing rank by design (distill/cache.py); nothing else
    # carries a rank, and no temporary is left behind
    assert [f for f in _files(out) if ".tmp" in f] == []
    assert [f for f in _files(out / "runs") if "rank" in f] == []


def test_the_quirks_pass_every_stage(pipeline_runs):
    """No stage stopped on the quirks (``data.on_error=fail``); each said what it cleaned up;
    the proposals and the cache hold every train image once, the empty and CMYK ones too."""
    out, root, added, log = pipeline_runs
    assert "boxes of zero area dropped: 1" in log and "boxes clipped to their image: 1" in log
    train = json.loads((root / "coco/annotations/instances_train2017_ov_base.json").read_text())
    ids = [im["id"] for im in train["images"]]
    proposals = load_proposals(out / "runs" / "vild_text" / "proposals_train.safetensors")
    assert sorted(proposals) == sorted(ids)  # load_proposals refuses an id twice
    assert added["train"]["empty_image"] in ids and added["train"]["cmyk"] in ids
    stored = json.loads((out / "cache" / "coco_ov_train_rpn" / "extract_summary.json")
                        .read_text())
    assert stored["stored_images"] == len(ids) and stored["complete"]
