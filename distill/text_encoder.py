"""The teacher's text tower alone, carried by an export so that names typed at run time are
embedded without the teacher (``tools/export.py --text-encoder``): no image tower, no
teacher checkpoint, the same prompt ensemble as :meth:`distill.teacher.Teacher.text`.

    <export>/text_encoder/
      config.json                    format, teacher fingerprint, templates, tokenizer settings
      <name>.json                    open_clip's model config, its image tower a stub
      model.safetensors              the text tower's weights (everything but ``visual.*``)
      bpe_simple_vocab_16e6.txt.gz   the tokenizer's byte-pair table (open_clip's SimpleTokenizer)
      text.onnx                      with --onnx: token ids (N, L) int64 -> (N, D) normalised

    encoder = TextEncoder.load("student/text_encoder")
    vocab = embed_vocabulary(encoder, parse_vocabulary("bolt,star"))   # as with the teacher

Loading needs open_clip (its tokenizer and text transformer), which the image path of an
export does not: this module imports it only when a text encoder is loaded or written.
:class:`TypedNames` is what a student's ``predict(image, names=...)`` calls.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.export import (
    ExportError,
    Vocabulary,
    _read_json,
    built_beside,
    embed_vocabulary,
    onnx_session,
    parse_vocabulary,
)

FORMAT = "ovdistill-text-encoder"
VERSION = 1
BPE = "bpe_simple_vocab_16e6.txt.gz"
MAX_NAMES = 64  # names typed at run time, per call (TypedNames)
# the image tower the text tower is built beside (open_clip builds both): as small as it goes
STUB_VISION = {"image_size": 16, "layers": 1, "width": 32, "head_width": 32, "patch_size": 16}


def write_text_encoder(teacher, directory: str | os.PathLike, onnx: bool = False) -> Path:
    """The text tower of ``teacher`` (a :class:`distill.teacher.Teacher`) into ``directory``
    (built beside it, then renamed in: an earlier one stays whole until then); ``onnx``
    adds ``text.onnx``. A teacher whose tokenizer is not open_clip's own BPE tokenizer
    (e.g. a Hugging Face text tower) is refused."""
    from open_clip.tokenizer import SimpleTokenizer, default_bpe
    from safetensors.torch import save_file

    if not isinstance(teacher.tokenizer, SimpleTokenizer) or teacher.model_cfg is None:
        raise ExportError(f"--text-encoder: teacher {teacher.model_name} has no open_clip BPE "
                          f"tokenizer and model config to carry (Hugging Face text towers are "
                          f"not supported)")
    with built_beside(directory) as tmp:
        name = f"ovdistill_text_{teacher.fingerprint}"  # never a name open_clip has built in
        text_cfg = teacher.model_cfg["text_cfg"]
        (tmp / f"{name}.json").write_text(json.dumps(
            {**teacher.model_cfg, "vision_cfg": STUB_VISION}, indent=2) + "\n")
        save_file({k: v.detach().float().contiguous().cpu()
                   for k, v in teacher.model.state_dict().items()
                   if not k.startswith("visual.")}, str(tmp / "model.safetensors"),
                  metadata={"format": FORMAT})
        shutil.copyfile(default_bpe(), tmp / BPE)
        (tmp / "config.json").write_text(json.dumps({
            "format": FORMAT, "version": VERSION, "model": name,
            "teacher": {"model": teacher.model_name, "fingerprint": teacher.fingerprint},
            "templates": list(teacher.templates), "embed_dim": teacher.embed_dim,
            "tokenizer": {"bpe": BPE, "context_length": int(teacher.tokenizer.context_length),
                          **text_cfg.get("tokenizer_kwargs", {})}}, indent=2) + "\n")
        if onnx:
            export_onnx(TextEncoder.load(tmp), tmp / "text.onnx")
    return Path(directory)


class TextEncoder:
    """Class names -> (C, D) text embeddings, as the teacher's :meth:`text` gives them, from
    an export's ``text_encoder/`` alone. ``fingerprint`` is the teacher's (a vocabulary
    embedded here fits the students distilled from it)."""

    def __init__(self, model: nn.Module, tokenizer, templates: Sequence[str], fingerprint: str,
                 embed_dim: int, batch_size: int = 256) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.templates = tuple(templates)
        self.fingerprint, self.embed_dim, self.batch_size = fingerprint, embed_dim, batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu"
             ) -> TextEncoder:
        from open_clip.tokenizer import SimpleTokenizer
        from safetensors.torch import load_file

        from distill.teacher.clip import load_clip

        directory = Path(directory)
        config = _read_json(directory / "config.json", FORMAT)
        name = config["model"]
        logging.disable(logging.WARNING)  # open_clip warns of random weights: loaded below
        try:
            model, _ = load_clip(name, None, str(directory / f"{name}.json"))
        finally:
            logging.disable(logging.NOTSET)
        weights = directory / "model.safetensors"
        try:
            state = load_file(str(weights))
        except Exception as e:  # noqa: BLE001 - any unreadable file is one message
            raise ExportError(f"{weights}: not a safetensors file "
                              f"({str(e).splitlines()[0][:120]})") from None
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("visual.")]
        if missing or unexpected:
            raise ExportError(f"{weights}: does not fit its text tower: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
        tok = dict(config["tokenizer"])
        tokenizer = SimpleTokenizer(bpe_path=str(directory / tok.pop("bpe")), **tok)
        return cls(model.to(device), tokenizer, config["templates"],
                   config["teacher"]["fingerprint"], int(config["embed_dim"]))

    def text(self, names: Sequence[str]) -> Tensor:
        """(C, D) float32, the prompt ensemble of each name (:func:`prompt_ensemble`)."""
        from distill.teacher.clip import prompt_ensemble

        if not names:
            return torch.zeros(0, self.embed_dim)
        return prompt_ensemble(self.model, self.tokenizer, list(names), self.templates,
                               self.batch_size, self.device)

    def encode_tokens(self, tokens: Tensor) -> Tensor:
        """Token ids (N, L) int64 -> (N, D) L2-normalised: what ``text.onnx`` computes."""
        return F.normalize(self.model.encode_text(tokens), dim=-1)


class _Tokens(nn.Module):
    def __init__(self, encoder: TextEncoder) -> None:
        super().__init__()
        self.model = encoder.model

    def forward(self, tokens: Tensor) -> Tensor:
        return F.normalize(self.model.encode_text(tokens), dim=-1)


def export_onnx(encoder: TextEncoder, path: str | os.PathLike) -> Path:
    """``text.onnx``: token ids (N, L) int64 -> embeddings (N, D) float32, L2-normalised; N
    dynamic. The prompt ensemble (fill each template, average per name, normalise) is the
    caller's: :meth:`OnnxTextEncoder.text` does it."""
    from distill.export import ONNX_OPSET

    path = Path(path)
    tokens = encoder.tokenizer(["a photo of a thing.", "a thing."])
    with torch.no_grad():
        torch.onnx.export(_Tokens(encoder).eval(), (tokens,), str(path), input_names=["tokens"],
                          output_names=["embeddings"], dynamo=False, opset_version=ONNX_OPSET,
                          dynamic_axes={"tokens": {0: "n"}, "embeddings": {0: "n"}})
    return path


