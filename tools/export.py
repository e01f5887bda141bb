"""Export a trained student (detector or segmenter) as a standalone directory.

    python -m tools.export --run outputs/shapes/vild-<hash> --output exported/vild
                           [--vocabulary names.txt | --vocabulary "circle,square|box"]
    python -m tools.export --run ... --output vocab/ --vocabulary-only --vocabulary names.txt
    python -m tools.export --run ... --output exported/vild --onnx   # + model.onnx

``--run`` is a training output directory (its ``config.yaml`` and
``model_final.safetensors``) of ``tools/train.py`` (detector) or ``tools/train_seg.py``
(segmenter); loading the export needs torch and torchvision only. The vocabulary defaults to the val split's classes
(novel ones marked); ``--vocabulary`` takes a names file (one class per line,
synonyms separated by ``|``) or a comma-separated list, embedded once with the
run's teacher; a class is novel unless one of its names is a training class.
``--vocabulary-only`` writes just ``vocabulary.json`` + ``text_embeddings.safetensors``,
to pass to ``load_student(...).predict(image, vocabulary=<dir>)`` or
``tools/demo.py --vocabulary <dir>``. ``--onnx`` also writes ``model.onnx`` into the
student directory (detectors/onnx.py: run it with ``OnnxDetector``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from distill.config import load_config
from distill.export import embed_vocabulary, parse_vocabulary, write_student
from tools import cli

SCORE_THRESHOLD = 0.3  # predict()'s default threshold, recorded in config.json


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="training output directory")
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument("--vocabulary", default=None,
                   help="names file or comma-separated names (default: the val classes)")
    p.add_argument("--vocabulary-only", action="store_true",
                   help="write only the vocabulary files")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return cli.run(_run, p.parse_args(argv))


def is_segmenter_run(run: Path) -> bool:
    """A run of tools/train_seg.py (its weights hold a pixel head, no RoI heads)."""
    from safetensors import safe_open

    weights = run / "model_final.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing (train the run to the end first)")
    with safe_open(str(weights), "pt") as f:
        return not any(k.startswith("roi_heads.") for k in f.keys())


def _run(args) -> int:
    from distill.engine import load_weights
    from distill.teacher import Teacher

    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run / 'config.yaml'}: missing (--run takes a training "
                                f"output directory)")
    cfg = load_config(run / "config.yaml")
    segmenter = is_segmenter_run(run)
    teacher = Teacher.from_config(cfg.teacher)
    names, novel_flags, train_names = _classes(cfg, segmenter)
    if args.vocabulary is None:
        classes, novel = [[n] for n in names], novel_flags
    else:
        classes = parse_vocabulary(args.vocabulary)
        novel = [not any(n.lower() in train_names for n in c) for c in classes]
    vocabulary = embed_vocabulary(teacher, classes, novel)
    out = Path(args.output)
    if args.vocabulary_only:
        vocabulary.save(out)
        print(f"vocabulary of {len(vocabulary)} classes written to {out}")
        return 0
    common = {"embed_dim": teacher.embed_dim,
              "teacher": {"model": cfg.teacher.model, "fingerprint": teacher.fingerprint,
                          "config": dataclasses.asdict(cfg.teacher)},  # demo --show-teacher
              "source": {"run": str(run), "config": to_yaml(cfg)}}
    if segmenter:
        from tools.train_seg import build_student, student_kwargs

        model = build_student(cfg, teacher)
        config = {"task": "segmentation", "model": student_kwargs(cfg, teacher),
                  "input": {"color": "RGB", "scale": "uint8 0-255 or float 0-1",
                            "mean": model.mean.flatten().tolist(),
                            "std": model.std.flatten().tolist()}, **common}
    else:
        from tools.train import build_student

        model = build_student(cfg, teacher)
        model_cfg = {k: v for k, v in dataclasses.asdict(cfg.model).items()
                     if k != "backbone_weights"}  # the weights are in model.safetensors
        config = {
            "task": "detection", "model": model_cfg,
            "input": {"color": "RGB", "scale": "uint8 0-255 or float 0-1",
                      "mean": list(model.transform.image_mean),
                      "std": list(model.transform.image_std), "size": cfg.model.image_size},
            "thresholds": {"score": SCORE_THRESHOLD, "nms": model.roi_heads.nms_thresh,
                           "detections_per_image": model.roi_heads.detections_per_img},
            **common}
        config["teacher"]["temperature"] = cfg.model.temperature
    load_weights(model, run / "model_final.safetensors")
    write_student(out, model.state_dict(), config, vocabulary)
    if args.onnx:
        if segmenter:
            from segmentors import load_student
            from segmentors.onnx import export_onnx
        else:
            from detectors import load_student
            from detectors.onnx import export_onnx
        export_onnx(load_student(out), out / "model.onnx")
    print(f"{config['task']} student {config['model']['name']} with {len(vocabulary)} classes "
          f"({sum(vocabulary.novel)} novel) written to {out}")
    return 0


def _classes(cfg, segmenter: bool) -> tuple[list[str], list[bool], set[str]]:
    """(val class names, their novel flags, lower-cased training class names)."""
    if segmenter:
        from tools.train_seg import datasets

        train, val = datasets(cfg)
        return (list(val.classes), list(val.novel),
                {c.lower() for c, n in zip(train.classes, train.novel, strict=True) if not n})
    from distill.data.coco import CocoDetection, dataset_paths

    val = CocoDetection(*dataset_paths(cfg, "val"))
    train = CocoDetection(*dataset_paths(cfg, "train"))
    return (val.names, val.novel,
            {c["name"].lower() for c in train.categories if c.get("split") != "novel"})


def to_yaml(cfg) -> str:
    import yaml

    from distill.config import to_dict

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


if __name__ == "__main__":
    sys.exit(main())
