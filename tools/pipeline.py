"""The main job: the whole embedded pipeline, each stage reused when already done.

    python -m tools.pipeline [--config configs/shapes/pipeline.yaml] [key=value ...]

Stages, each cached on disk and reused by the next run:

1. the synthetic world (generated or reused);
2. the tiny teacher: the committed checkpoint ``teacher.pretrained`` (pretrained
   now when that file is missing) and its zero-shot accuracy on val object crops;
3. ViLD-text: a student trained on base-class boxes only (no distillation); its
   RPN, trained on base classes, is the class-agnostic proposal network;
4. proposals: that RPN's top proposals for every training image (300, as ViLD);
5. extraction: teacher embeddings (1x + 1.5x crops) of the top 32 of them (ViLD
   embeds 300; 32 keeps this stage near 2.5 minutes on 2 CPU cores);
6. ViLD: a student trained with ViLD-text + ViLD-image distillation from the cache;
7. the pixel-distilled student segmenter (``configs/shapes/seg_distill.yaml``, the
   segmentation ablation's stage, in ``output_dir/seg``);
8. the result tables (box AP50 on novel, base and all classes, generalized setting;
   mIoU on base, novel and all classes).

Student stages live in ``output_dir/<stage>-<hash of its resolved config>``, so
changing a setting retrains that stage and what follows, and nothing else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import yaml

from distill.config import ExperimentConfig, atomic_write, load_config, save_config, to_dict
from distill.data.synthetic import World, generate_world, summarize
from distill.teacher import Teacher
from distill.teacher.pretrain import zero_shot_accuracy
from tools import cli


def main(argv: list[str] | None = None) -> int:
    parser = cli.config_parser(__doc__.splitlines()[0], "configs/shapes/pipeline.yaml")
    parser.add_argument("--no-progress", action="store_true")
    return cli.run(_run, parser.parse_args(argv))


def teacher_stage(cfg: ExperimentConfig, world: World, progress: bool) -> tuple[Teacher, dict]:
    """Load the tiny teacher (pretraining it first if its checkpoint is missing); score it."""
    t = time.perf_counter()
    ckpt = Path(cfg.teacher.pretrained) if cfg.teacher.pretrained else None
    info: dict = {"checkpoint": str(ckpt) if ckpt else None, "pretrained_now": False}
    if ckpt is not None and not ckpt.is_file() and cfg.teacher.model_config:
        from tools import pretrain_teacher

        print(f"teacher checkpoint {ckpt} missing: pretraining it (<= 10 min)")
        cfg_pre = dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain,
                                                                        output=str(ckpt)))
        pretrain_teacher.pretrain_and_save(cfg_pre, world, progress, ["(from tools.pipeline)"])
        info["pretrained_now"] = True
    teacher = Teacher.from_config(cfg.teacher)
    record = ckpt.with_suffix(".json") if ckpt else None
    saved = json.loads(record.read_text()) if record and record.is_file() else {}
    if saved.get("fingerprint") == teacher.fingerprint and saved.get("world") == world.fingerprint:
        accuracy = saved["zero_shot"]  # measured when the checkpoint was written
    else:
        accuracy = zero_shot_accuracy(teacher, world)
    info.update(fingerprint=teacher.fingerprint, zero_shot=accuracy,
                seconds=round(time.perf_counter() - t, 1))
    print(f"teacher {cfg.teacher.model} ({teacher.fingerprint}): zero-shot top-1 on val object "
          f"crops: all {accuracy['top1_all']:.3f}, base {accuracy['top1_base']:.3f}, "
          f"novel {accuracy['top1_novel']:.3f}")
    return teacher, info


STUDENTS = {"vild_text": "configs/shapes/vild_text.yaml", "vild_image": "configs/shapes/vild_image.yaml",
            "vild": "configs/shapes/vild.yaml", "vild_ensemble": "configs/shapes/vild_ensemble.yaml"}
CACHED_PROPOSALS = 32  # per training image: the RPN's best (after NMS), embedded by the teacher
LABELS = {"vild_text": "ViLD-text", "vild_image": "ViLD-image", "vild": "ViLD",
          "vild_ensemble": "ViLD-ensemble", "teacher": "teacher on proposals"}


def _file_sha(path: str | None) -> str | None:
    if not path or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _stage_dir(root: Path, name: str, cfg: ExperimentConfig,
               unread: tuple[str, ...] = ("seg",)) -> Path:
    """``root/<name>-<hash>`` over the resolved config (less the ``unread`` sections: no
    detector stage reads ``seg``) and the teacher checkpoint's bytes (a retrained teacher
    at the same path must not reuse stages made with the old one)."""
    skip = ("name", "output_dir", *unread)
    spec = {k: v for k, v in to_dict(cfg).items() if k not in skip}
    spec["teacher_sha256"] = _file_sha(cfg.teacher.pretrained)
    digest = hashlib.sha256(yaml.safe_dump(spec, sort_keys=True).encode()).hexdigest()[:8]
    return root / f"{name}-{digest}"


def student_stage(name: str, overrides: list[str], root: Path, progress: bool,
                  extra: list[str] = ()) -> tuple[Path, dict]:
    """Train the student of ``STUDENTS[name]`` (or reuse it) and evaluate it."""
    from tools import train

    cfg = load_config(cli.REPO / STUDENTS[name], [*overrides, *extra])
    out = _stage_dir(root, name, cfg)
    summary = out / "eval" / "summary.json"
    if summary.is_file():
        print(f"{name}: reusing {out}")
        return out, {**json.loads(summary.read_text()), "reused": True}
    cfg = dataclasses.replace(cfg, output_dir=str(out))
    t = time.perf_counter()
    metrics = train.run(cfg, resume=True, progress=progress)  # resumes a killed run
    metrics["train_eval_seconds"] = round(time.perf_counter() - t, 1)
    atomic_write(summary, json.dumps(metrics, indent=2) + "\n")
    return out, metrics


def _load_student(stage_dir: Path) -> tuple[ExperimentConfig, Teacher, object]:
    """(config, teacher, trained student) of a finished student stage."""
    from distill.engine import load_weights
    from tools import train

    cfg = load_config(stage_dir / "config.yaml")
    teacher = Teacher.from_config(cfg.teacher)
    model = train.build_student(cfg, teacher)
    load_weights(model, stage_dir / "model_final.safetensors")
    return cfg, teacher, model


def proposals_stage(rpn_dir: Path, progress: bool) -> Path:
    """Top-300 class-agnostic proposals of the ViLD-text RPN on every training image."""
    from tools import proposals

    path = rpn_dir / "proposals_train.safetensors"
    if path.is_file():
        return path
    return proposals.write(load_config(rpn_dir / "config.yaml"), "train", path, progress)


def extract_stage(proposals: Path, overrides: list[str], progress: bool) -> list[str]:
    """Embed the proposals with the teacher; returns the cache overrides for the student."""
    from tools import extract

    digest = hashlib.sha256(proposals.read_bytes()).hexdigest()[:8]
    cache = [f"cache.proposals={proposals}", f"cache.name=shapes_train_rpn-{digest}",
             f"cache.num_proposals={CACHED_PROPOSALS}"]
    args = ["--config", str(cli.REPO / "configs/shapes/extract.yaml"), *overrides, *cache]
    if not progress:
        args.append("--no-progress")
    if extract.main(args) != 0:
        raise RuntimeError("extraction failed (see the message above)")
    return cache


def teacher_stage_on_proposals(rpn_dir: Path, progress: bool) -> dict:
    """ViLD's baseline: the teacher classifies the ViLD-text RPN's proposals on the val split,
    as many per image as a student's RoI heads score (``model.rpn_post_nms_top_n_test``)."""
    from detectors.inference import evaluate_teacher_on_proposals
    from distill.data.coco import CocoDetection, dataset_paths

    num_proposals = load_config(rpn_dir / "config.yaml").model.rpn_post_nms_top_n_test
    summary = rpn_dir / f"teacher_on_{num_proposals}_proposals" / "summary.json"
    if summary.is_file():
        print(f"teacher on proposals: reusing {summary.parent}")
        return {**json.loads(summary.read_text()), "reused": True}
    cfg, teacher, rpn = _load_student(rpn_dir)
    val = CocoDetection(*dataset_paths(cfg, "val"))
    novel = val.novel
    metrics = evaluate_teacher_on_proposals(rpn, teacher, val, teacher.text(val.names), novel,
                                            summary.parent, temperature=cfg.model.temperature,
                                            num_proposals=num_proposals, progress=progress)
    atomic_write(summary, json.dumps(metrics, indent=2) + "\n")
    return metrics


