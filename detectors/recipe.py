"""The detection recipe: datasets, the whole student, training and evaluation of a config.

    from detectors.recipe import train, evaluate_run
    metrics = train(load_config("configs/shapes/vild.yaml"))

The training vocabulary is the train split's base categories (``split`` tag not
"novel"); distillation targets (``loss.vild_image`` > 0) come from the cache
written by ``tools/extract.py`` (ViLD's offline recipe: no image encoder runs
during training; only the teacher's text encoder embeds the class names). The
final evaluation uses every category of the val split (generalized setting).
``tools/train.py``, ``tools/eval.py`` and ``tools/proposals.py`` are thin shells over it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from detectors import TOWER_BUILDERS, ViLD, build_detector
from detectors.augment import draw_window, hflip_target, large_scale_jitter, window_masks
from detectors.criterion import DetectionCriterion
from detectors.inference import evaluate_detector, write_proposals
from distill.baron import GRID, PseudoWords, bag_outputs, bag_seeds, drop_words, sample_bags
from distill.cache import EmbeddingCache, open_cache
from distill.clip_trunk import load_tower, tower_kwargs
from distill.config import BagConfig, ConfigError, ExperimentConfig, atomic_write, save_config
from distill.data.coco import (
    CocoDetection,
    DatasetError,
    check_categories,
    collate,
    dataset_paths,
    detection_set,
)
from distill.engine import (
    final_weights,
    get_rank,
    init_distributed,
    load_weights,
    resolve_device,
    seed_all,
)
from distill.engine import train as train_loop
from distill.teacher import Teacher


class DistillationSet(torch.utils.data.Dataset):
    """Training samples: image, targets in the base vocabulary, cached proposals + embeddings.

    ``min_objectness`` > 0 keeps only the cached proposals whose RPN objectness is at
    least that; ``distill_per_image`` > 0 then draws that many of them per step. With
    ``bags`` (``loss.bags``, BARON) each sample also holds ``bags``: bags of regions drawn
    around its cached proposals and ground-truth boxes after the augmentation
    (:func:`distill.baron.sample_bags`, dict of :class:`distill.baron.Bags` plus ``words``,
    the kept pseudo-words (S, 9, words) after word dropout). Each
    sample is flipped (p=0.5) and, with ``scale_jitter`` (low, high), large-scale jittered
    to ``size`` x ``size`` (:func:`detectors.augment.large_scale_jitter`: ground-truth
    boxes, masks and the cached boxes with their embeddings move together). Flips, jitter
    and draws come from the engine's per-sample generator (:meth:`sample`; the global torch
    RNG for ``dataset[i]``), so a resumed run, with any number of loader workers, sees the
    same samples.
    """

    def __init__(self, data: CocoDetection, cache: EmbeddingCache | None, flip: bool = True,
                 distill_per_image: int = 0, min_objectness: float = 0.0,
                 scale_jitter: list[float] | None = None, size: int = 0,
                 bags: BagConfig | None = None):
        if scale_jitter and (len(scale_jitter) != 2 or not 0 < scale_jitter[0] <=
                             scale_jitter[1] or size <= 0):
            raise ConfigError(f"data.scale_jitter: [low, high] with 0 < low <= high, or [] "
                              f"for none (got {list(scale_jitter)})")
        self.data, self.cache, self.flip = data, cache, flip
        self.distill_per_image, self.min_objectness = distill_per_image, min_objectness
        self.scale_jitter, self.size = (tuple(scale_jitter) if scale_jitter else None), size
        self.bags = bags

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return self.sample(i, None)

    def sample(self, i: int, generator: torch.Generator | None) -> dict:
        # masks under the jitter are drawn from the polygons into the window at the end
        lazy = getattr(self.data, "with_masks", False) and self.scale_jitter is not None
        s = self.data.read(i, masks="raw") if lazy else self.data[i]
        image = s["image"]
        target = {k: s[k] for k in ("boxes", "labels", "masks") if k in s}
        if lazy:
            target["row"] = torch.arange(len(target["boxes"]))
        distill = sources = None
        if self.cache is not None:
            rec = self.cache.get(s["image_id"])
            distill = {"boxes": torch.as_tensor(rec["boxes"]),
                       "embeddings": torch.as_tensor(rec["embeddings"])}
            if self.bags is not None:  # BARON's bags grow around every cached proposal
                sources = {"boxes": distill["boxes"], "scores": torch.as_tensor(rec["scores"])}
            if self.min_objectness > 0:
                keep = torch.as_tensor(rec["scores"]) >= self.min_objectness
                distill = {key: v[keep] for key, v in distill.items()}
            k = self.distill_per_image
            if 0 < k < len(distill["boxes"]):
                pick = torch.randperm(len(distill["boxes"]), generator=generator)[:k]
                distill = {key: v[pick] for key, v in distill.items()}
        moved = [target] + [t for t in (distill, sources) if t is not None]
        flipped = self.flip and bool(torch.rand((), generator=generator) < 0.5)
        if flipped:
            image = image.flip(-1)
            moved = [hflip_target(t, image.shape[-1]) for t in moved]
        if self.scale_jitter is not None:
            window = draw_window(image.shape[-2], image.shape[-1], self.size, self.scale_jitter,
                                 generator)
            size = tuple(image.shape[-2:])
            image, moved = large_scale_jitter(image, moved, self.size, self.scale_jitter,
                                              window=window)
            if lazy:  # the boxes' surviving rows' masks, drawn in the window
                rows = moved[0].pop("row").tolist()
                moved[0]["masks"] = window_masks([s["segmentations"][r] for r in rows], size,
                                                 window, self.size, flipped)
        target, distill = moved[0], (moved[1] if distill is not None else None)
        out = {"image": image, "target": target, "distill": distill, "image_id": s["image_id"]}
        if self.bags is not None and sources is not None:
            out["bags"] = self._bags(moved[-1], target, image.shape[-2:], generator)
        return out

    def _bags(self, sources: dict, target: dict, size, generator) -> dict:
        c = self.bags
        boxes, scores = sources["boxes"].float(), sources["scores"].float()
        if c.with_gt:
            gt = target["boxes"].float()
            boxes, scores = torch.cat([boxes, gt]), torch.cat([scores, torch.ones(len(gt))])
        h, w = int(size[0]), int(size[1])
        seeds = bag_seeds(boxes, scores, h, w, min_objectness=c.min_objectness,
                          nms_iou=c.nms_iou, shape_ratio=c.shape_ratio, area_ratio=c.area_ratio)
        bags = sample_bags(seeds, h, w, generator, GRID, max_groups=c.max_groups,
                           max_permutations=c.max_permutations, alpha=c.alpha,
                           base_probability=c.base_probability, cut_off=c.cut_off,
                           interval=c.interval).as_dict()
        kept = torch.ones(len(bags["members"]) * GRID, c.words, dtype=torch.bool)
        bags["words"] = drop_words(kept, c.word_dropout, generator).view(-1, GRID, c.words)
        return bags


def student_kwargs(cfg: ExperimentConfig, teacher: Teacher) -> dict:
    """``build_detector``'s arguments for ``cfg.model`` without the backbone weights (the
    export's ``model`` config); a student on the teacher's tower adds the tower's shape, its
    attention pool's and the teacher's input normalisation."""
    kwargs = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k != "backbone_weights"}
    if cfg.model.name in TOWER_BUILDERS:
        kwargs.update(tower_kwargs(teacher, "model", cfg.model.name, "vild_r10_fpn", pool=True))
    return kwargs


def build_student(cfg: ExperimentConfig, teacher: Teacher) -> ViLD:
    """The student of ``cfg.model`` for ``teacher``'s embedding size (untrained); one on the
    teacher's tower (``vild_clip_rn_fpn``) starts from the tower's weights."""
    model = build_detector(**student_kwargs(cfg, teacher), embed_dim=teacher.embed_dim,
                           backbone_weights=cfg.model.backbone_weights)
    if cfg.model.name in TOWER_BUILDERS:
        vlm = model.roi_heads.vlm
        load_tower(model.backbone.body, teacher.model.visual,
                   vlm.pool if vlm is not None else None)
    return model


def load_trained(run_dir: str | Path) -> tuple[ExperimentConfig, Teacher, ViLD]:
    """(config, teacher, student with its final weights) of a finished run directory."""
    from distill.config import load_config

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    weights = final_weights(run_dir)  # before the teacher loads: a missing run fails fast
    teacher = Teacher.from_config(cfg.teacher)
    model = build_student(cfg, teacher)
    load_weights(model, weights)
    return cfg, teacher, model


def check_names(data: CocoDetection, what: str = "categories") -> None:
    """The text classifier needs distinct class names: at least one, none empty or repeated."""
    if not data.categories:
        raise DatasetError(f"{data.instances_json}: no {what} (an empty vocabulary)")
    check_categories(data)


def train_set(cfg: ExperimentConfig) -> CocoDetection:
    """The train split in the base vocabulary (``data.novel`` or the file's tags; masks with
    ``model.mask_head``)."""
    data = detection_set(cfg, "train", category_ids="base", with_masks=cfg.model.mask_head)
    check_names(data, "base categories to train on")
    if not any(data.anns):
        raise DatasetError(f"{data.instances_json}: no annotations of the {len(data.names)} base "
                           f"categories to train on")
    return data


def val_set(cfg: ExperimentConfig) -> CocoDetection:
    """The val split, every category (generalized setting)."""
    val = detection_set(cfg, "val")
    check_names(val)
    return val


def evaluate(model: ViLD, teacher: Teacher, val: CocoDetection, out_dir: Path | None,
             progress: bool = True) -> dict[str, float]:
    """Generalized-setting box AP on ``val`` (all its categories in the vocabulary), on the
    model's device."""
    return evaluate_detector(model, val, teacher.text(val.names), val.novel, out_dir,
                             progress=progress)