class OnnxTextEncoder(TextEncoder):
    """:class:`TextEncoder` with the text tower run by ONNX Runtime from ``text.onnx``."""

    def __init__(self, directory: str | os.PathLike) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        directory = Path(directory)
        config = _read_json(directory / "config.json", FORMAT)
        tok = dict(config["tokenizer"])
        self.session = onnx_session(directory / "text.onnx")
        self.tokenizer = SimpleTokenizer(bpe_path=str(directory / tok.pop("bpe")), **tok)
        self.templates = tuple(config["templates"])
        self.fingerprint = config["teacher"]["fingerprint"]
        self.embed_dim, self.batch_size = int(config["embed_dim"]), 256

    def text(self, names: Sequence[str]) -> Tensor:
        from distill.teacher.prompts import fill

        rows = []
        for name in names:
            tokens = self.tokenizer([fill(t, name) for t in self.templates]).numpy()
            emb = torch.from_numpy(self.session.run(None, {"tokens": tokens})[0])
            rows.append(F.normalize(F.normalize(emb, dim=-1).mean(0), dim=0))
        return torch.stack(rows) if rows else torch.zeros(0, self.embed_dim)


class TypedNames:
    """Names typed at run time -> a :class:`Vocabulary`, embedded by the export's own text
    tower (``<export>/text_encoder``, written by ``tools/export.py --text-encoder``; ONNX
    Runtime runs it with ``onnx``). A class is novel unless one of its names is a training
    class (``config.json``'s ``training_names``; for older exports, the names of the export
    vocabulary's base classes). The last 32 vocabularies are kept; safe across threads."""

    CACHED = 32

    def __init__(self, directory: str | os.PathLike | None, config: dict, vocabulary: Vocabulary,
                 onnx: bool = False) -> None:
        import threading

        # None: a student not loaded from an export directory (no text encoder to find)
        self.directory = None if directory is None else Path(directory) / "text_encoder"
        self.onnx = onnx
        trained = config.get("training_names")
        if trained is None:
            trained = [n for c, novel in zip(vocabulary.classes, vocabulary.novel, strict=True)
                       if not novel for n in c]
        self.training = {n.lower() for n in trained}
        self.encoder = None
        self.cache: dict[tuple, Vocabulary] = {}
        self.lock = threading.Lock()

    def __call__(self, names: str | Sequence[str]) -> Vocabulary:
        classes = parse_vocabulary(names)
        if len(classes) > MAX_NAMES:
            raise ExportError(f"{len(classes)} names: at most {MAX_NAMES} at once")
        key = tuple(tuple(c) for c in classes)
        with self.lock:
            if key not in self.cache:
                novel = [not any(n.lower() in self.training for n in c) for c in classes]
                self.cache[key] = embed_vocabulary(self.load(), classes, novel)
                while len(self.cache) > self.CACHED:
                    self.cache.pop(next(iter(self.cache)))
            return self.cache[key]

    def for_call(self, vocabulary=None, names: str | Sequence[str] | None = None
                 ) -> Vocabulary | None:
        """The vocabulary of one ``predict`` call: ``names`` embedded, ``vocabulary``, or
        None (the student's own)."""
        if names is not None and vocabulary is not None:
            raise ValueError("give a vocabulary or names, not both")
        return self(names) if names is not None else vocabulary

    def load(self):
        """The export's text encoder (loaded once)."""
        if self.encoder is None:
            if self.directory is None:
                raise ExportError("this student was not loaded from an export directory: "
                                  "load it with load_student(<export>) to embed typed names")
            if not (self.directory / "config.json").is_file():
                raise ExportError(f"{self.directory.parent}: this export carries no text "
                                  f"encoder to embed typed names; write it with "
                                  f"tools/export.py --text-encoder")
            self.encoder = OnnxTextEncoder(self.directory) if self.onnx else \
                TextEncoder.load(self.directory)
        return self.encoder
