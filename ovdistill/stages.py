"""The stages every orchestration chains, each cached on disk by what it reads.

A stage is a training or extraction run: ViLD-text (whose RPN proposes for the rest),
proposals, the teacher's region cache, the distilled students, the teacher on proposals,
the segmenters. The main job (``ovdistill/pipeline.py``) chains them on any detection
data, the ablations (``ovdistill/ablations.py``) on the embedded world. Each stage lives in
``<root>/<stage>-<fingerprint>`` and is reused when done, so changing a setting reruns that
stage and what follows, and nothing else. The fingerprint (:func:`fingerprint`) covers what
the stage reads: the config sections of its task (:data:`DETECTOR_SECTIONS`,
:data:`SEGMENTER_SECTIONS`) less every field left at its default, the teacher checkpoint's
bytes and the annotation files' bytes. A field is at its default when it equals the value
recorded in ``ovdistill/fingerprint_defaults.yaml`` (the schema's defaults when fingerprints
took this form), or, for a field newer than that file, the schema's default: so a new field
left at its default changes no fingerprint, and a changed default changes the fingerprint of
every stage that relied on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import yaml

from detectors import recipe as detection
from detectors.inference import evaluate_teacher_on_proposals
from distill.config import (
    ConfigError,
    ExperimentConfig,
    atomic_write,
    load_config,
    non_defaults,
)
from distill.data.coco import dataset_paths, embedded_world
from distill.data.proposals import tensors_sha256
from distill.extraction import extract
from segmentors import recipe as segmentation

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# the config sections each task's stages read (the teacher is read by its file's bytes too)
DETECTOR_SECTIONS = ("world", "data", "teacher", "cache", "model", "loss", "train")
SEGMENTER_SECTIONS = ("world", "data", "teacher", "cache", "seg", "train")
DEFAULTS_FILE = Path(__file__).with_name("fingerprint_defaults.yaml")


_SHA: dict[tuple, str] = {}  # (path, size, mtime) -> sha256: each file hashed once a run


def _file_sha(path: str | os.PathLike | None, tensors: bool = False) -> str | None:
    """sha256 of a file's bytes (``tensors``: of a safetensors file's tensors, whose header
    order changes from one write to the next); None for no file."""
    if not path or not Path(path).is_file():
        return None
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, tensors)
    if key not in _SHA and tensors:
        _SHA[key] = tensors_sha256(path)
    elif key not in _SHA:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        _SHA[key] = digest.hexdigest()
    return _SHA[key]


def data_files(cfg: ExperimentConfig) -> dict[str, str]:
    """The annotation files a stage of ``cfg`` reads (train and val instances), by split; the
    embedded world's are generated from the ``world`` section and left out."""
    if embedded_world(cfg):
        return {}
    files = {}
    for split in ("train", "val"):
        try:
            files[split] = str(dataset_paths(cfg, split)[0])
        except (ConfigError, OSError):  # an unset split or a missing benchmark: no file
            pass
    return files


def fingerprint(cfg: ExperimentConfig, sections: tuple[str, ...]) -> str:
    """8 hex digits of sha256 over what a stage of ``cfg`` reads: the fields of ``sections``
    that differ from their defaults (:func:`distill.config.non_defaults` against
    :data:`DEFAULTS_FILE`), the teacher checkpoint's bytes (a retrained teacher at the same
    path must not reuse stages made with the old one) and the annotation files' bytes
    (:func:`data_files`: a changed file at the same path reruns the stage). A proposals file
    counts by its boxes, not its path: stages made from the same proposals, written anew or
    in another output directory, are the same stages."""
    recorded = yaml.safe_load(DEFAULTS_FILE.read_text())
    spec = {}
    for section in sections:
        changed = non_defaults(getattr(cfg, section), recorded.get(section))
        if changed:
            spec[section] = changed
    proposals = _file_sha(cfg.cache.proposals, tensors=True) if "cache" in sections else None
    if proposals:
        spec["cache"]["proposals"] = proposals
    spec["teacher_sha256"] = _file_sha(cfg.teacher.pretrained)
    spec["data_sha256"] = {split: _file_sha(f) for split, f in data_files(cfg).items()}
    return hashlib.sha256(yaml.safe_dump(spec, sort_keys=True).encode()).hexdigest()[:8]


def stage_dir(root: Path, name: str, cfg: ExperimentConfig,
              sections: tuple[str, ...] = DETECTOR_SECTIONS) -> Path:
    """``root/<name>-<fingerprint>``: where stage ``name`` of ``cfg`` lives."""
    return root / f"{name}-{fingerprint(cfg, sections)}"


def student_stage(name: str, cfg: ExperimentConfig, root: Path, progress: bool
                  ) -> tuple[Path, dict]:
    """Train the student of ``cfg`` as stage ``name`` (or reuse it) and evaluate it."""
    out = stage_dir(root, name, cfg)
    summary = out / "eval" / "summary.json"
    if summary.is_file():
        print(f"{name}: reusing {out}")
        return out, {**json.loads(summary.read_text()), "reused": True}
    cfg = dataclasses.replace(cfg, output_dir=str(out))
    t = time.perf_counter()
    metrics = detection.train(cfg, resume=True, progress=progress)  # resumes a killed run
    metrics["train_eval_seconds"] = round(time.perf_counter() - t, 1)
    atomic_write(summary, json.dumps(metrics, indent=2) + "\n")
    return out, metrics


