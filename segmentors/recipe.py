"""The segmentation recipe: datasets, the whole student, teacher targets, training,
evaluation, and the teacher's own zero-shot segmentation.

Training classes are every class of the dataset; pixels of novel classes count as
unlabelled for the supervised loss (``seg.supervised``). The teacher's dense
(MaskCLIP) embeddings are computed online from each training batch, flips
included, for ``seg.pixel_distill`` (L1/cosine to them) and ``seg.pseudo_label``
(MaskCLIP+: the argmax of the teacher's dense text logits over every class name).
Evaluation: mIoU over the val split with every class name in the vocabulary
(base, novel, harmonic mean), written to ``output_dir/eval`` with a per-class plot
and overlays of the first predictions; then the "none of these" pixel threshold, chosen on
val with 3-name vocabularies (segmentors/few_names.py), into ``eval/summary.json`` for the
export. ``tools/train_seg.py`` is a thin shell over it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distill.cache import open_cache
from distill.clip_trunk import load_tower, tower_kwargs
from distill.config import ConfigError, ExperimentConfig, atomic_write, save_config
from distill.data.coco import dataset_paths, detection_set, read_instances
from distill.data.semantic import (
    InstanceSemantic,
    SemanticDataset,
    ade20k,
    collate_semantic,
    pascal_context,
    synthetic_semantic,
)
from distill.engine import (
    final_weights,
    gather_to_main,
    get_rank,
    init_distributed,
    load_weights,
    reduce_over_ranks,
    resolve_device,
    seed_all,
    shard,
)
from distill.engine import train as train_loop
from distill.evaluation.sem_seg import SemSegEvaluator, overlay
from distill.teacher import Teacher
from distill.teacher.dense import refine_logits
from segmentors import PixelEmbeddingSegmenter, build_segmenter
from segmentors.criterion import SegmentationCriterion
from segmentors.few_names import few_names
from segmentors.inference import random_resize_crop, same_size_batches, segment_logits

OVERLAYS = 6  # val images drawn with their predictions


def datasets(cfg: ExperimentConfig) -> tuple[SemanticDataset, SemanticDataset]:
    """(train, val): ADE20k under ``seg.data_root`` (or the datasets root with
    ``data.benchmark: ade20k``), PASCAL Context-59 (``data.benchmark: pascal_context_59``); label maps painted from the instance masks of COCO-format
    files (``data.train_instances`` ...; the val classes, novel by ``data.novel`` or the
    files' tags); else the synthetic world."""
    if cfg.seg.data_root is None and cfg.data.benchmark is None and \
            cfg.data.train_instances is not None:
        val = detection_set(cfg, "val")
        return (InstanceSemantic(detection_set(cfg, "train"), val.names, val.novel),
                InstanceSemantic(val, val.names, val.novel))
    root = cfg.seg.data_root
    if root is None and cfg.data.benchmark is not None:
        from distill.data.roots import ade20k_root, pascal_context_root

        if cfg.data.benchmark == "pascal_context_59":
            root = pascal_context_root()
            return pascal_context(root, "train"), pascal_context(root, "val")
        if cfg.data.benchmark != "ade20k":
            raise ConfigError(f"data.benchmark: {cfg.data.benchmark!r} is a detection benchmark;"
                              " segmenters train on 'ade20k' or 'pascal_context_59'")
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
        kwargs.update(tower_kwargs(teacher, "seg", s.name, "seg_r10_fpn"))
    return kwargs


def build_student(cfg: ExperimentConfig, teacher: Teacher) -> PixelEmbeddingSegmenter:
    """The student of ``cfg.seg``; ``seg_clip_rn_fpn`` starts from the teacher's tower."""
    kwargs = student_kwargs(cfg, teacher)
    model = build_segmenter(**kwargs, embed_dim=teacher.embed_dim,
                            backbone_weights=cfg.seg.backbone_weights)
    if "trunk_layers" in kwargs:
        load_tower(model.backbone.body, teacher.model.visual)
    return model


def teacher_logits(teacher: Teacher, images: torch.Tensor, text: torch.Tensor,
                   key_smoothing: float = 0.0, prompt_denoising: float = 0.0,
                   dense: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """images (B, 3, H, W) uint8 -> dense embeddings (B, D, h, w) and text logits (B, C, h, w),
    the logits refined by MaskCLIP's key smoothing / prompt denoising when those are > 0.
    ``dense``: the embeddings already at hand (the cache); the tower then does not run."""
    keys = None
    if dense is None and key_smoothing > 0:  # one pass of the tower for both
        dense, keys = teacher.dense(images, with_keys=True)
    elif dense is None:
        dense = teacher.dense(images)
    logits = torch.einsum("bdhw,cd->bchw", dense, text) / teacher.temperature
    if key_smoothing > 0 or prompt_denoising > 0:
        if key_smoothing > 0 and keys is None:
            keys = teacher.dense(images, keys=True)
        logits = refine_logits(logits, keys, key_smoothing, prompt_denoising)
    return dense, logits


def training_targets(batch: dict, teacher: Teacher | None, text: torch.Tensor, seg,
                     novel_ids=()) -> dict:
    """The criterion's targets for a training ``batch`` (``images`` (B, 3, H, W), ``labels``
    (B, H, W), optionally cached ``dense`` maps and the crop's ``valid`` pixels): the labels,
    the valid pixels with ``seg.ignore_padding`` and, with a ``teacher``, its dense
    embeddings and text logits over ``text`` (C, D) (``seg``'s key smoothing and prompt
    denoising), computed on the teacher's device and returned on the batch's."""
    targets = {"seg_labels": batch["labels"], "novel_ids": novel_ids}
    if seg.ignore_padding and "valid" in batch:
        targets["dense_valid"] = batch["valid"]
    if teacher is not None:
        dense, logits = teacher_logits(teacher, batch["images"], text, seg.key_smoothing,
                                       seg.prompt_denoising, batch.get("dense"))
        device = batch["images"].device
        targets.update(dense_targets=dense.to(device), teacher_pixel_logits=logits.to(device))
    return targets


def training_step(criterion, teacher: Teacher | None, text: torch.Tensor, seg, novel_ids=()):
    """``loss_fn(model, batch)`` for the engine: the student on the batch's images, against
    :func:`training_targets`."""
    def loss_fn(model, batch):
        return criterion(model(batch["images"]),
                         training_targets(batch, teacher, text, seg, novel_ids))
    return loss_fn


def dense_cache(cfg: ExperimentConfig, teacher: Teacher):
    """``file name -> (D, h, w)`` teacher dense map of a training image, from the cache
    ``cache.root/cache.name`` (``seg.dense_source: cache``)."""
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
    cache = open_cache(cfg, teacher.fingerprint, instances)
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
    left-right flip with p=0.5 (of the cached teacher map too, with ``dense_of``), drawn from
    the engine's per-sample generator (:meth:`sample`; the global torch RNG for
    ``view[i]``)."""

    def __init__(self, data: SemanticDataset, seg, dense_of=None):
        self.data, self.seg, self.dense_of = data, seg, dense_of

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.sample(i, None)

    def sample(self, i: int, generator: torch.Generator | None) -> dict:
        s = random_resize_crop(self.data[i], self.seg.short_side, self.seg.crop_size,
                               self.seg.scale_range, generator)
        if self.dense_of is not None:
            s["dense"] = self.dense_of(s["file_name"])
        if torch.rand((), generator=generator) < 0.5:
            s = {**s, **{k: s[k].flip(-1) for k in ("image", "labels", "valid", "dense")
                         if k in s}}
        return s


def train(cfg: ExperimentConfig, resume: bool = False, eval_only: bool = False,
          progress: bool = True) -> dict[str, float]:
    """Train ``cfg`` (unless ``eval_only``), evaluate, write ``output_dir/eval``; returns metrics."""
    out = Path(cfg.output_dir)
    train_set, val_set = datasets(cfg)  # missing data fails before the teacher loads
    # first: under torchrun the teacher takes this rank's GPU; files are rank 0's to write
    main = init_distributed(cfg.train.device)[0] == 0
    teacher = Teacher.from_config(cfg.teacher)
    seed_all(cfg.train.seed)  # the initial weights: torch's own seed differs per process
    model = build_student(cfg, teacher)
    if eval_only:
        load_weights(model, final_weights(out))
        model.to(resolve_device(cfg.train.device))
    else:
        if main:
            save_config(cfg, out / "config.yaml")
        text = teacher.text(train_set.classes)
        model.set_training_vocabulary(text)
        s = cfg.seg
        criterion = SegmentationCriterion.from_config(s)
        if s.dense_source not in ("online", "cache"):
            raise ConfigError(f"seg.dense_source must be online or cache, got {s.dense_source!r}")
        needs_teacher = s.pixel_distill > 0 or s.pseudo_label > 0
        dense_of = dense_cache(cfg, teacher) if needs_teacher and s.dense_source == "cache" \
            else None
        novel_ids = train_set.novel_ids

        loss_fn = training_step(criterion, teacher if needs_teacher else None, text, s,
                                novel_ids)
        train_loop(model, loss_fn, TrainView(train_set, cfg.seg, dense_of), cfg.train, out,
                   criterion=criterion, collate_fn=collate_semantic, resume=resume,
                   progress=progress)
    model.eval()
    metrics = evaluate(lambda images: model(images)["pixel_logits"], teacher, val_set, model,
                       out / "eval", cfg.seg, progress=progress)
    metrics.update(choose_pixel_threshold(model, teacher, val_set, out / "eval", cfg.seg,
                                          progress))
    if main:
        atomic_write(out / "eval" / "summary.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def choose_pixel_threshold(model: PixelEmbeddingSegmenter, teacher: Teacher, val_set,
                           out_dir: Path, seg, progress: bool = True) -> dict[str, float]:
    """The "none of these" cut, chosen on val by segmentors/few_names.py (the best mIoU with
    3-name vocabularies; the full measure in ``out_dir/few_names.json``): ``pixel_threshold``
    (the export's ``thresholds.pixel``) and the 3-name figures at it."""
    m = few_names(model, val_set, teacher.text(val_set.classes), seg, progress=progress)
    if get_rank() != 0:
        return _threshold_figures(m)
    atomic_write(out_dir / "few_names.json", json.dumps(m, indent=2) + "\n")
    print(f"3-name vocabularies: mIoU {m['few']:.3f} (every name {m['all']:.3f}), "
          f"{100 * m['unnamed_painted']:.0f} % of unnamed pixels painted, at the chosen "
          f"pixel threshold {m['threshold']:g}")
    return _threshold_figures(m)


def _threshold_figures(m: dict) -> dict[str, float]:
    every = m["by_threshold"][0.0]  # no cut: every pixel named
    return {"pixel_threshold": m["threshold"], "mIoU_3names": m["few"],
            "unnamed_painted_3names": m["unnamed_painted"], "mIoU_3names_no_cut": every["few"],
            "unnamed_painted_no_cut": every["unnamed_painted"]}


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


@torch.no_grad()
def evaluate(logits_fn, teacher: Teacher, data: SemanticDataset,
             model: PixelEmbeddingSegmenter | None, out_dir: Path | None, seg,
             batch_size: int = 8, progress: bool = True) -> dict[str, float]:
    """mIoU over ``data`` of ``logits_fn(images (B, 3, h, w)) -> (B, C, h', w')`` run as
    ``seg`` says (short side, whole image or sliding window; scored at each image's own
    resolution), every class name in the vocabulary (the model's previous vocabulary is
    restored afterwards). ``logits_fn`` runs ``model`` (or, without one, the teacher): the
    images go to its device, the label maps come back to the CPU. Under torchrun each rank
    segments its :func:`distill.engine.shard` of the images, the counts are summed over the
    ranks, every rank returns the metrics and rank 0 writes ``out_dir``."""
    import time

    from tqdm import tqdm

    device = teacher.device if model is None else next(model.parameters()).device
    saved = model.text_embeddings if model is not None else None
    if model is not None:
        model.set_vocabulary(teacher.text(data.classes))
    evaluator = SemSegEvaluator(len(data.classes), class_names=data.classes, novel=data.novel)
    drawn, seconds = [], 0.0
    mine = torch.utils.data.Subset(data, shard(len(data)))  # this rank's slice of the images
    main = get_rank() == 0
    try:
        with tqdm(total=len(mine), desc="evaluate", disable=not progress or not main) as bar:
            for batch in same_size_batches(mine, batch_size):
                t = time.perf_counter()
                pred = segment_logits(logits_fn, batch["images"].to(device), seg.short_side,
                                      seg.window, seg.stride).argmax(1).cpu()
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
    evaluator.sum_over_ranks()
    metrics = evaluator.evaluate()
    flat = {k: float(metrics[k]) for k in ("mIoU", "mIoU_base", "mIoU_novel", "hIoU", "aAcc")}
    slowest = torch.tensor([seconds], dtype=torch.float64)
    reduce_over_ranks(slowest, op="max")  # the ranks ran side by side
    flat["images_per_s"] = len(data) / max(float(slowest), 1e-9)
    drawn = gather_to_main(drawn)  # the first images of the split, whichever rank drew them
    if out_dir is not None and main:
        drawn = [im for part in drawn for im in part][:OVERLAYS]
        evaluator.write(out_dir)
        for k, im in enumerate(drawn):
            tmp = out_dir / f".overlay_{k}.tmp.png"
            im.save(tmp)
            tmp.replace(out_dir / f"overlay_{k}.png")
    return flat
