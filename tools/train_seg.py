"""Train (or only evaluate) a student segmenter; or score the teacher's own segmentation.

    python -m tools.train_seg --config configs/shapes/seg_distill.yaml [key=value ...]
                              [--eval-only] [--teacher-baseline]

Training classes are every class of the dataset; pixels of novel classes count as
unlabelled for the supervised loss (``seg.supervised``). The teacher's dense
(MaskCLIP) embeddings are computed online from each training batch, flips
included, for ``seg.pixel_distill`` (L1/cosine to them) and ``seg.pseudo_label``
(MaskCLIP+: the argmax of the teacher's dense text logits over every class name).
Evaluation: mIoU over the val split with every class name in the vocabulary
(base, novel, harmonic mean), written to ``output_dir/eval`` with a per-class plot
and overlays of the first predictions. ``--teacher-baseline`` scores the teacher
alone (dense embeddings vs. text, upsampled) into ``output_dir/eval``. Rerunning the
same command resumes from the last checkpoint, as tools/train.py does.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from distill.config import ConfigError, ExperimentConfig, atomic_write, save_config
from distill.data.coco import dataset_paths, read_instances
from distill.data.semantic import SemanticDataset, ade20k, collate_semantic, synthetic_semantic
from distill.engine import final_weights, load_weights, seed_all, train
from distill.evaluation.sem_seg import SemSegEvaluator, overlay
from distill.losses import DEFAULT_WEIGHTS, Criterion
from distill.teacher import Teacher
from distill.teacher.dense import refine_logits
from segmentors import PixelEmbeddingSegmenter, build_segmenter
from segmentors.clip_trunk import load_tower, tower_shape
from segmentors.inference import random_resize_crop, segment_logits
from tools import cli

OVERLAYS = 6  # val images drawn with their predictions


def main(argv: list[str] | None = None) -> int:
    parser = cli.config_parser(__doc__.splitlines()[0], "configs/shapes/seg_distill.yaml")
    parser.add_argument("--eval-only", action="store_true", help="evaluate the final weights")
    parser.add_argument("--teacher-baseline", action="store_true",
                        help="score the teacher's own dense segmentation instead")
    parser.add_argument("--no-progress", action="store_true")
    return cli.run(_run, parser.parse_args(argv))


def datasets(cfg: ExperimentConfig) -> tuple[SemanticDataset, SemanticDataset]:
    """(train, val): ADE20k under ``seg.data_root`` (or the datasets root with
    ``data.benchmark: ade20k``), else the synthetic world."""
    root = cfg.seg.data_root
    if root is None and cfg.data.benchmark is not None:
        from distill.data.roots import ade20k_root

        if cfg.data.benchmark != "ade20k":
            raise ConfigError(f"data.benchmark: {cfg.data.benchmark!r} is a detection benchmark;"
                              " segmenters train on 'ade20k'")
        root = ade20k_root()
    if root:
        return ade20k(root, "training"), ade20k(root, "validation")
    from distill.data.synthetic import generate_world

    world = generate_world(cfg.world, progress=False)
    return synthetic_semantic(world, "train"), synthetic_semantic(world, "val")


def student_kwargs(cfg: ExperimentConfig, teacher: Teacher) -> dict:
    """``build_segmenter``'s arguments for ``cfg.seg`` (the export's ``model`` config):
    ``seg_clip_rn_fpn`` adds the teacher tower's shape and input normalisation."""
    s = cfg.seg
    kwargs = {"name": s.name, "fpn_channels": s.fpn_channels, "norm": s.norm,
              "temperature": s.temperature}
    if s.name == "seg_clip_rn_fpn":
        try:
            kwargs.update(tower_shape(teacher.model.visual))
        except ValueError as e:
            raise ConfigError(f"{e} (teacher.model: {cfg.teacher.model}); with this teacher "
                              f"set e.g. seg.name=seg_r10_fpn seg.norm=gn") from None
        kwargs.update(image_mean=list(teacher.mean), image_std=list(teacher.std))
    return kwargs


def build_student(cfg: ExperimentConfig, teacher: Teacher) -> PixelEmbeddingSegmenter:
    """The student of ``cfg.seg``; ``seg_clip_rn_fpn`` starts from the teacher's tower."""
    kwargs = student_kwargs(cfg, teacher)
    model = build_segmenter(**kwargs, embed_dim=teacher.embed_dim,
                            backbone_weights=cfg.seg.backbone_weights)
    if "trunk_layers" in kwargs:
        load_tower(model.backbone.body, teacher.model.visual)
    return model


def teacher_temperature(teacher: Teacher) -> float:
    """1 / the teacher's learned logit scale (CLIP: 0.01)."""
    return 1.0 / float(teacher.model.logit_scale.exp())


