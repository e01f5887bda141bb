"""Standalone student artefacts: weights, config and vocabulary in one directory.

An exported student needs torch and torchvision only (no open_clip, no teacher
weights, no pickle)::

    student/
      model.safetensors            the student's weights
      config.json                  architecture, input normalisation, thresholds, teacher
      vocabulary.json              class names (synonyms), novel flags, teacher fingerprint
      text_embeddings.safetensors  (C, D) L2-normalised text embedding per class

A vocabulary alone (``vocabulary.json`` + ``text_embeddings.safetensors``) can be
written anywhere and passed at inference to swap the classes without touching the
model. Each class may have several names (synonyms): their text embeddings are
averaged, then normalised again.

    vocab = embed_vocabulary(teacher, parse_vocabulary("cat|kitty,dog"))
    write_student("student/", model.state_dict(), config, vocab)
    config, state, vocab = read_student("student/")
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

FORMAT = "ovdistill-student"
VOCAB_FORMAT = "ovdistill-vocabulary"
VERSION = 1
ONNX_OPSET = 17  # every ONNX graph of an export


class ExportError(ValueError):
    """A student or vocabulary file that cannot be used; the message names the file."""


@dataclass
class Vocabulary:
    """Classes a student can name: ``classes[k]`` lists the synonyms of class k (first = display
    name); ``embeddings`` (C, D) L2-normalised; ``novel`` (C,) marks classes unseen in training."""

    classes: list[list[str]]
    embeddings: Tensor
    novel: list[bool]
    teacher_fingerprint: str | None = None

    @property
    def names(self) -> list[str]:
        return [c[0] for c in self.classes]

    def __len__(self) -> int:
        return len(self.classes)

    def save(self, directory: str | os.PathLike) -> None:
        """Write ``vocabulary.json`` and ``text_embeddings.safetensors`` (atomically each)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".text_embeddings.{uuid.uuid4().hex}.tmp"
        save_file({"text_embeddings": self.embeddings.detach().float().contiguous().cpu()},
                  str(tmp))
        os.replace(tmp, directory / "text_embeddings.safetensors")
        _write_json(directory / "vocabulary.json", {
            "format": VOCAB_FORMAT, "version": VERSION, "classes": self.classes,
            "novel": [bool(n) for n in self.novel],
            "teacher_fingerprint": self.teacher_fingerprint,
            "embedding_dim": int(self.embeddings.shape[1])})

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocabulary:
        """From a directory holding ``vocabulary.json`` (or that file's path)."""
        from safetensors.torch import load_file

        path = Path(path)
        meta_path = path / "vocabulary.json" if path.is_dir() else path
        info = _read_json(meta_path, VOCAB_FORMAT)
        emb_path = meta_path.parent / "text_embeddings.safetensors"
        if not emb_path.is_file():
            raise ExportError(f"{emb_path}: missing (written beside {meta_path.name})")
        try:
            emb = load_file(str(emb_path))["text_embeddings"]
        except Exception as e:  # noqa: BLE001 - any unreadable file is one message
            raise ExportError(f"{emb_path}: not a safetensors file of text embeddings "
                              f"({str(e).splitlines()[0][:120]})") from None
        classes, novel = info.get("classes"), info.get("novel")
        if not isinstance(classes, list) or not isinstance(novel, list):
            raise ExportError(f"{meta_path}: 'classes' and 'novel' must be lists")
        if emb.ndim != 2 or len(emb) != len(classes) or len(novel) != len(classes):
            raise ExportError(f"{meta_path}: {len(classes)} classes, {len(novel)} novel flags "
                              f"and text embeddings of shape {tuple(emb.shape)} disagree")
        return cls(classes, F.normalize(emb.float(), dim=-1), [bool(n) for n in novel],
                   info.get("teacher_fingerprint"))


def parse_vocabulary(spec: str | Sequence[str]) -> list[list[str]]:
    """Classes from a names file (one class per line; synonyms separated by ``|``; ``#``
    comments and blank lines skipped), a comma-separated string, or a list of names.

    ``"cat|kitty,dog"`` -> ``[["cat", "kitty"], ["dog"]]``. An empty vocabulary or a
    name given twice raises :class:`ExportError`.
    """
    source = "the vocabulary"
    if isinstance(spec, str):
        path = Path(spec)
        if path.suffix in (".txt", ".names") or path.is_file():
            if not path.is_file():
                raise ExportError(f"{path}: vocabulary file not found")
            source = str(path)
            items = [line.split("#", 1)[0] for line in path.read_text().splitlines()]
        else:
            items = spec.split(",")
    else:
        items = list(spec)
    classes = [[n.strip() for n in item.split("|") if n.strip()] for item in items]
    classes = [c for c in classes if c]
    if not classes:
        raise ExportError(f"{source}: no class names")
    seen: dict[str, int] = {}
    for k, names in enumerate(classes):
        for n in names:
            if n.lower() in seen:
                raise ExportError(f"{source}: class name {n!r} given twice")
            seen[n.lower()] = k
    return classes


def embed_vocabulary(teacher, classes: Sequence[Sequence[str]],
                     novel: Sequence[bool] | None = None) -> Vocabulary:
    """Embed every synonym with ``teacher.text`` (its prompt ensemble); average per class."""
    flat = [n for names in classes for n in names]
    emb = teacher.text(flat).float()
    rows, start = [], 0
    for names in classes:
        rows.append(F.normalize(emb[start:start + len(names)].mean(0), dim=0))
        start += len(names)
    return Vocabulary([list(c) for c in classes], torch.stack(rows),
                      list(novel) if novel is not None else [False] * len(classes),
                      teacher.fingerprint)