def training_step(criterion, distill: bool, teacher: Teacher | None = None):
    """``loss_fn(model, batch)`` for the engine: a batch of :class:`DistillationSet` samples
    (on the training device) through the student, the cached teacher embeddings of its
    ``distill`` boxes as targets (``distill``), into ``criterion``. With ``teacher`` (BARON,
    ``loss.bag``), the student also embeds each sample's bag boxes, in the same pass as the
    cached ones, and :func:`distill.baron.bag_outputs` makes the bag loss's inputs."""
    def loss_fn(model, batch):
        images, targets = [b["image"] for b in batch], [b["target"] for b in batch]
        if not distill and teacher is None:
            return criterion(model(images, targets))
        cached = [b["distill"]["boxes"] if distill else b["image"].new_zeros(0, 4).float()
                  for b in batch]
        bags = [b["bags"]["boxes"] for b in batch] if teacher is not None else \
            [c[:0] for c in cached]
        outputs = model(images, targets, [torch.cat([c.float(), g.float()])
                                          for c, g in zip(cached, bags, strict=True)])
        split = outputs.pop("distill_embeddings").split(
            [n for c, g in zip(cached, bags, strict=True) for n in (len(c), len(g))])
        extra = {}
        if distill:
            outputs["distill_embeddings"] = torch.cat(split[0::2])
            extra["distill_targets"] = torch.cat([b["distill"]["embeddings"] for b in batch])
        if teacher is not None:
            outputs.update(bag_outputs(criterion.words, teacher, images, list(split[1::2]),
                                       [b["bags"] for b in batch],
                                       [b["image_id"] for b in batch]))
        return criterion(outputs, extra)
    return loss_fn