def run_world(overrides: list[str], root: Path, progress: bool, students: list[str],
              teacher_baseline: bool = False) -> dict[str, dict]:
    """Every stage on one world: ViLD-text (and its RPN), proposals, cache, then ``students``.

    Returns metrics per method (``vild_text``, the others of ``students``, and
    ``teacher`` with ``teacher_baseline``).
    """
    rpn_dir, vild_text = student_stage("vild_text", overrides, root, progress)
    results = {"vild_text": vild_text}
    proposals = proposals_stage(rpn_dir, progress)
    cache = extract_stage(proposals, overrides, progress)
    for name in students:
        if name != "vild_text":
            results[name] = student_stage(name, overrides, root, progress, cache)[1]
    if teacher_baseline:
        results["teacher"] = teacher_stage_on_proposals(rpn_dir, progress)
    return results


def _table(rows: dict[str, dict]) -> str:
    lines = ["| method | novel AP50 | base AP50 | all AP50 | AP | images/s |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, m in rows.items():
        lines.append(f"| {LABELS.get(name, name)} | {100 * m['AP50_novel']:.1f} | "
                     f"{100 * m['AP50_base']:.1f} | {100 * m['AP50_all']:.1f} | "
                     f"{100 * m['AP']:.1f} | {m['images_per_s']:.1f} |")
    return "\n".join(lines)


def _run(args) -> int:
    cfg = cli.load(args)
    progress = not args.no_progress
    out = Path(cfg.output_dir)
    save_config(cfg, out / "config.yaml")
    summary: dict = {"config": str(out / "config.yaml")}

    t = time.perf_counter()
    world = generate_world(cfg.world, progress=progress)
    print(summarize(world))
    summary["world"] = {"path": str(world.root), "seconds": round(time.perf_counter() - t, 2)}

    _, summary["teacher"] = teacher_stage(cfg, world, progress)

    # the user's overrides reach every stage; the stage files set the rest
    summary["students"] = run_world(list(args.overrides), out, progress, ["vild_text", "vild"])
    table = _table(summary["students"])
    summary["table"] = table

    # the pixel-distilled student segmenter (tools/seg_ablation.py's stage, shared with it)
    from tools import seg_ablation

    seg = seg_ablation.stage("seg_distill", list(args.overrides), out / "seg", progress)
    summary["segmenter"] = seg
    summary["seg_table"] = seg_table = (
        "| method | base mIoU | novel mIoU | all mIoU | images/s |\n|---|---:|---:|---:|---:|\n"
        f"| pixel-distilled student | {100 * seg['mIoU_base']:.1f} | "
        f"{100 * seg['mIoU_novel']:.1f} | {100 * seg['mIoU']:.1f} | {seg['images_per_s']:.1f} |")
    print("\nbox AP on the val split, generalized setting (all classes in the vocabulary):")
    print(table)
    print("\nsegmentation mIoU on the val split (every object and stuff class named):")
    print(seg_table)

    atomic_write(out / "pipeline.json", json.dumps(summary, indent=2) + "\n")
    print(f"results: {out / 'pipeline.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
