"""docs/reproduce.md's OV-COCO steps (ViLD-text, proposals, extraction, ViLD, evaluation) and
the ADE20k segmenter on the fake datasets tree ($OVD_DATASETS), one iteration each, for
tests/test_distributed.py. Run as

    torchrun --nproc_per_node 2 tests/distributed_pipeline.py OUT        # sharded
    python tests/distributed_pipeline.py OUT --eval-only                  # one process

The first trains and evaluates under torchrun; the second evaluates the weights the first
trained, in one process, into ``OUT/one_process``. Each writes its metrics to
``OUT/<mode>.json`` (rank 0) and, per rank, what that process scored in each run's
evaluations (``OUT/scored_<mode>_rank<r>.json``: the image id of each detection evaluator
``add``, -1 for each label map a segmentation evaluator took)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from detectors import recipe as detection  # noqa: E402
from distill.config import load_config  # noqa: E402
from distill.engine import get_rank  # noqa: E402
from distill.evaluation.coco import DetectionCollector  # noqa: E402
from distill.evaluation.sem_seg import SemSegEvaluator  # noqa: E402
from segmentors import recipe as segmentation  # noqa: E402
from tools import extract  # noqa: E402

TINY = [f"teacher.model_config={REPO / 'configs/shapes/teacher/tiny_vit.json'}",
        "teacher.model=tiny_vit", "teacher.pretrained=null", "teacher.device=cpu",
        "teacher.templates=simple", "train.device=cpu", "train.amp=false",
        "train.num_workers=0"]
# one iteration of one image per process, whatever the config's reference batch
ONE_STEP = ["train.max_iters=1", "train.batch_size=1", "train.reference_batch=0",
            "train.checkpoint_period=1", "train.schedule.warmup_iters=0",
            "train.schedule.steps=[]"]
DETECTOR = ["model.image_size=128", "model.fpn_channels=32", "model.hidden=64",
            "model.box_batch_size_per_image=32", "model.rpn_post_nms_top_n_test=20",
            "cache.num_proposals=20", "data.on_error=fail"]
SEGMENTER = ["seg.name=seg_r10_fpn", "seg.backbone_weights=null", "seg.fpn_channels=32",
             "seg.short_side=64", "seg.crop_size=72", "seg.window=64", "seg.stride=48"]


SCORED: list[int] = []  # what this process scored: image ids, or -1 per label map


def _counting(cls, key):
    add = cls.add

    def counted(self, first, *args, **kwargs):
        SCORED.append(key(first))
        return add(self, first, *args, **kwargs)

    cls.add = counted


_counting(DetectionCollector, int)
_counting(SemSegEvaluator, lambda pred: -1)


def main(out: Path, eval_only: bool) -> None:
    runs = out / "runs"
    common = [*TINY, *ONE_STEP, *DETECTOR, f"cache.root={out / 'cache'}",
              f"cache.proposals={runs / 'vild_text' / 'proposals_train.safetensors'}"]

    def cfg(name: str, *extra: str):
        return load_config(REPO / f"configs/{name}.yaml",
                           [*common, f"output_dir={runs / name.split('/')[1]}", *extra])

    metrics, scored = {}, {}

    def run(name, fn, *args, **kwargs):
        SCORED.clear()
        metrics[name] = fn(*args, **kwargs)
        scored[name] = list(SCORED)

    text, vild = cfg("coco_ov/vild_text"), cfg("coco_ov/vild")
    seg = cfg("ade20k/maskclip_plus", *SEGMENTER)
    if eval_only:  # the weights trained under torchrun, evaluated in one process elsewhere
        for c in (text, vild, seg):
            c.output_dir = str(out / "one_process" / Path(c.output_dir).name)
            (Path(c.output_dir)).mkdir(parents=True, exist_ok=True)
            os.link(runs / Path(c.output_dir).name / "model_final.safetensors",
                    Path(c.output_dir) / "model_final.safetensors")
        run("vild_text", detection.train, text, eval_only=True, progress=False)
        run("vild", detection.train, vild, eval_only=True, progress=False)
        run("seg", segmentation.train, seg, eval_only=True, progress=False)
    else:
        run("vild_text", detection.train, text, progress=False)
        detection.write_split_proposals(text, "train", progress=False)
        assert extract.main(["--config", str(REPO / "configs/coco_ov/extract.yaml"), *common,
                             f"output_dir={out / 'extract'}", "--no-progress"]) == 0
        run("vild", detection.train, vild, progress=False)
        run("seg", segmentation.train, seg, progress=False)
    name = "one_process" if eval_only else "torchrun"
    (out / f"scored_{name}_rank{get_rank()}.json").write_text(json.dumps(scored))
    if get_rank() == 0:
        (out / f"{name}.json").write_text(json.dumps(metrics, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), "--eval-only" in sys.argv[2:])
