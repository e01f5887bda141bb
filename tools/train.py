"""Train (or only evaluate) a ViLD-family student detector.

    python -m tools.train --config configs/shapes/vild.yaml [key=value ...] [--eval-only]

The training vocabulary is the train split's base categories (``split`` tag not
"novel"); distillation targets (``loss.vild_image`` > 0) come from the cache
written by ``tools/extract.py`` (ViLD's offline recipe: no image encoder runs
during training; only the teacher's text encoder embeds the class names). The
final evaluation uses every category of the val split (generalized setting).

Rerunning the same command resumes from the last checkpoint in ``output_dir`` (a
killed run ends with the weights an uninterrupted one gets); a rerun with another
config into an ``output_dir`` that holds checkpoints is refused. With
``data.on_error=skip`` the records and images left out are listed in
``output_dir/skipped.json``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from detectors import ViLD, build_detector
from detectors.inference import evaluate_detector
from detectors.vild import hflip_target
from distill.cache import EmbeddingCache
from distill.config import ExperimentConfig, atomic_write, save_config
from distill.data.coco import CocoDetection, DatasetError, collate, dataset_id, dataset_paths
from distill.engine import final_weights, load_weights, seed_all, train
from distill.losses import build_criterion
from distill.teacher import Teacher
from tools import cli


class DistillationSet(torch.utils.data.Dataset):
    """Training samples: image, targets in the base vocabulary, cached proposals + embeddings.

    ``min_objectness`` > 0 keeps only the cached proposals whose RPN objectness is at
    least that; ``distill_per_image`` > 0 then draws that many of them per step. Flips
    (p=0.5) and draws use the global torch RNG, which the engine checkpoints, so a
    resumed run sees the same samples.
    """

    def __init__(self, data: CocoDetection, cache: EmbeddingCache | None, flip: bool = True,
                 distill_per_image: int = 0, min_objectness: float = 0.0):
        self.data, self.cache, self.flip = data, cache, flip
        self.distill_per_image, self.min_objectness = distill_per_image, min_objectness

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        s = self.data[i]
        image = s["image"]
        target = {k: s[k] for k in ("boxes", "labels", "masks") if k in s}
        distill = None
        if self.cache is not None:
            rec = self.cache.get(s["image_id"])
            distill = {"boxes": torch.as_tensor(rec["boxes"]),
                       "embeddings": torch.as_tensor(rec["embeddings"])}
            if self.min_objectness > 0:
                keep = torch.as_tensor(rec["scores"]) >= self.min_objectness
                distill = {key: v[keep] for key, v in distill.items()}
            k = self.distill_per_image
            if 0 < k < len(distill["boxes"]):
                pick = torch.randperm(len(distill["boxes"]))[:k]
                distill = {key: v[pick] for key, v in distill.items()}
        if self.flip and torch.rand(()) < 0.5:
            w = image.shape[-1]
            image = image.flip(-1)
            target = hflip_target(target, w)
            if distill is not None:
                distill = hflip_target(distill, w)
        return {"image": image, "target": target, "distill": distill, "image_id": s["image_id"]}


def open_cache(cfg: ExperimentConfig, teacher: Teacher, instances: Path) -> EmbeddingCache:
    path = Path(cfg.cache.root) / cfg.cache.name
    if not (path / "meta.json").is_file():
        raise FileNotFoundError(f"no embedding cache at {path}: run tools/extract.py with this "
                                "config first (cache.store_dense=true for segmenters)")
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


def check_names(data: CocoDetection, what: str = "categories") -> None:
    """The text classifier needs distinct class names: at least one, none repeated."""
    if not data.categories:
        raise DatasetError(f"{data.instances_json}: no {what} (an empty vocabulary)")
    seen: dict[str, int] = {}
    for c, name in zip(data.categories, data.names, strict=True):
        if name.lower() in seen:
            raise DatasetError(f"{data.instances_json}: categories {seen[name.lower()]} and "
                               f"{c['id']} are both named '{name}'")
        seen[name.lower()] = c["id"]


def val_set(cfg: ExperimentConfig) -> CocoDetection:
    val = CocoDetection(*dataset_paths(cfg, "val"), on_error=cfg.data.on_error)
    check_names(val)
    return val


def evaluate(cfg: ExperimentConfig, model: ViLD, teacher: Teacher, out_dir: Path | None,
             progress: bool = True, val: CocoDetection | None = None) -> dict[str, float]:
    """Generalized-setting box AP on the val split (all its categories in the vocabulary)."""
    val = val_set(cfg) if val is None else val
    novel = val.novel
    return evaluate_detector(model, val, teacher.text(val.names), novel, out_dir,
                             progress=progress)


def main(argv: list[str] | None = None) -> int:
    parser = cli.config_parser(__doc__.splitlines()[0], "configs/shapes/vild.yaml")
    parser.add_argument("--eval-only", action="store_true", help="evaluate the final weights")
    parser.add_argument("--no-progress", action="store_true")
    return cli.run(_run, parser.parse_args(argv))


def _run(args) -> int:
    cfg = cli.load(args)
    out = Path(cfg.output_dir)
    if not args.eval_only:
        cli.check_rerun(cfg)
    metrics = run(cfg, resume=True, eval_only=args.eval_only, progress=not args.no_progress)
    print(json.dumps(metrics, indent=2))
    print(f"results: {out / 'eval'}")
    return 0


def run(cfg: ExperimentConfig, resume: bool = False, eval_only: bool = False,
        progress: bool = True) -> dict[str, float]:
    """Train ``cfg`` (unless ``eval_only``), evaluate, write ``output_dir/eval``; returns metrics."""
    out = Path(cfg.output_dir)
    val = val_set(cfg)  # data problems fail before the teacher loads
    if not eval_only:
        instances, images = dataset_paths(cfg, "train")
        data = CocoDetection(instances, images, category_ids="base",
                             with_masks=cfg.model.mask_head, on_error=cfg.data.on_error)
        check_names(data, "base categories to train on")
        if not any(data.anns):
            raise DatasetError(f"{instances}: no annotations of the {len(data.names)} base "
                               f"categories to train on")
    teacher = Teacher.from_config(cfg.teacher)
    seed_all(cfg.train.seed)  # the initial weights: torch's own seed differs per process
    model = build_student(cfg, teacher)
    if eval_only:
        load_weights(model, final_weights(out))
    else:
        model.set_vocabulary(teacher.text(data.names))
        cache = open_cache(cfg, teacher, instances) if cfg.loss.vild_image > 0 else None
        save_config(cfg, out / "config.yaml")
        skipped = {"train": data.skipped, "val": val.skipped}
        if data.skipped or val.skipped:
            atomic_write(out / "skipped.json", json.dumps(skipped, indent=1) + "\n")
            print(f"data.on_error=skip: left out {len(data.skipped)} train and "
                  f"{len(val.skipped)} val records or images, listed in {out / 'skipped.json'}")
        criterion = build_criterion(**dataclasses.asdict(cfg.loss))

        def loss_fn(model, batch):
            distill = [b["distill"] for b in batch] if cache is not None else None
            outputs = model([b["image"] for b in batch], [b["target"] for b in batch], distill)
            return criterion(outputs)

        periodic = (lambda m: evaluate(cfg, m, teacher, None, False, val)) if cfg.train.eval_period else None
        samples = DistillationSet(data, cache, distill_per_image=cfg.loss.distill_per_image,
                                  min_objectness=cfg.loss.distill_min_objectness)
        train(model, loss_fn, samples, cfg.train, out, collate_fn=collate,
              evaluate=periodic, resume=resume, progress=progress)
    metrics = evaluate(cfg, model, teacher, out / "eval", progress, val)
    atomic_write(out / "eval" / "summary.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


if __name__ == "__main__":
    sys.exit(main())
