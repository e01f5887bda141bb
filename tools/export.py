"""Export a trained student as a standalone directory (torch + torchvision to run it).

    python -m tools.export --run outputs/shapes/vild-<hash> --output exported/vild
                           [--vocabulary names.txt | --vocabulary "circle,square|box"]
    python -m tools.export --run ... --output vocab/ --vocabulary-only --vocabulary names.txt
    python -m tools.export --run ... --output exported/vild --onnx   # + model.onnx

``--run`` is a training output directory (its ``config.yaml`` and
``model_final.safetensors``). The vocabulary defaults to the val split's classes
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


def _run(args) -> int:
    from distill.data.coco import CocoDetection, dataset_paths
    from distill.engine import load_weights
    from distill.teacher import Teacher
    from tools.train import build_student

    run = Path(args.run)
    if not (run / "config.yaml").is_file():
        raise FileNotFoundError(f"{run / 'config.yaml'}: missing (--run takes a training "
                                f"output directory)")
    cfg = load_config(run / "config.yaml")
    teacher = Teacher.from_config(cfg.teacher)
    train_names = {c["name"].lower() for c in CocoDetection(*dataset_paths(cfg, "train")).categories
                   if c.get("split") != "novel"}
    if args.vocabulary is None:
        val = CocoDetection(*dataset_paths(cfg, "val"))
        classes = [[n] for n in val.names]
        novel = [c.get("split") == "novel" for c in val.categories]
    else:
        classes = parse_vocabulary(args.vocabulary)
        novel = [not any(n.lower() in train_names for n in names) for names in classes]
    vocabulary = embed_vocabulary(teacher, classes, novel)
    out = Path(args.output)
    if args.vocabulary_only:
        vocabulary.save(out)
        print(f"vocabulary of {len(vocabulary)} classes written to {out}")
        return 0
    model = build_student(cfg, teacher)
    load_weights(model, run / "model_final.safetensors")
    model_cfg = {k: v for k, v in dataclasses.asdict(cfg.model).items()
                 if k != "backbone_weights"}  # the weights are in model.safetensors
    config = {
        "task": "detection", "model": model_cfg, "embed_dim": teacher.embed_dim,
        "input": {"color": "RGB", "scale": "uint8 0-255 or float 0-1",
                  "mean": list(model.transform.image_mean), "std": list(model.transform.image_std),
                  "size": cfg.model.image_size},
        "thresholds": {"score": SCORE_THRESHOLD, "nms": model.roi_heads.nms_thresh,
                       "detections_per_image": model.roi_heads.detections_per_img},
        "teacher": {"model": cfg.teacher.model, "fingerprint": teacher.fingerprint,
                    "temperature": cfg.model.temperature,
                    "config": dataclasses.asdict(cfg.teacher)},  # for demo --show-teacher
        "source": {"run": str(run), "config": to_yaml(cfg)},
    }
    write_student(out, model.state_dict(), config, vocabulary)
    if args.onnx:
        from detectors import load_student
        from detectors.onnx import export_onnx

        export_onnx(load_student(out), out / "model.onnx")
    print(f"student {cfg.model.name} with {len(vocabulary)} classes "
          f"({sum(vocabulary.novel)} novel) written to {out}")
    return 0


def to_yaml(cfg) -> str:
    import yaml

    from distill.config import to_dict

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


if __name__ == "__main__":
    sys.exit(main())