def build_bag_words(cfg: ExperimentConfig, teacher: Teacher) -> PseudoWords | None:
    """BARON's pseudo-word module for ``cfg.loss.bags`` (None with ``loss.bag`` 0); a bag of
    9 regions must fit the teacher's text context."""
    if not cfg.loss.bag:
        return None
    words = cfg.loss.bags.words
    if words < 1 or GRID * words + 2 > teacher.context_length:
        raise ConfigError(f"loss.bags.words: {GRID} regions x {words} words + start and end "
                          f"must fit the teacher's text context of {teacher.context_length} "
                          f"tokens (at most {(teacher.context_length - 2) // GRID} words)")
    return PseudoWords(teacher.embed_dim, teacher.word_width, words)


def train(cfg: ExperimentConfig, resume: bool = False, eval_only: bool = False,
          progress: bool = True) -> dict[str, float]:
    """Train ``cfg`` (unless ``eval_only``), evaluate, write ``output_dir/eval``; returns
    metrics. Rerunning with ``resume`` continues from the last checkpoint."""
    out = Path(cfg.output_dir)
    val = val_set(cfg)  # data problems fail before the teacher loads
    data = None if eval_only else train_set(cfg)
    # first: under torchrun the teacher takes its rank's GPU; files are rank 0's to write
    main = init_distributed(cfg.train.device)[0] == 0
    teacher = Teacher.from_config(cfg.teacher)
    seed_all(cfg.train.seed)  # the initial weights: torch's own seed differs per process
    model = build_student(cfg, teacher)
    if eval_only:
        load_weights(model, final_weights(out))
        model.to(resolve_device(cfg.train.device))
    else:
        model.set_training_vocabulary(teacher.text(data.names))
        instances, _ = dataset_paths(cfg, "train")
        cache = open_cache(cfg, teacher.fingerprint, instances) \
            if cfg.loss.vild_image > 0 or cfg.loss.bag > 0 else None
        if main:
            save_config(cfg, out / "config.yaml")
        if main and (data.skipped or val.skipped):
            atomic_write(out / "skipped.json", json.dumps(
                {"train": data.skipped, "val": val.skipped}, indent=1) + "\n")
            print(f"data.on_error=skip: left out {len(data.skipped)} train and "
                  f"{len(val.skipped)} val records or images, listed in {out / 'skipped.json'}")
        criterion = DetectionCriterion.from_config(cfg.loss, words=build_bag_words(cfg, teacher))
        loss_fn = training_step(criterion, distill=cfg.loss.vild_image > 0,
                                teacher=teacher if cfg.loss.bag > 0 else None)

        periodic = (lambda m: evaluate(m, teacher, val, None, False)) if cfg.train.eval_period \
            else None
        samples = DistillationSet(data, cache, distill_per_image=cfg.data.distill_per_image,
                                  min_objectness=cfg.data.distill_min_objectness,
                                  scale_jitter=cfg.data.scale_jitter, size=cfg.model.image_size,
                                  bags=cfg.loss.bags if cfg.loss.bag > 0 else None)
        train_loop(model, loss_fn, samples, cfg.train, out, criterion=criterion,
                   collate_fn=collate, evaluate=periodic, resume=resume, progress=progress)
    # every rank scores its shard of val; rank 0 writes the files
    metrics = evaluate(model, teacher, val, out / "eval", progress)
    if main:
        atomic_write(out / "eval" / "summary.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def write_split_proposals(cfg: ExperimentConfig, split: str = "train",
                          output: str | Path | None = None, progress: bool = True) -> Path:
    """The trained RPN of ``cfg.output_dir`` on every image of ``split`` -> its top
    ``model.rpn_post_nms_top_n_test`` boxes per image with objectness, in ``output``
    (default ``output_dir/proposals_<split>.safetensors``); returns the path. Under torchrun
    every rank proposes for its shard of the images and rank 0 writes the file."""
    out = Path(cfg.output_dir)
    path = Path(output) if output else out / f"proposals_{split}.safetensors"
    weights = final_weights(out)  # before loading the teacher: a missing run fails fast
    data = detection_set(cfg, split)  # data.on_error and the box clean-up, as in training
    init_distributed(cfg.train.device)  # under torchrun: each rank proposes for its shard
    model = build_student(cfg, Teacher.from_config(cfg.teacher))
    load_weights(model, weights)
    model.to(resolve_device(cfg.train.device))
    t = time.perf_counter()
    n = write_proposals(model, data, path, progress=progress)
    if get_rank() == 0:
        print(f"proposals: {n} boxes written to {path} in {time.perf_counter() - t:.0f} s")
    return path
