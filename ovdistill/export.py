"""Exporting a trained run (detector or segmenter) as a standalone student directory.

``model.safetensors``, ``config.json``, ``vocabulary.json`` and
``text_embeddings.safetensors`` (distill/export.py), ``model.onnx`` when asked, and the
teacher's text tower when asked (``text_encoder/``, distill/text_encoder.py: names
typed at run time); loading the export needs torch and torchvision only, embedding typed
names open_clip too. ``tools/export.py`` is the command line.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from detectors import recipe as detection
from distill.config import load_config
from distill.engine import load_weights
from distill.export import embed_vocabulary, parse_vocabulary, write_student
from distill.teacher import Teacher
from segmentors import recipe as segmentation

# predict()'s and the demo's default score threshold, recorded in config.json: with 3 names,
# the main job's ViLD puts 0.13 detections per image on unnamed objects at 0.6 (0.46 at 0.4,
# 0.77 at 0.3; world seed 0, docs/results.md "Scores with three names")
SCORE_THRESHOLD = 0.6


def is_segmenter_run(run: Path) -> bool:
    """A run of tools/train_seg.py (its weights hold a pixel head, no RoI heads)."""
    from safetensors import safe_open

    weights = run / "model_final.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing (train the run to the end first)")
    with safe_open(str(weights), "pt") as f:
        return not any(k.startswith("roi_heads.") for k in f.keys())


def export_run(run: str | Path, output: str | Path, vocabulary: str | list[str] | None = None,
               vocabulary_only: bool = False, onnx: bool = False, text_encoder: bool = False
               ) -> Path:
    """Export the training run ``run`` (detector or segmenter) into the directory ``output``:
    weights, config, vocabulary (``vocabulary``: a names file or comma-separated names, default
    the val classes), with ``onnx`` ``model.onnx``, with ``text_encoder`` the teacher's text
    tower (``text_encoder/``, and its ``text.onnx`` with ``onnx``); ``vocabulary_only`` writes
    just the vocabulary files. Returns ``output``."""
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run / 'config.yaml'}: missing (--run takes a training "
                                f"output directory)")
    cfg = load_config(run / "config.yaml")
    segmenter = is_segmenter_run(run)
    teacher = Teacher.from_config(cfg.teacher)
    names, novel_flags, train_names = _classes(cfg, segmenter)
    if vocabulary is None:
        classes, novel = [[n] for n in names], novel_flags
    else:
        classes = parse_vocabulary(vocabulary)
        novel = [not any(n.lower() in train_names for n in c) for c in classes]
    vocab = embed_vocabulary(teacher, classes, novel)
    out = Path(output)
    if vocabulary_only:
        vocab.save(out)
        print(f"vocabulary of {len(vocab)} classes written to {out}")
        return out
    common = {"embed_dim": teacher.embed_dim,
              "teacher": {"model": cfg.teacher.model, "fingerprint": teacher.fingerprint,
                          "config": dataclasses.asdict(cfg.teacher)},  # demo --show-teacher
              "source": {"run": str(run), "config": to_yaml(cfg)},
              "training_names": sorted(train_names)}  # typed names are novel unless here
    if segmenter:
        model = segmentation.build_student(cfg, teacher)
        config = {"task": "segmentation", "model": segmentation.student_kwargs(cfg, teacher),
                  "input": {"color": "RGB", "scale": "uint8 0-255 or float 0-1",
                            "mean": model.mean.flatten().tolist(),
                            "std": model.std.flatten().tolist()},
                  "thresholds": {"pixel": saved_pixel_threshold(run)}, **common}
    else:
        model = detection.build_student(cfg, teacher)
        config = {  # the backbone's weights are in model.safetensors
            "task": "detection", "model": detection.student_kwargs(cfg, teacher),
            "input": {"color": "RGB", "scale": "uint8 0-255 or float 0-1",
                      "mean": list(model.transform.image_mean),
                      "std": list(model.transform.image_std), "size": cfg.model.image_size},
            "thresholds": {"score": SCORE_THRESHOLD, "nms": model.roi_heads.nms_thresh,
                           "detections_per_image": model.roi_heads.detections_per_img},
            **common}
        config["teacher"]["temperature"] = teacher.temperature
    load_weights(model, run / "model_final.safetensors")
    write_student(out, model.state_dict(), config, vocab)
    if onnx:
        if segmenter:
            from segmentors import load_student
            from segmentors.onnx import export_onnx
        else:
            from detectors import load_student
            from detectors.onnx import export_onnx
        export_onnx(load_student(out), out / "model.onnx")
    if text_encoder:
        from distill.text_encoder import write_text_encoder

        write_text_encoder(teacher, out / "text_encoder", onnx=onnx)
    print(f"{config['task']} student {config['model']['name']} with {len(vocab)} classes "
          f"({sum(vocab.novel)} novel) written to {out}")
    return out


def saved_pixel_threshold(run: Path) -> float:
    """The segmenter run's "none of these" cut, chosen on val (segmentors/recipe.py); 0 (every
    pixel named) for a run evaluated before there was one."""
    summary = run / "eval" / "summary.json"
    if not summary.is_file():
        return 0.0
    return float(json.loads(summary.read_text()).get("pixel_threshold", 0.0))


def _classes(cfg, segmenter: bool) -> tuple[list[str], list[bool], set[str]]:
    """(val class names, their novel flags, lower-cased training class names)."""
    if segmenter:
        train, val = segmentation.datasets(cfg)
        return (list(val.classes), list(val.novel),
                {c.lower() for c, n in zip(train.classes, train.novel, strict=True) if not n})
    from distill.data.coco import detection_set

    val, train = detection_set(cfg, "val"), detection_set(cfg, "train", category_ids="base")
    return val.names, val.novel, {n.lower() for n in train.names}


def to_yaml(cfg) -> str:
    import yaml

    from distill.config import to_dict

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