def write_student(directory: str | os.PathLike, state_dict: Mapping[str, Tensor],
                  config: dict, vocabulary: Vocabulary) -> Path:
    """Write the student directory; the previous content of ``directory`` stays whole until
    the new one is complete (built beside it, then swapped in by renames)."""
    from safetensors.torch import save_file

    with built_beside(directory) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()},
                  str(tmp / "model.safetensors"), metadata={"format": FORMAT})
        _write_json(tmp / "config.json", {"format": FORMAT, "version": VERSION, **config})
        vocabulary.save(tmp)
    return Path(directory)


@contextlib.contextmanager
def built_beside(directory: str | os.PathLike) -> Iterator[Path]:
    """A fresh folder beside ``directory`` to write into; renamed to ``directory`` when the
    block ends (an earlier ``directory`` stays whole until then, and is removed after),
    removed instead when the block raises."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if directory.exists():
            old = directory.parent / f".{directory.name}.{uuid.uuid4().hex}.old"
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def read_student(directory: str | os.PathLike) -> tuple[dict, dict[str, Tensor], Vocabulary]:
    """(config, state_dict, vocabulary) of an exported student; bad files are named."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not directory.is_dir():
        raise ExportError(f"{directory}: not an exported student directory "
                          f"(expected model.safetensors, config.json, vocabulary.json)")
    config = _read_json(directory / "config.json", FORMAT)
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise ExportError(f"{weights}: missing")
    try:
        state = load_file(str(weights))  # never unpickles: a pickle here is refused
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"{weights}: not a safetensors file ({str(e).splitlines()[0][:120]});"
                          f" pickled checkpoints are refused") from None
    return config, state, Vocabulary.load(directory)


def vocabulary_for(config: dict, vocabulary: Vocabulary | str | os.PathLike) -> Vocabulary:
    """``vocabulary`` (or the one at that path), checked against the student's teacher."""
    if not isinstance(vocabulary, Vocabulary):
        vocabulary = Vocabulary.load(vocabulary)
    want = config.get("teacher", {}).get("fingerprint")
    if want and vocabulary.teacher_fingerprint and vocabulary.teacher_fingerprint != want:
        raise ExportError(f"vocabulary embedded by teacher {vocabulary.teacher_fingerprint}, "
                          f"student distilled from teacher {want}: re-embed the names with "
                          f"tools/export.py --vocabulary")
    return vocabulary


def load_model(directory: str | os.PathLike, task: str, build,
               device: str | torch.device = "cpu"
               ) -> tuple[torch.nn.Module, Vocabulary, dict]:
    """(model on ``device``, vocabulary, config) of an exported ``task`` student;
    ``build(**config["model"], embed_dim=D)`` makes the empty model that the weights must
    fit exactly."""
    config, state, vocabulary = read_student(directory)
    if config.get("task") != task:
        other = {"detection": "detectors", "segmentation": "segmentors"}.get(config.get("task"))
        raise ExportError(f"{Path(directory) / 'config.json'}: task {config.get('task')!r}, not "
                          f"a {task} student" + (f" ({other}.load_student reads it)" if other else ""))
    model = build(**config["model"], embed_dim=int(config["embed_dim"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ExportError(f"{Path(directory) / 'model.safetensors'}: does not fit "
                          f"{config['model'].get('name')}: missing {sorted(missing)[:3]}, "
                          f"unexpected {sorted(unexpected)[:3]}")
    return model.to(device), vocabulary, config


def onnx_providers(available: Sequence[str] | None = None) -> list[str]:
    """ONNX Runtime execution providers to run with: CUDA first when this onnxruntime build
    offers it (``onnxruntime-gpu``), always the CPU as the fallback."""
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
            if p in available or p == "CPUExecutionProvider"]


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime session of ``path`` on :func:`onnx_providers`; a missing file names
    how to write it."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (write it with tools/export.py --onnx)")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=onnx_providers())


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path, fmt: str) -> dict:
    if not path.is_file():
        raise ExportError(f"{path}: missing")
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(info, dict) or info.get("format") != fmt:
        raise ExportError(f"{path}: not an {fmt} file (format {info.get('format') if isinstance(info, dict) else None!r})")
    if info.get("version") != VERSION:
        raise ExportError(f"{path}: {fmt} version {info.get('version')!r}; this ovdistill "
                          f"reads version {VERSION}")
    return info


def as_image_tensor(image, bgr: bool = False) -> torch.Tensor:
    """A path, a PIL image or a numpy array (H, W, 3) uint8 -> (3, H, W) uint8 RGB tensor.

    Numpy arrays are RGB unless ``bgr=True`` (as OpenCV's ``cv2.imread`` returns them);
    grey (H, W) arrays and RGBA images are converted.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image not found: {path}")
        try:
            with Image.open(path) as im:
                image = np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{path}: not a readable image ({e})") from None
    elif isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    elif isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise ValueError(f"image array of shape {image.shape}: expected (H, W, 3)")
        image = image[..., :3]
        if bgr:
            image = image[..., ::-1]
        if image.dtype != np.uint8:
            if image.dtype.kind == "f" and image.max() <= 1.0:
                image = image * 255
            image = np.clip(image, 0, 255).astype(np.uint8)
    else:
        raise TypeError(f"cannot read an image from {type(image).__name__}: give a path, "
                        f"a PIL image or an (H, W, 3) numpy array")
    image = np.ascontiguousarray(image)
    if not image.flags.writeable:  # PIL's arrays are read-only; torch wants to own one
        image = image.copy()
    return torch.from_numpy(image).permute(2, 0, 1)
