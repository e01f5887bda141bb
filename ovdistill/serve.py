"""A local web page and a JSON endpoint over exported students (``tools/serve.py``).

    app = build_app([Served.load("outputs/shapes/export")])   # FastAPI, Gradio page at /
    uvicorn.run(app, port=7860)

The page (Gradio, the optional extra ``pip install .[demo]``): an image (uploaded, or one of
the examples), a comma-separated vocabulary typed now (synonyms joined by ``|``), the score
(detectors) or "none of these" (segmenters) threshold, and each export's result side by
side: boxes with names and scores, or the painted label map with its legend, unlabelled
pixels left clear; novel names (no training class among them) marked ``*`` and drawn in
magenta, as ``tools/demo.py`` draws them. A bad request gets one line on the page (``error:
...``) and the server goes on.

``POST /api/predict`` takes JSON ``{"image": <base64 PNG or JPEG>, "names": "a,b" | [...],
"threshold": 0.5, "export": 0}`` (all but ``image`` optional: the export's own vocabulary and
threshold, the first export) and returns ``{"task": "detection", "boxes": [[x0, y0, x1, y1],
...], "scores", "labels", "names", "novel"}`` or ``{"task": "segmentation", "labels": (H, W)
nested lists, -1 unlabelled, "names", "novel", "present"}``; a bad request answers 400 with
``{"error": "<one line>"}``. ``GET /api/exports`` lists what is served.

Names need the export's text tower (``tools/export.py --text-encoder``); ``onnx`` serves
``model.onnx`` (and ``text_encoder/text.onnx``) with ONNX Runtime.
"""

from __future__ import annotations

import base64
import binascii
import html
import io
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from distill.export import ExportError
from distill.text_encoder import MAX_NAMES

MAX_PIXELS = 4096 * 4096  # larger uploads are refused


class BadRequest(ValueError):
    """A request the page or the endpoint refuses; the message is one line."""


@dataclass
class Served:
    """One export: its student (PyTorch or ONNX Runtime), its task and its own names."""

    path: Path
    task: str
    student: object
    names: list[str] = field(default_factory=list)
    threshold: float = 0.0

    @classmethod
    def load(cls, path: str | os.PathLike, onnx: bool = False) -> Served:
        """An export directory (``tools/export.py``); anything else raises ExportError."""
        path = Path(path)
        config_path = path / "config.json"
        if not config_path.is_file():
            raise ExportError(f"{path}: not an exported student directory (no config.json)")
        task = json.loads(config_path.read_text()).get("task")
        if task == "detection":
            from detectors import load_student
            from detectors.onnx import OnnxDetector

            student = OnnxDetector(path) if onnx else load_student(path)
            torch_student = student.student if onnx else student
            threshold = torch_student.score_threshold
        elif task == "segmentation":
            from segmentors import load_student
            from segmentors.onnx import OnnxSegmenter

            student = OnnxSegmenter(path) if onnx else load_student(path)
            torch_student = student.student if onnx else student
            threshold = torch_student.threshold
        else:
            raise ExportError(f"{config_path}: task {task!r} is neither detection nor "
                              f"segmentation")
        return cls(path, task, student, torch_student.vocabulary.names, threshold)

    @property
    def label(self) -> str:
        return f"{self.path.name} ({self.task})"

    def predict(self, image: Image.Image, names: str | list[str] | None,
                threshold: float | None) -> dict:
        """The student's result on ``image`` for ``names`` (None: its own vocabulary; an
        empty list or more than MAX_NAMES: ExportError, one line)."""
        pixels = np.asarray(image.convert("RGB"))
        if self.task == "detection":
            return self.student.predict(pixels, score_threshold=threshold, names=names)
        return self.student.predict(pixels, threshold=threshold, names=names)


def read_image(data: bytes | str) -> Image.Image:
    """Bytes of an image file (or their base64) -> an RGB PIL image; BadRequest otherwise."""
    if isinstance(data, str):
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("'image' is not base64") from None
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > MAX_PIXELS:
                raise BadRequest(f"image of {im.width} x {im.height} pixels: at most "
                                 f"{MAX_PIXELS} pixels")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError):
        raise BadRequest("the upload is not an image (PNG, JPEG, ...)") from None


def as_json(found: dict, task: str) -> dict:
    """A student's result as plain JSON types."""
    if task == "detection":
        return {"task": task, "boxes": np.asarray(found["boxes"], dtype=np.float64).round(2).tolist(),
                "scores": [round(float(s), 4) for s in found["scores"]],
                "labels": list(found["labels"]), "names": list(found["names"]),
                "novel": list(found["novel"])}
    return {"task": task, "labels": np.asarray(found["labels"]).tolist(),
            "names": list(found["names"]), "novel": list(found["novel"]),
            "present": list(found["present"])}


