"""Train (or only evaluate) a ViLD-family student detector.

    python -m tools.train --config configs/shapes/vild.yaml [key=value ...] [--resume] [--eval-only]

The training vocabulary is the train split's base categories (``split`` tag not
"novel"); distillation targets (``loss.vild_image`` > 0) come from the cache
written by ``tools/extract.py`` (ViLD's offline recipe: no image encoder runs
during training; only the teacher's text encoder embeds the class names). The
final evaluation uses every category of the val split (generalized setting).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from detectors import ViLD, build_detector
from detectors.inference import evaluate_detector
from distill.cache import EmbeddingCache
from distill.config import ExperimentConfig, atomic_write, save_config
from distill.data.coco import CocoDetection, collate, dataset_id, dataset_paths
from distill.engine import final_weights, load_weights, train
from distill.losses import build_criterion
from distill.teacher import Teacher
from tools import cli


class DistillationSet(torch.utils.data.Dataset):
    """Training samples: image, targets in the base vocabulary, cached proposals + embeddings.

    ``distill_per_image`` > 0 draws that many of an image's cached proposals per
    step. Flips (p=0.5) and draws use the global torch RNG, which the engine
    checkpoints, so a resumed run sees the same samples.
    """

    def __init__(self, data: CocoDetection, cache: EmbeddingCache | None, flip: bool = True,
                 distill_per_image: int = 0):
        self.data, self.cache, self.flip = data, cache, flip
        self.distill_per_image = distill_per_image

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        s = self.data[i]
        image, boxes = s["image"], s["boxes"]
        distill = None
        if self.cache is not None:
            rec = self.cache.get(s["image_id"])
            distill = {"boxes": torch.as_tensor(rec["boxes"]),
                       "embeddings": torch.as_tensor(rec["embeddings"])}
            k = self.distill_per_image
            if 0 < k < len(distill["boxes"]):
                pick = torch.randperm(len(distill["boxes"]))[:k]
                distill = {key: v[pick] for key, v in distill.items()}
        if self.flip and torch.rand(()) < 0.5:
            w = image.shape[-1]
            image = image.flip(-1)
            boxes = _flip(boxes, w)
            if distill is not None:
                distill["boxes"] = _flip(distill["boxes"], w)
        return {"image": image, "target": {"boxes": boxes, "labels": s["labels"]},
                "distill": distill, "image_id": s["image_id"]}


def _flip(boxes: torch.Tensor, width: int) -> torch.Tensor:
    """boxes (N, 4) xyxy mirrored left-right in an image of ``width`` pixels."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)


def base_category_ids(data: CocoDetection) -> list[int]:
    return [int(c["id"]) for c in data.categories if c.get("split", "base") != "novel"]


def open_cache(cfg: ExperimentConfig, teacher: Teacher, instances: Path) -> EmbeddingCache:
    path = Path(cfg.cache.root) / cfg.cache.name
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"no embedding cache at {path}: run tools/extract.py with this "
                                "config first (or set loss.vild_image=0)")
    cache = EmbeddingCache.open(path, dataset_id=dataset_id(instances))
    if not cache.fingerprint.startswith(teacher.fingerprint):
        raise ValueError(f"cache {path} was written by another teacher ({cache.fingerprint[:16]}"
                         f"...), this config's teacher is {teacher.fingerprint}")
    if not cache.complete:
        raise ValueError(f"cache {path} is incomplete: rerun tools/extract.py to finish it")
    cache.verify()
    return cache


def build_student(cfg: ExperimentConfig, teacher: Teacher) -> ViLD:
    return build_detector(**dataclasses.asdict(cfg.model), embed_dim=teacher.embed_dim)


def evaluate(cfg: ExperimentConfig, model: ViLD, teacher: Teacher, out_dir: Path | None,
             progress: bool = True) -> dict[str, float]:
    """Generalized-setting box AP on the val split (all its categories in the vocabulary)."""
    val = CocoDetection(*dataset_paths(cfg, "val"))
    novel = [c.get("split") == "novel" for c in val.categories]
    return evaluate_detector(model, val, teacher.text(val.names), novel, out_dir,
                             progress=progress)


def main(argv: list[str] | None = None) -> int:
    parser = cli.config_parser(__doc__.splitlines()[0], "configs/shapes/vild.yaml")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--eval-only", action="store_true", help="evaluate the final weights")
    parser.add_argument("--no-progress", action="store_true")
    return cli.run(_run, parser.parse_args(argv))


def _run(args) -> int:
    cfg = cli.load(args)
    out = Path(cfg.output_dir)
    metrics = run(cfg, resume=args.resume, eval_only=args.eval_only,
                  progress=not args.no_progress)
    print(json.dumps(metrics, indent=2))
    print(f"results: {out / 'eval'}")
    return 0


def run(cfg: ExperimentConfig, resume: bool = False, eval_only: bool = False,
        progress: bool = True) -> dict[str, float]:
    """Train ``cfg`` (unless ``eval_only``), evaluate, write ``output_dir/eval``; returns metrics."""
    out = Path(cfg.output_dir)
    teacher = Teacher.from_config(cfg.teacher)
    model = build_student(cfg, teacher)
    if eval_only:
        load_weights(model, final_weights(out))
    else:
        save_config(cfg, out / "config.yaml")
        instances, images = dataset_paths(cfg, "train")
        probe = CocoDetection(instances, images)
        data = CocoDetection(instances, images, category_ids=base_category_ids(probe))
        if not data.categories:
            raise ValueError(f"{instances}: no base categories to train on")
        model.set_vocabulary(teacher.text(data.names))
        cache = open_cache(cfg, teacher, instances) if cfg.loss.vild_image > 0 else None
        criterion = build_criterion(**dataclasses.asdict(cfg.loss))

        def loss_fn(model, batch):
            distill = [b["distill"] for b in batch] if cache is not None else None
            outputs = model([b["image"] for b in batch], [b["target"] for b in batch], distill)
            return criterion(outputs)

        periodic = (lambda m: evaluate(cfg, m, teacher, None, False)) if cfg.train.eval_period else None
        train(model, loss_fn, DistillationSet(data, cache, distill_per_image=cfg.loss.distill_per_image), cfg.train, out, collate_fn=collate,
              evaluate=periodic, resume=resume, progress=progress)
    metrics = evaluate(cfg, model, teacher, out / "eval", progress)
    atomic_write(out / "eval" / "summary.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


if __name__ == "__main__":
    sys.exit(main())
