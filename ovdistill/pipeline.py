"""The main job: from annotations to an exported open-vocabulary student, in one command.

    python -m tools.pipeline [--config configs/shapes/pipeline.yaml] [key=value ...]

The config is one experiment file (teacher, student, training, cache) and its ``data``
section says where the data is: the embedded world (default), a benchmark
(``data.benchmark``) or any COCO-format files (``data.train_instances`` / ``_images``,
``data.val_instances`` / ``_images``; template ``configs/custom/pipeline.yaml``). Stages,
each cached on disk and reused by the next run:

1. data: both splits read and checked; base and novel classes decided
   (:func:`distill.data.coco.split_classes`) and printed before any training;
2. the teacher: loaded (the embedded tiny teacher pretrained first if its file is
   missing) and scored zero-shot on val object crops;
3. ViLD-text: the config with ``loss.vild_image=0``, trained on base-class boxes; its RPN
   proposes for the rest;
4. proposals: that RPN's best ``model.rpn_post_nms_top_n_test`` per training image;
5. extraction: the teacher's embeddings of ``cache.num_proposals`` of them per image;
6. ViLD: the config as it is (``loss.vild_image`` > 0), distilled from that cache;
7. with ``pipeline.teacher_baseline`` (``--with-teacher``): the teacher on the val proposals;
8. the segmenter of ``pipeline.segmenter`` (``output_dir/seg``), where the data has instance
   masks (label maps painted from them: distill.data.semantic.InstanceSemantic) or is the
   embedded world (its own label maps);
9. the export of ViLD (``output_dir/export``; ONNX with ``pipeline.onnx``), val pictures
   drawn with it, and ``report.md`` (ovdistill/report.py) with the tables and PNGs.

Student stages live in ``output_dir/<stage>-<fingerprint>`` over what they read: their task's
config sections less the fields left at their defaults, the teacher file and the annotation
files, so changing a setting or a file retrains that stage and what follows, and nothing
else (ovdistill/stages.py).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from distill.config import ConfigError, ExperimentConfig, atomic_write, load_config, save_config
from distill.data.coco import (
    ClassSplit,
    CocoDetection,
    check_images,
    detection_set,
    embedded_world,
    split_classes,
)
from distill.teacher import Teacher
from ovdistill import report
from ovdistill.export import export_run
from ovdistill.report import seg_table, table
from ovdistill.stages import run_world, seg_stage

if TYPE_CHECKING:  # the synthetic world's module (cv2 and all) loads only when used
    from distill.data.synthetic import World

STAGE_OVERRIDES = {"vild_text": ["loss.vild_image=0"]}  # the rest: the config as it is
CROP_CHECK_IMAGES = 100  # val images whose object crops the teacher names (stage 2)


def data_stage(cfg: ExperimentConfig, progress: bool) -> tuple[ClassSplit, dict, World | None]:
    """Read and check both splits (the embedded world generated first); decide the classes.
    Returns the split, what to record, and the world (None for other data)."""
    info: dict = {}
    world = None
    if embedded_world(cfg):
        from distill.data.synthetic import generate_world, summarize

        t = time.perf_counter()
        world = generate_world(cfg.world, progress=progress)
        print(summarize(world))
        info["world"] = {"path": str(world.root), "seconds": round(time.perf_counter() - t, 2)}
    train, val = detection_set(cfg, "train", novel=None), detection_set(cfg, "val", novel=None)
    if cfg.data.on_error == "fail":
        for data in (train, val):
            check_images(data)
    split = split_classes(train, val, cfg.data.novel)
    info["masks"] = any(a.get("segmentation") for anns in train.anns for a in anns)
    info.update(train={"instances": str(train.instances_json), "images": len(train)},
                val={"instances": str(val.instances_json), "images": len(val)},
                base=split.base, novel=split.novel, untrained=split.untrained,
                novel_from=split.source)
    print(f"data: {len(train)} train / {len(val)} val images; {len(split.base)} base "
          f"classes (trained on): {', '.join(split.base)}")
    if split.novel:
        print(f"{len(split.novel)} novel classes ({split.source}; held out of training, "
              f"scored apart): {', '.join(split.novel)}")
    else:
        print(f"no novel class ({split.source}): this run measures the base classes only")
    if split.untrained:
        print(f"no annotation in either split (named at test time, never trained, not "
              f"scored): {', '.join(split.untrained)}")
    if not split.base:
        raise ConfigError(f"{train.instances_json}: no class has training annotations "
                          f"outside data.novel: nothing to train on")
    return split, info, world


@torch.no_grad()
def crop_accuracy(teacher: Teacher, val: CocoDetection, max_images: int = CROP_CHECK_IMAGES
                  ) -> dict:
    """Top-1 of the teacher naming each val object box (its crops, over every val name),
    on the first ``max_images`` images: all, base and novel objects."""
    text = teacher.text(val.names)
    novel = torch.tensor(val.novel)
    correct, is_novel = [], []
    for i in range(min(len(val), max_images)):
        s = val[i]
        if not len(s["boxes"]):
            continue
        emb = teacher.regions([s["image"]], [s["boxes"]])[0]
        correct += ((emb @ text.T).argmax(-1) + 1 == s["labels"]).tolist()
        is_novel += novel[s["labels"] - 1].tolist()
    c, n = torch.tensor(correct, dtype=torch.float32), torch.tensor(is_novel, dtype=torch.bool)
    mean = lambda v: round(v.mean().item(), 4) if len(v) else None  # noqa: E731
    return {"top1_all": mean(c), "top1_base": mean(c[~n]), "top1_novel": mean(c[n]),
            "objects_base": int((~n).sum()), "objects_novel": int(n.sum())}


def teacher_stage(cfg: ExperimentConfig, val: CocoDetection, world: World | None,
                  progress: bool) -> dict:
    """Load the teacher (pretraining the embedded tiny teacher first, on ``world``, if its file
    is missing) and score it zero-shot on ``val``'s object crops (the embedded world: the
    figures recorded beside its checkpoint, when they are for this world)."""
    t = time.perf_counter()
    ckpt = Path(cfg.teacher.pretrained) if cfg.teacher.pretrained else None
    info: dict = {"model": cfg.teacher.model, "pretrained": cfg.teacher.pretrained,
                  "pretrained_now": False}
    if world is not None and ckpt is not None and not ckpt.is_file() and cfg.teacher.model_config:
        from distill.teacher.pretrain import pretrain_and_save

        print(f"teacher checkpoint {ckpt} missing: pretraining it (<= 10 min)")
        cfg_pre = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain,
                                                                        output=str(ckpt)))
        pretrain_and_save(cfg_pre, world, progress, ["python", "-m", "tools.pipeline"])
        info["pretrained_now"] = True
    teacher = Teacher.from_config(cfg.teacher)
    record = ckpt.with_suffix(".json") if ckpt and world is not None else None
    saved = json.loads(record.read_text()) if record and record.is_file() else {}
    if saved and (saved.get("fingerprint"), saved.get("world")) == (teacher.fingerprint,
                                                                     world.fingerprint):
        accuracy = saved["zero_shot"]  # measured on the whole val split when it was written
    else:
        accuracy = crop_accuracy(teacher, val)
    info.update(fingerprint=teacher.fingerprint, zero_shot=accuracy,
                seconds=round(time.perf_counter() - t, 1))
    pct = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"teacher {cfg.teacher.model} ({teacher.fingerprint}): zero-shot top-1 on val object "
          f"crops: all {pct(accuracy['top1_all'])}, base {pct(accuracy['top1_base'])}, "
          f"novel {pct(accuracy['top1_novel'])}")
    return info


def seg_data(cfg: ExperimentConfig) -> list[str]:
    """Overrides that point the segmenter's config at the run's data and teacher (none for
    the embedded world, whose segmenter config names its own)."""
    if embedded_world(cfg):
        return []
    keys = {"data": ("benchmark", "train_instances", "train_images", "val_instances",
                     "val_images", "novel", "on_error"),
            "teacher": ("model", "model_config", "pretrained", "templates", "device")}
    return [f"{section}.{key}={json.dumps(getattr(getattr(cfg, section), key))}"
            for section, names in keys.items() for key in names]


def main_job(config: str | Path, overrides: list[str], progress: bool = True) -> dict:
    """Every stage of the config file ``config`` with ``overrides``: prints the tables,
    writes ``output_dir/pipeline.json`` and ``report.md``, returns the summary."""
    cfg = load_config(config, overrides)
    out = Path(cfg.output_dir)
    save_config(cfg, out / "config.yaml")
    summary: dict = {"config": str(out / "config.yaml")}

    split, summary["data"], world = data_stage(cfg, progress)
    user = list(overrides)
    if split.novel_setting is not None and split.novel_setting != cfg.data.novel:
        # every stage holds out the novel classes and those without a training box
        overrides = [*overrides, f"data.novel={json.dumps(split.novel_setting)}"]
        cfg = load_config(config, overrides)
    val = detection_set(cfg, "val")  # with the novel classes every stage holds out
    summary["teacher"] = teacher_stage(cfg, val, world, progress)

    def configure(stage: str, extra: list[str]) -> ExperimentConfig:
        return load_config(config, [*overrides, *STAGE_OVERRIDES.get(stage, []), *extra])

    if cfg.loss.vild_image <= 0:
        raise ConfigError(f"{config}: loss.vild_image must be > 0 (the distilled student); "
                          f"the text-only student is trained with 0 beside it")
    summary["students"] = students = run_world(configure, out, progress, ["vild_text", "vild"],
                                               teacher_baseline=cfg.pipeline.teacher_baseline)
    summary["table"] = box_table = table(students)

    if cfg.pipeline.segmenter and (world is not None or summary["data"]["masks"]):
        seg = seg_stage(cfg.pipeline.segmenter, [*seg_data(cfg), *user], out / "seg", progress)
        summary["segmenter"] = seg
        summary["seg_table"] = seg_table({"seg_distill": seg})
    elif cfg.pipeline.segmenter:
        print("segmenter: skipped (no instance masks in the training annotations)")

    export = export_run(students["vild"]["run"], out / "export", onnx=cfg.pipeline.onnx,
                        text_encoder=True)  # names typed at run time: tools/serve.py
    summary["export"] = str(export)
    summary["pictures"] = [str(p) for p in report.draw_val_pictures(
        export, val, out / "pictures", cfg.pipeline.pictures)]

    print("\nbox AP on the val split, generalized setting (every val class named):")
    print(box_table)
    if "seg_table" in summary:
        what = "every object and stuff class named" if world is not None else \
            "every val class named; pixels of no instance not scored"
        print(f"\nsegmentation mIoU on the val split ({what}):")
        print(summary["seg_table"])
    atomic_write(out / "pipeline.json", json.dumps(summary, indent=2) + "\n")
    summary["report"] = str(report.write_report(out, summary))
    print(f"results: {out / 'pipeline.json'}; report: {summary['report']}; "
          f"exported student: {export}")
    print(f"try it with names of your own, in the browser: python -m tools.serve {export}")
    return summary
