"""Export a trained student (detector or segmenter) as a standalone directory.

    python -m tools.export --run outputs/shapes/vild-<hash> --output exported/vild
                           [--vocabulary names.txt | --vocabulary "circle,square|box"]
    python -m tools.export --run ... --output vocab/ --vocabulary-only --vocabulary names.txt
    python -m tools.export --run ... --output exported/vild --onnx   # + model.onnx
    python -m tools.export --run ... --output exported/vild --text-encoder  # + names typed later

``--run`` is a training output directory (its ``config.yaml`` and
``model_final.safetensors``) of ``tools/train.py`` (detector) or ``tools/train_seg.py``
(segmenter); loading the export needs torch and torchvision only. The vocabulary defaults to the val split's classes
(novel ones marked); ``--vocabulary`` takes a names file (one class per line,
synonyms separated by ``|``) or a comma-separated list, embedded once with the
run's teacher; a class is novel unless one of its names is a training class.
``--vocabulary-only`` writes just ``vocabulary.json`` + ``text_embeddings.safetensors``,
to pass to ``load_student(...).predict(image, vocabulary=<dir>)`` or
``tools/demo.py --vocabulary <dir>``. ``--onnx`` also writes ``model.onnx`` into the
student directory (detectors/onnx.py: run it with ``OnnxDetector``). ``--text-encoder``
adds the teacher's text tower alone (``text_encoder/``: its weights and tokenizer, no image
tower; ``text.onnx`` too with ``--onnx``), so ``predict(image, names=[...])``,
``tools/serve.py`` and ONNX users embed any names from the export by itself.
"""

from __future__ import annotations

import argparse
import sys

from ovdistill.export import export_run

from . import cli


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="training output directory")
    p.add_argument("--output", required=True, help="directory to write")
    p.add_argument("--vocabulary", default=None,
                   help="names file or comma-separated names (default: the val classes)")
    p.add_argument("--vocabulary-only", action="store_true",
                   help="write only the vocabulary files")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx")
    p.add_argument("--text-encoder", action="store_true",
                   help="also write the teacher's text tower (names typed at run time)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return cli.run(_run, p.parse_args(argv))


def _run(args) -> int:
    export_run(args.run, args.output, args.vocabulary, args.vocabulary_only, args.onnx,
               args.text_encoder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