def proposals_stage(rpn_dir: Path, progress: bool) -> Path:
    """Top-300 class-agnostic proposals of the ViLD-text RPN on every training image."""
    path = rpn_dir / "proposals_train.safetensors"
    if path.is_file():
        return path
    return detection.write_split_proposals(load_config(rpn_dir / "config.yaml"), "train", path,
                                          progress)


def extract_stage(proposals: Path, cfg: ExperimentConfig, progress: bool) -> list[str]:
    """Embed ``cfg.cache.num_proposals`` of the ``proposals`` per training image with the
    teacher, into ``cache.root/<cache.name>_rpn-<hash of the proposals and their count>``;
    returns the cache overrides for the distilled students."""
    key = f"{_file_sha(proposals, tensors=True)},n={cfg.cache.num_proposals}"
    name = f"{cfg.cache.name}_rpn-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    extract(dataclasses.replace(cfg, cache=dataclasses.replace(
        cfg.cache, proposals=str(proposals), name=name, split="train")), progress=progress)
    return [f"cache.proposals={proposals}", f"cache.name={name}",
            f"cache.num_proposals={cfg.cache.num_proposals}"]


def teacher_stage_on_proposals(rpn_dir: Path, progress: bool) -> dict:
    """ViLD's baseline: the teacher classifies the ViLD-text RPN's proposals on the val split,
    ``pipeline.teacher_proposals`` per image (0: as many as a student's RoI heads score,
    ``model.rpn_post_nms_top_n_test``)."""
    rpn_cfg = load_config(rpn_dir / "config.yaml")
    num_proposals = rpn_cfg.pipeline.teacher_proposals or rpn_cfg.model.rpn_post_nms_top_n_test
    summary = rpn_dir / f"teacher_on_{num_proposals}_proposals" / "summary.json"
    if summary.is_file():
        print(f"teacher on proposals: reusing {summary.parent}")
        return {**json.loads(summary.read_text()), "reused": True, "eval": str(summary.parent)}
    cfg, teacher, rpn = detection.load_trained(rpn_dir)
    val = detection.val_set(cfg)
    novel = val.novel
    metrics = evaluate_teacher_on_proposals(rpn, teacher, val, teacher.text(val.names), novel,
                                            summary.parent, temperature=teacher.temperature,
                                            num_proposals=num_proposals, progress=progress)
    atomic_write(summary, json.dumps(metrics, indent=2) + "\n")
    return {**metrics, "eval": str(summary.parent)}


def run_world(configure, root: Path, progress: bool, students: list[str],
              teacher_baseline: bool = False) -> dict[str, dict]:
    """Every stage on one dataset: ViLD-text (and its RPN), proposals, cache, then ``students``.

    ``configure(stage, extra_overrides)`` gives each stage's config (stages ``vild_text``,
    ``extract`` and each of ``students``). Returns metrics per method (``vild_text``, the
    others of ``students``, and ``teacher`` with ``teacher_baseline``), each with its run
    directory as ``run``.
    """
    rpn_dir, vild_text = student_stage("vild_text", configure("vild_text", []), root, progress)
    results = {"vild_text": {**vild_text, "run": str(rpn_dir), "eval": str(rpn_dir / "eval")}}
    proposals = proposals_stage(rpn_dir, progress)
    cache = extract_stage(proposals, configure("extract", []), progress)
    for name in students:
        if name != "vild_text":
            run, metrics = student_stage(name, configure(name, cache), root, progress)
            results[name] = {**metrics, "run": str(run), "eval": str(run / "eval")}
    if teacher_baseline:
        results["teacher"] = teacher_stage_on_proposals(rpn_dir, progress)
    return results


def seg_stage(name: str, overrides: list[str], root: Path, progress: bool) -> dict:
    """Train and evaluate (or reuse) one stage, ``configs/shapes/<name>.yaml`` or the config
    file ``name`` (``*.yaml``); returns its metrics."""
    path = Path(name) if name.endswith(".yaml") else CONFIGS / "shapes" / f"{name}.yaml"
    name = path.stem
    cfg = load_config(path, overrides)
    out = stage_dir(root, name, cfg, SEGMENTER_SECTIONS)
    summary = out / "eval" / "summary.json"
    if summary.is_file():
        print(f"{name}: reusing {out}", flush=True)
        return {**json.loads(summary.read_text()), "reused": True}
    cfg = dataclasses.replace(cfg, output_dir=str(out))
    t = time.perf_counter()
    if name == "seg_teacher":
        metrics = segmentation.teacher_baseline(cfg, progress)
    else:
        metrics = segmentation.train(cfg, resume=True, progress=progress)
    metrics["seconds"] = round(time.perf_counter() - t, 1)
    atomic_write(summary, json.dumps(metrics, indent=2) + "\n")
    print(f"{name} ({overrides[-1] if overrides else ''}): novel mIoU "
          f"{metrics['mIoU_novel']:.3f} in {metrics['seconds']:.0f} s", flush=True)
    return metrics
