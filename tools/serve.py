"""Serve exported students on a local web page and a JSON endpoint (ovdistill/serve.py).

    pip install '.[demo]'        # Gradio, once
    python -m tools.serve outputs/shapes/export [more exports ...] [--port 7860] [--onnx]

Opens nothing by itself: browse to the printed address. Pick or upload an image, type
the names (comma-separated), move the threshold; several exports answer side by side.
``POST /api/predict`` answers scripts with JSON (see ovdistill/serve.py). Names typed
at run time need exports written with ``tools/export.py --text-encoder`` (the main job's
is); ``--onnx`` runs ``model.onnx`` with ONNX Runtime.
"""

from __future__ import annotations

import argparse
import sys

from . import cli


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("exports", nargs="+", help="export directories (tools/export.py)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--onnx", action="store_true", help="serve model.onnx with ONNX Runtime")
    p.add_argument("--examples", type=int, default=8,
                   help="val images of the embedded world offered as examples (0: none)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    return cli.run(_run, p.parse_args(argv))


def _run(args) -> int:
    try:
        import gradio  # noqa: F401
        import uvicorn
    except ImportError:
        raise ValueError("tools.serve needs the demo extra: pip install '.[demo]'") from None
    from ovdistill.serve import Served, build_app, val_examples

    served = [Served.load(path, args.onnx) for path in args.exports]
    examples = val_examples(served, args.examples) if args.examples else []
    app = build_app(served, examples)
    print(f"serving {', '.join(s.label for s in served)} at http://{args.host}:{args.port}/ "
          f"(JSON: POST /api/predict)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