def result_html(found: dict, task: str) -> str:
    """The result as a small HTML table the page shows (and a test reads): one row per box
    (name, score to 2 decimals, box) or per name present (segmenters, by area)."""
    star = lambda name, novel: html.escape(name) + (" *" if novel else "")  # noqa: E731
    if task == "detection":
        rows = "".join(f'<tr><td class="name">{star(n, v)}</td><td class="score">{s:.2f}</td>'
                       f'<td class="box">{", ".join(f"{c:.0f}" for c in b)}</td></tr>'
                       for n, v, s, b in zip(found["names"], found["novel"], found["scores"],
                                             found["boxes"], strict=True))
        head = "<tr><th>name</th><th>score</th><th>box</th></tr>"
        return f'<table class="found">{head}{rows}</table><p class="count">' \
               f'{len(found["names"])} detection(s)</p>'
    novel = dict(zip(found["names"], found["novel"], strict=True))
    rows = "".join(f'<tr><td class="name">{star(n, novel[n])}</td></tr>'
                   for n in found["present"])
    return f'<table class="found"><tr><th>name</th></tr>{rows}</table><p class="count">' \
           f'{len(found["present"])} name(s) painted</p>'


def drawn(image: Image.Image, found: dict, task: str) -> Image.Image:
    from ovdistill.report import draw, draw_label_map

    return draw(image, found) if task == "detection" else draw_label_map(image, found)


def build_app(served: list[Served], examples: list[Path] = ()):
    """The FastAPI app: the JSON endpoint under ``/api`` and the Gradio page at ``/``."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr
    from fastapi import Body, FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI(title="ovdistill students")

    @app.get("/api/exports")
    def exports() -> list[dict]:
        return [{"index": k, "path": str(s.path), "task": s.task, "names": s.names,
                 "threshold": s.threshold} for k, s in enumerate(served)]

    @app.post("/api/predict")
    def predict(request: dict = Body(...)):  # noqa: B008 - FastAPI's way to take a body
        try:
            if "image" not in request:
                raise BadRequest("the request has no 'image' (base64 of a PNG or JPEG)")
            index = int(request.get("export", 0))
            if not 0 <= index < len(served):
                raise BadRequest(f"export {index}: {len(served)} served (0..{len(served) - 1})")
            threshold = request.get("threshold")
            one = served[index]
            found = one.predict(read_image(request["image"]), request.get("names"),
                                None if threshold is None else float(threshold))
            return as_json(found, one.task)
        except (BadRequest, ExportError, ValueError, TypeError) as e:
            return JSONResponse({"error": str(e).splitlines()[0]}, status_code=400)

    answers = itertools.count(1)  # each answer numbered: the page re-renders every one

    def run(image, names: str, threshold: float):
        outputs, n = [], next(answers)
        try:
            if image is None:
                raise BadRequest("no image: upload one or pick an example")
            image = read_image(Path(image).read_bytes())
            results = [(s, s.predict(image, names, threshold)) for s in served]
        except (BadRequest, ExportError, ValueError) as e:
            line = html.escape(str(e).splitlines()[0])
            return [f'<p class="error" data-n="{n}">error: {line}</p>',
                    *([None, ""] * len(served))]
        for s, found in results:
            outputs += [drawn(image, found, s.task), result_html(found, s.task)]
        return [f'<p class="done" data-n="{n}"></p>', *outputs]

    first = served[0]
    with gr.Blocks(title="ovdistill") as page:
        gr.Markdown("## ovdistill: exported students, names typed now")
        with gr.Row():
            # a file, not gr.Image: what is not an image reaches run() and gets its line
            image = gr.File(type="filepath", label="image (PNG, JPEG, ...)", elem_id="image")
            with gr.Column():
                names = gr.Textbox(value=", ".join(first.names), label=f"names (comma-separated,"
                                   f" synonyms joined by |; at most {MAX_NAMES})",
                                   elem_id="names", lines=2)
                threshold = gr.Slider(0.0, 1.0, value=first.threshold, step=0.001,
                                      label="score threshold (detectors) / none-of-these cut "
                                            "(segmenters)", elem_id="threshold")
                button = gr.Button("find", elem_id="find", variant="primary")
                error = gr.HTML(elem_id="error")
        results = []
        with gr.Row():
            for k, s in enumerate(served):
                with gr.Column():
                    results.append(gr.Image(label=s.label, elem_id=f"drawn-{k}",
                                            interactive=False))
                    results.append(gr.HTML(elem_id=f"found-{k}"))
        if examples:
            gr.Examples([[str(p)] for p in examples], inputs=[image], label="val images")
        button.click(run, inputs=[image, names, threshold], outputs=[error, *results],
                     concurrency_limit=4)
    return gr.mount_gradio_app(app, page, path="/")


def val_examples(served: list[Served], count: int = 8) -> list[Path]:
    """The first ``count`` val images of the embedded world an export was trained on, when
    that world is on disk (none otherwise)."""
    import yaml

    from distill.config import WorldConfig
    from distill.data.synthetic import fingerprint

    for s in served:
        source = json.loads((s.path / "config.json").read_text()).get("source", {})
        cfg = yaml.safe_load(source.get("config") or "{}") or {}
        data = cfg.get("data") or {}
        if "world" not in cfg or data.get("benchmark") or data.get("val_instances"):
            continue
        world = WorldConfig(**cfg["world"])
        folder = Path(world.root) / fingerprint(world) / "images" / "val"
        if folder.is_dir():
            return sorted(folder.glob("*.png"))[:count]
    return []