def teacher_logits(teacher: Teacher, images: torch.Tensor, text: torch.Tensor,
                   key_smoothing: float = 0.0, prompt_denoising: float = 0.0,
                   dense: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """images (B, 3, H, W) uint8 -> dense embeddings (B, D, h, w) and text logits (B, C, h, w),
    the logits refined by MaskCLIP's key smoothing / prompt denoising when those are > 0.
    ``dense``: the embeddings already at hand (the cache); the tower then does not run."""
    if dense is None:
        dense = teacher.dense(images)
    logits = torch.einsum("bdhw,cd->bchw", dense, text) / teacher_temperature(teacher)
    if key_smoothing > 0 or prompt_denoising > 0:
        keys = teacher.dense(images, keys=True) if key_smoothing > 0 else None
        logits = refine_logits(logits, keys, key_smoothing, prompt_denoising)
    return dense, logits


def dense_cache(cfg: ExperimentConfig, teacher: Teacher):
    """``file name -> (D, h, w)`` teacher dense map of a training image, from the cache
    ``cache.root/cache.name`` (``seg.dense_source: cache``)."""
    from tools.train import open_cache

    s = cfg.seg
    if s.data_root or cfg.data.benchmark:
        raise ConfigError("seg.dense_source=cache: only the embedded world's images are cached "
                          "(tools/extract.py reads COCO-style files); use seg.dense_source=online")
    if s.short_side or s.crop_size or s.scale_range != [1.0, 1.0]:
        raise ConfigError("seg.dense_source=cache holds whole-image maps: set seg.short_side=0, "
                          "seg.crop_size=0 and seg.scale_range=[1.0,1.0]")
    if s.key_smoothing > 0:
        raise ConfigError("seg.key_smoothing needs the teacher's attention keys, which the cache "
                          "does not hold: use seg.dense_source=online")
    instances, _ = dataset_paths(cfg, "train")
    cache = open_cache(cfg, teacher, instances)
    ids = {Path(im["file_name"]).name: int(im["id"]) for im in read_instances(instances)["images"]}

    def dense_of(file_name: str) -> torch.Tensor:
        rec = cache.get(ids[Path(file_name).name])
        if rec["dense"] is None:
            raise ValueError(f"cache {cache.path} holds no dense maps: extract with "
                             "cache.store_dense=true")
        return torch.from_numpy(rec["dense"])

    return dense_of


class TrainView(torch.utils.data.Dataset):
    """Training samples: ``seg``'s random resize and crop (segmentors/inference.py), then a
    left-right flip with p=0.5 (of the cached teacher map too, with ``dense_of``); the global
    torch RNG draws them (the engine checkpoints it)."""

    def __init__(self, data: SemanticDataset, seg, dense_of=None):
        self.data, self.seg, self.dense_of = data, seg, dense_of

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        s = random_resize_crop(self.data[i], self.seg.short_side, self.seg.crop_size,
                               self.seg.scale_range)
        if self.dense_of is not None:
            s["dense"] = self.dense_of(s["file_name"])
        if torch.rand(()) < 0.5:
            s = {**s, **{k: s[k].flip(-1) for k in ("image", "labels", "dense") if k in s}}
        return s


def run(cfg: ExperimentConfig, resume: bool = False, eval_only: bool = False,
        progress: bool = True) -> dict[str, float]:
    """Train ``cfg`` (unless ``eval_only``), evaluate, write ``output_dir/eval``; returns metrics."""
    out = Path(cfg.output_dir)
    train_set, val_set = datasets(cfg)  # missing data fails before the teacher loads
    teacher = Teacher.from_config(cfg.teacher)
    seed_all(cfg.train.seed)  # the initial weights: torch's own seed differs per process
    model = build_student(cfg, teacher)
    if eval_only:
        load_weights(model, final_weights(out))
    else:
        save_config(cfg, out / "config.yaml")
        text = teacher.text(train_set.classes)
        model.set_vocabulary(text)
        s = cfg.seg
        weights = {**{k: 0.0 for k in DEFAULT_WEIGHTS}, "supervised_seg": s.supervised,
                   "pixel_distill": s.pixel_distill, "pseudo_label": s.pseudo_label}
        criterion = Criterion(weights, pixel_distill_mode=s.pixel_distill_mode,
                              pseudo_label_threshold=s.pseudo_label_threshold,
                              pseudo_label_scope=s.pseudo_label_scope)
        if s.pseudo_label_scope not in ("all", "unlabeled"):
            raise ConfigError(f"seg.pseudo_label_scope must be all or unlabeled, "
                              f"got {s.pseudo_label_scope!r}")
        if s.dense_source not in ("online", "cache"):
            raise ConfigError(f"seg.dense_source must be online or cache, got {s.dense_source!r}")
        needs_teacher = s.pixel_distill > 0 or s.pseudo_label > 0
        dense_of = dense_cache(cfg, teacher) if needs_teacher and s.dense_source == "cache" \
            else None
        novel_ids = train_set.novel_ids

        def loss_fn(model, batch):
            outputs = model(batch["images"])
            outputs.update(seg_labels=batch["labels"], novel_ids=novel_ids)
            if needs_teacher:
                dense, logits = teacher_logits(teacher, batch["images"], text,
                                               s.key_smoothing, s.prompt_denoising,
                                               batch.get("dense"))
                outputs.update(dense_targets=dense, teacher_pixel_logits=logits)
            return criterion(outputs)

        train(model, loss_fn, TrainView(train_set, cfg.seg, dense_of), cfg.train, out,
              collate_fn=collate_semantic,
              resume=resume, progress=progress)
    model.eval()
    metrics = evaluate(lambda images: model(images)["pixel_logits"], teacher, val_set, model,
                       out / "eval", cfg.seg, progress=progress)
    atomic_write(out / "eval" / "summary.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def teacher_baseline(cfg: ExperimentConfig, progress: bool = True) -> dict[str, float]:
    """The teacher's zero-shot segmentation of the val split (MaskCLIP: dense embeddings vs.
    every class name, logits upsampled bilinearly to the image); into ``output_dir/eval``."""
    out = Path(cfg.output_dir)
    _, val_set = datasets(cfg)  # missing data fails before the teacher loads
    save_config(cfg, out / "config.yaml")
    teacher = Teacher.from_config(cfg.teacher)
    text = teacher.text(val_set.classes)
    s = cfg.seg
    metrics = evaluate(
        lambda images: teacher_logits(teacher, images, text, s.key_smoothing,
                                      s.prompt_denoising)[1],
        teacher, val_set, None, out / "eval", s, progress=progress)
    atomic_write(out / "eval" / "summary.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def _same_size_batches(data: SemanticDataset, batch_size: int):
    """Consecutive samples of ``data`` in batches of at most ``batch_size`` equal-size images."""
    batch: list[dict] = []
    for i in range(len(data)):
        s = data[i]
        if batch and (len(batch) == batch_size or s["image"].shape != batch[0]["image"].shape):
            yield collate_semantic(batch)
            batch = []
        batch.append(s)
    if batch:
        yield collate_semantic(batch)


@torch.no_grad()
def evaluate(logits_fn, teacher: Teacher, data: SemanticDataset,
             model: PixelEmbeddingSegmenter | None, out_dir: Path | None, seg,
             batch_size: int = 8, progress: bool = True) -> dict[str, float]:
    """mIoU over ``data`` of ``logits_fn(images (B, 3, h, w)) -> (B, C, h', w')`` run as
    ``seg`` says (short side, whole image or sliding window; scored at each image's own
    resolution), every class name in the vocabulary (the model's previous vocabulary is
    restored afterwards)."""
    import time

    from tqdm import tqdm

    saved = model.text_embeddings if model is not None else None
    if model is not None:
        model.set_vocabulary(teacher.text(data.classes))
    evaluator = SemSegEvaluator(len(data.classes), class_names=data.classes, novel=data.novel)
    drawn, seconds = [], 0.0
    try:
        with tqdm(total=len(data), desc="evaluate", disable=not progress) as bar:
            for batch in _same_size_batches(data, batch_size):
                t = time.perf_counter()
                pred = segment_logits(logits_fn, batch["images"], seg.short_side, seg.window,
                                      seg.stride).argmax(1)
                seconds += time.perf_counter() - t
                for image, p, gt in zip(batch["images"], pred, batch["labels"], strict=True):
                    evaluator.add(p, gt)
                    if len(drawn) < OVERLAYS:
                        drawn.append(overlay(image.permute(1, 2, 0).numpy(), p.numpy(),
                                             data.classes, data.novel))
                bar.update(len(pred))
    finally:
        if model is not None:
            model.text_embeddings = saved
    metrics = evaluator.evaluate()
    flat = {k: float(metrics[k]) for k in ("mIoU", "mIoU_base", "mIoU_novel", "hIoU", "aAcc")}
    flat["images_per_s"] = len(data) / max(seconds, 1e-9)
    if out_dir is not None:
        evaluator.write(out_dir)
        for k, im in enumerate(drawn):
            tmp = out_dir / f".overlay_{k}.tmp.png"
            im.save(tmp)
            tmp.replace(out_dir / f"overlay_{k}.png")
    return flat


def _run(args) -> int:
    cfg = cli.load(args)
    if args.teacher_baseline:
        metrics = teacher_baseline(cfg, progress=not args.no_progress)
    else:
        if not args.eval_only:
            cli.check_rerun(cfg)  # a rerun resumes from the last checkpoint
        metrics = run(cfg, resume=True, eval_only=args.eval_only, progress=not args.no_progress)
    print(json.dumps(metrics, indent=2))
    print(f"results: {Path(cfg.output_dir) / 'eval'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

