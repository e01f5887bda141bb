"""The frozen teacher: one adapter over any open_clip model.

Images are RGB tensors ``(3, H, W)``, uint8 or float, with values in [0, 255]
(not [0, 1]); the teacher applies its own mean/std normalisation. Boxes are
``(N, 4)`` xyxy in pixels of that image. Every embedding it returns is
L2-normalised, float32, on the teacher's device, and an ordinary tensor (not an
inference-mode tensor, so it can serve as a loss target or classifier weight).

    teacher = Teacher.from_config(cfg.teacher)      # or build_teacher(**fields)
    classifier = teacher.text(["star", "ring"])     # (C, D) prompt ensemble
    targets = teacher.regions(image, boxes)         # (N, D) ViLD: 1x + 1.5x crops
    pixels = teacher.dense(image)                   # (D, h, w) MaskCLIP
    key = teacher.fingerprint                       # changes with anything above

A teacher is loaded from an open_clip model name and ``pretrained`` (a local
checkpoint file, .safetensors or torch, loaded by open_clip itself; an
open_clip tag; or None for random weights), or from a custom model JSON
(``model_config``) that is registered with ``open_clip.add_model_config``; open_clip
names such a model by the JSON's file stem, so ``model`` must equal that stem.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import json
import math
import os
import re
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save
from torch import Tensor, nn

from distill.config import ConfigError, TeacherConfig, atomic_write
from distill.teacher import prompts
from distill.teacher.dense import DENSE_MODES, dense_features, dense_stride, pool_regions

REGION_MODES = ("crop", "dense")
_CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".npz")
_TEXT_CACHE: OrderedDict[tuple, Tensor] = OrderedDict()  # (fingerprint, names, templates)
_TEXT_CACHE_SIZE = 32


def cut_crops(images: Tensor, rois: Tensor, size: tuple[int, int],
              pyramid: dict[int, Tensor] | None = None) -> Tensor:
    """Antialiased bilinear crop-and-resize: (K, 3, *size).

    images (B, 3, H, W); rois (K, 5) = (batch index, x0, y0, x1, y1) in pixels, pixel
    centres at i + 0.5 (``roi_align(aligned=True)``'s convention). Each output pixel is
    one bilinear sample, at its centre, of a mip-map level of the image: level ``l`` is
    the image averaged over 2^l x 2^l blocks, with ``l = floor(log2(crop / size))`` (0
    for crops no larger than ``size``), so a downscaled crop averages the pixels it
    covers instead of aliasing. Samples are clamped to the image border. One
    ``grid_sample`` per (image, level) cuts all their crops; roi_align with a fixed
    2 x 2 sampling cost ~10x more here than the tiny teacher's encoder (docs/benchmarks.md).
    ``pyramid`` (level -> averaged images), filled as levels are needed, lets calls on
    the same images share the averaging.
    """
    rois = rois.to(images.device, torch.float32)
    out = images.new_empty(len(rois), images.shape[1], *size)
    if len(rois) == 0:
        return out
    height, width = images.shape[-2:]
    extent = torch.maximum((rois[:, 3] - rois[:, 1]) / size[1], (rois[:, 4] - rois[:, 2]) / size[0])
    levels = torch.floor(torch.log2(extent.clamp(min=1.0))).long()
    levels = levels.clamp(max=int(math.log2(max(min(height, width), 1))))
    tx = (torch.arange(size[1], device=images.device) + 0.5) / size[1]
    ty = (torch.arange(size[0], device=images.device) + 0.5) / size[0]
    pyramid = {} if pyramid is None else pyramid
    for level in levels.unique().tolist():
        k = 2 ** level
        if level not in pyramid:
            pyramid[level] = F.avg_pool2d(images, k, ceil_mode=True) if k > 1 else images
        pyr = pyramid[level]
        # normalised coordinates: -1 and 1 are the outer edges of the level's pixels
        span_x, span_y = pyr.shape[-1] * k, pyr.shape[-2] * k
        for b in rois[levels == level, 0].unique().long().tolist():
            sel = ((levels == level) & (rois[:, 0] == b)).nonzero().flatten()
            box = rois[sel, 1:]
            gx = (box[:, 0:1] + tx * (box[:, 2:3] - box[:, 0:1])) * (2 / span_x) - 1
            gy = (box[:, 1:2] + ty * (box[:, 3:4] - box[:, 1:2])) * (2 / span_y) - 1
            grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), -1)
            crops = F.grid_sample(pyr[b:b + 1], grid.view(1, -1, size[1], 2), mode="bilinear",
                                  padding_mode="border", align_corners=False)
            out[sel] = crops.view(images.shape[1], len(sel), *size).transpose(0, 1)
    return out


class TeacherError(ConfigError):
    """The teacher cannot be built as configured; the message is one line."""


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " | ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _state_dict_mismatch(msg: str) -> str | None:
    """Summarise torch's load_state_dict error: counts and one example of each kind."""
    if "Error(s) in loading state_dict" not in msg:
        return None
    parts = []
    for kind, pattern in (("missing", r"Missing key\(s\) in state_dict: (.*)"),
                          ("unexpected", r"Unexpected key\(s\) in state_dict: (.*)")):
        m = re.search(pattern, msg)
        if m:
            keys = re.findall(r'"([^"]+)"', m.group(1))
            parts.append(f"{len(keys)} {kind} keys (e.g. {keys[0]})")
    shapes = re.findall(r"size mismatch for ([^:]+): copying a param with shape "
                        r"torch.Size\((\[[^]]*\])\) from checkpoint, "
                        r"the shape in current model is torch.Size\((\[[^]]*\])\)", msg)
    if shapes:
        k, a, b = shapes[0]
        parts.append(f"{len(shapes)} shape mismatches (e.g. {k}: checkpoint {a}, model {b})")
    return "weights do not fit: " + ", ".join(parts)


# --------------------------------------------------------------------------- loading


def register_model_config(path: str | os.PathLike) -> str:
    """Register a custom open_clip model JSON; returns its model name (the file stem)."""
    path = Path(path)
    if not path.is_file():
        raise TeacherError(f"teacher model_config not found: {path}")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TeacherError(f"{path}: malformed JSON: {e}") from None
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise TeacherError(f"{path}: not an open_clip model config (missing {missing})")
    open_clip.add_model_config(path)
    return path.stem


def _check_name(name: str) -> None:
    if name.startswith(("hf-hub:", "local-dir:")) or name in open_clip.list_models():
        return
    close = difflib.get_close_matches(name, open_clip.list_models(), n=5, cutoff=0.5)
    hint = f"; closest: {', '.join(close)}" if close else ""
    raise TeacherError(f"unknown open_clip model '{name}'{hint} (see open_clip.list_models())")


def _check_pretrained(name: str, pretrained: str) -> None:
    if os.path.isfile(pretrained):
        return
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained in tags:
        return
    if os.sep in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES):
        raise TeacherError(f"pretrained checkpoint file not found: {pretrained}")
    raise TeacherError(f"pretrained '{pretrained}' is neither a file nor a tag of '{name}' "
                       f"(tags: {', '.join(tags) or 'none'})")


def load_clip(
    model: str,
    pretrained: str | None = None,
    model_config: str | None = None,
    device: str = "cpu",
) -> tuple[nn.Module, dict | None]:
    """Build an open_clip model through its public API; returns (model, model config dict)."""
    if model_config:
        stem = register_model_config(model_config)
        if model != stem:
            raise TeacherError(f"teacher.model '{model}' must be the model_config's file stem "
                               f"'{stem}' (open_clip names registered configs by stem)")
    _check_name(model)
    if pretrained:
        _check_pretrained(model, pretrained)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # random weights (pretrained None) are the same every time
            clip = open_clip.create_model(model, pretrained=pretrained or None, device=device)
    except Exception as e:  # open_clip raises RuntimeError / KeyError / safetensors errors
        why = _state_dict_mismatch(str(e)) or _one_line(e)
        raise TeacherError(f"cannot load pretrained '{pretrained}' into '{model}': {why}") from None
    return clip, open_clip.get_model_config(model)


def save_clip(model: nn.Module, path: str | os.PathLike) -> None:
    """``model``'s state_dict as a safetensors file that open_clip loads with
    ``pretrained=<path>`` (one atomic write)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, save(state))


@functools.lru_cache(maxsize=8)
def _tokenizer(model_name: str, model_cfg_json: str):
    """open_clip's tokenizer for a model; cached (building the BPE tables takes ~0.3 s)."""
    return open_clip.get_tokenizer(model_name)


def prompt_ensemble(model: nn.Module, tokenizer, names: Sequence[str], templates: Sequence[str],
                    batch_size: int = 256, device: str | torch.device = "cpu") -> Tensor:
    """(C, D) float32: per name, every template filled in and embedded by ``model``'s text
    tower, normalised, averaged, normalised again (open_clip's zero-shot classifier)."""
    with torch.inference_mode():
        fns = [functools.partial(prompts.fill, t) for t in templates]
        out = open_clip.build_zero_shot_classifier(
            model, tokenizer, list(names), fns,
            num_classes_per_batch=max(1, batch_size // len(templates)), device=device).T.float()
    return out.clone()  # an ordinary tensor, not an inference tensor


# --------------------------------------------------------------------------- boxes


def enlarge_boxes(boxes: Tensor, scale: float, height: int, width: int) -> Tensor:
    """boxes (N, 4) xyxy -> (N, 4): scaled about their centres, clipped to the image."""
    boxes = boxes.float()
    c = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) * (scale / 2)
    out = torch.cat([c - half, c + half], dim=1)
    out[:, 0::2] = out[:, 0::2].clamp(0, width)
    out[:, 1::2] = out[:, 1::2].clamp(0, height)
    return out


def _as_list(image: Tensor | Sequence[Tensor], boxes: Tensor | Sequence[Tensor]
             ) -> tuple[list[Tensor], list[Tensor], bool]:
    if isinstance(image, Tensor) and image.dim() == 3:
        return [image], [torch.as_tensor(boxes).reshape(-1, 4)], True
    images = list(image)
    boxes = [torch.as_tensor(b).reshape(-1, 4) for b in boxes]
    if len(images) != len(boxes):
        raise ValueError(f"{len(images)} images but {len(boxes)} box tensors")
    return images, boxes, False


# --------------------------------------------------------------------------- teacher


class Teacher(nn.Module):
    """A frozen open_clip model that embeds class names, regions and pixels.

    Always in eval mode (``train()`` is a no-op), no parameter requires grad.
    ``crop_scales`` (ViLD: 1x and 1.5x) and ``region_mode`` set :meth:`regions`;
    ``dense_mode`` sets :meth:`dense`; ``templates`` (a set name from
    :mod:`distill.teacher.prompts` or a list) sets :meth:`text`.
    """

    def __init__(
        self,
        model: nn.Module,
        model_name: str,
        *,
        model_cfg: dict | None = None,
        templates: str | Sequence[str] = "openai_imagenet",
        region_mode: str = "crop",
        crop_scales: Sequence[float] = (1.0, 1.5),
        dense_mode: str = "maskclip",
        dense_short_side: int = 0,
        batch_size: int = 256,
        temperature: float | None = None,
        dense_visual: nn.Module | None = None,
        amp_dtype: str | None = None,
    ):
        super().__init__()
        if amp_dtype not in (None, "bfloat16", "float16"):
            raise TeacherError(f"amp_dtype must be bfloat16, float16 or null, got {amp_dtype!r}")
        self.amp_dtype = amp_dtype
        if temperature is not None and temperature <= 0:
            raise TeacherError(f"temperature must be positive (or null), got {temperature}")
        self._temperature = temperature
        if region_mode not in REGION_MODES:
            raise TeacherError(f"region_mode must be one of {REGION_MODES}, got '{region_mode}'")
        if dense_mode not in DENSE_MODES:
            raise TeacherError(f"dense_mode must be one of {DENSE_MODES}, got '{dense_mode}'")
        if not crop_scales or any(s <= 0 for s in crop_scales):
            raise TeacherError(f"crop_scales must be positive numbers, got {list(crop_scales)}")
        if batch_size < 1:
            raise TeacherError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        # the image tower of the dense path: a refined copy (CLIPSelf, teacher.dense_pretrained)
        # or, when None, the model's own
        self.dense_visual = dense_visual
        self.model_name = model_name
        if model_cfg is None and model_name in open_clip.list_models():
            model_cfg = open_clip.get_model_config(model_name)
        self.model_cfg = model_cfg
        self.templates = prompts.templates(templates)
        self.region_mode = region_mode
        self.crop_scales = tuple(float(s) for s in crop_scales)
        self.dense_mode = dense_mode
        self.dense_short_side = dense_short_side
        self.batch_size = batch_size
        self.tokenizer = _tokenizer(model_name, json.dumps(model_cfg, sort_keys=True))
        pp = open_clip.get_model_preprocess_cfg(model)
        size = pp.get("size", getattr(model.visual, "image_size", 224))
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self.mean: tuple[float, ...] = tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std: tuple[float, ...] = tuple(pp.get("std", open_clip.OPENAI_DATASET_STD))
        self.requires_grad_(False)
        super().train(False)
        self.embed_dim: int = getattr(model.visual, "output_dim", None) or self._probe_dim()

    def _probe_dim(self) -> int:
        with torch.inference_mode():
            return self.model.encode_text(self.tokenizer([""]).to(self.device)).shape[-1]

    @classmethod
    def from_config(cls, cfg: TeacherConfig) -> Teacher:
        return build_teacher(**{k: getattr(cfg, k) for k in cfg.__dataclass_fields__})

    def train(self, mode: bool = True) -> Teacher:
        """The teacher stays in eval mode whatever ``mode`` says."""
        return super().train(False)

    # ------------------------------------------------------------------- facts

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @functools.cached_property
    def temperature(self) -> float:
        """The teacher's own text logits are cosine / temperature: ``teacher.temperature``,
        else 1 / its learned logit scale (CLIP: 0.01)."""
        if self._temperature is not None:
            return float(self._temperature)
        return 1.0 / float(self.model.logit_scale.exp())

    @functools.cached_property
    def fingerprint(self) -> str:
        """16 hex digits over everything that determines the embeddings: model name and
        config, weights (every state_dict tensor's bytes), templates, crop rule, region and
        dense modes, input size, mean/std. Computed once (the teacher is frozen)."""
        h = hashlib.sha256()
        state = dict(self.model.state_dict())
        if self.dense_visual is not None:  # a refined dense tower: its weights count too
            state.update({f"dense_visual.{k}": v for k, v in self.dense_visual.state_dict().items()})
        for key, t in sorted(state.items()):
            t = t.detach().cpu().contiguous().reshape(-1)
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.view(torch.uint8).numpy())
        spec = {
            "model": self.model_name, "model_cfg": self.model_cfg, "weights": h.hexdigest(),
            "templates": list(self.templates), "region_mode": self.region_mode,
            "crop_scales": list(self.crop_scales), "dense_mode": self.dense_mode,
            "dense_short_side": self.dense_short_side, "image_size": list(self.image_size),
            "mean": list(self.mean), "std": list(self.std),
        }
        if self._amp_active():  # other numbers than float32: another cache
            spec["amp_dtype"] = self.amp_dtype
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------- text

    def text(self, names: Sequence[str], templates: str | Sequence[str] | None = None) -> Tensor:
        """Prompt ensemble: (C, D); per class, every template embedded, normalised,
        averaged, normalised again. Cached per (fingerprint, names, templates)."""
        tpl = self.templates if templates is None else prompts.templates(templates)
        names = tuple(names)
        key = (self.fingerprint, names, tpl)
        if key not in _TEXT_CACHE:
            if not names:
                out = torch.zeros(0, self.embed_dim, device=self.device)
            else:
                out = prompt_ensemble(self.model, self.tokenizer, names, tpl, self.batch_size,
                                      self.device)
            _TEXT_CACHE[key] = out
            while len(_TEXT_CACHE) > _TEXT_CACHE_SIZE:
                _TEXT_CACHE.popitem(last=False)
        _TEXT_CACHE.move_to_end(key)
        return _TEXT_CACHE[key].clone()

    def _text_tower(self) -> tuple[nn.Module, int, int]:
        """(word embedding, context length, word width) of the text tower; a tokenizer or a
        tower that reads no start / end token ids (BARON's sentences need them) is refused."""
        tower = getattr(self.model, "text", self.model)  # CustomTextCLIP keeps it apart
        embedding = getattr(tower, "token_embedding", None)
        context = getattr(tower, "context_length", None) or getattr(self.model, "context_length", None)
        if (embedding is None or context is None or getattr(tower, "cls_emb", None) is not None
                or not hasattr(self.tokenizer, "sot_token_id")):
            raise TeacherError(f"teacher {self.model_name}: BARON's pseudo-word sentences need a "
                               f"CLIP text tower with open_clip's own tokenizer")
        return embedding, int(context), int(embedding.weight.shape[1])

    @property
    def context_length(self) -> int:
        """Tokens the text tower reads, start and end tokens included (CLIP: 77)."""
        return self._text_tower()[1]

    @property
    def word_width(self) -> int:
        """The width of the text tower's word embeddings (pseudo-words must have it)."""
        return self._text_tower()[2]

    def pseudo_text(self, words: Tensor, lengths: Tensor) -> Tensor:
        """BARON's pseudo-word sentences through the frozen text tower: words (S, L, W), the
        first ``lengths`` (S,) of each row read as the sentence [start, words, end] ->
        (S, D) L2-normalised, differentiable in ``words`` (the tower gets no gradient).

        The tower runs as for text: its word embedding of the start and end tokens, the
        pseudo-words in between, then its positions, transformer, final norm and projection
        at the end token (:meth:`open_clip.CLIP.encode_text`, whose word embedding is swapped
        for the pseudo-words by a forward hook)."""
        embedding, context, width = self._text_tower()
        s, length, w = words.shape
        if w != width or length + 2 > context:
            raise ValueError(f"pseudo-words {tuple(words.shape)} do not fit the text tower "
                             f"(width {width}, at most {context - 2} words)")
        if s == 0:
            return words.new_zeros(0, self.embed_dim)
        lengths = lengths.to(self.device)
        tokens = torch.zeros(s, context, dtype=torch.long, device=self.device)
        tokens[:, 0] = self.tokenizer.sot_token_id
        tokens[torch.arange(s, device=self.device), lengths + 1] = self.tokenizer.eot_token_id
        slots = torch.zeros(s, context, dtype=torch.bool, device=self.device)
        slots[:, 1:length + 1] = torch.arange(length, device=self.device) < lengths[:, None]
        padded = F.pad(words.to(self.device), (0, 0, 1, context - length - 1))

        def swap(module, args, out):
            return torch.where(slots[..., None], padded.to(out.dtype), out)

        handle = embedding.register_forward_hook(swap)
        try:
            out = self.model.encode_text(tokens)
        finally:
            handle.remove()
        return F.normalize(out.float(), dim=-1)

    # ------------------------------------------------------------------- images

    def normalize(self, image: Tensor) -> Tensor:
        """(3, H, W) or (B, 3, H, W) in [0, 255] -> float32 on the teacher's device, mean/std."""
        x = image.to(self.device, torch.float32)
        if x.dim() == 3:
            x = x[None]
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(
                f"expected an RGB image (3, H, W) or (B, 3, H, W), got {tuple(image.shape)}")
        mean = torch.tensor(self.mean).to(x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std).to(x.device).view(1, 3, 1, 1)
        return (x / 255.0 - mean) / std

    def encode_crops(self, crops: Tensor) -> Tensor:
        """crops (N, 3, S, S) already normalised -> (N, D) L2-normalised, in batches."""
        with torch.inference_mode():
            out = self._encode(crops.to(self.device))
        return out.clone()

    def _amp_active(self) -> bool:
        return self.amp_dtype is not None and self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        """The image tower's precision: autocast to ``amp_dtype`` on CUDA, else float32."""
        if not self._amp_active():
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=getattr(torch, self.amp_dtype))

    def _encode(self, crops: Tensor) -> Tensor:
        if len(crops) == 0:
            return torch.zeros(0, self.embed_dim, device=self.device)
        with self.autocast():
            out = [self.model.encode_image(c) for c in crops.split(self.batch_size)]
        return torch.cat([F.normalize(o.float(), dim=-1) for o in out])

    def _stack(self, images: list[Tensor]) -> Tensor:
        """Normalised (B, 3, Hmax, Wmax); smaller images edge-padded, which is what
        roi_align's border clamping would read from the unpadded image."""
        xs = [self.normalize(im)[0] for im in images]
        hmax, wmax = max(x.shape[1] for x in xs), max(x.shape[2] for x in xs)
        return torch.stack([
            x if x.shape[1:] == (hmax, wmax) else
            F.pad(x[None], (0, wmax - x.shape[2], 0, hmax - x.shape[1]), mode="replicate")[0]
            for x in xs])

    def crop_rois(self, images: list[Tensor], boxes: list[Tensor]) -> Tensor:
        """RoIs (K * N, 5) [image index, x1, y1, x2, y2] for every crop scale (scale-major)
        of every box (N over all images), enlarged and clipped per :func:`enlarge_boxes`."""
        rois = []
        for scale in self.crop_scales:
            for i, (im, b) in enumerate(zip(images, boxes, strict=True)):
                e = enlarge_boxes(b.cpu(), scale, im.shape[-2], im.shape[-1])
                rois.append(torch.cat([torch.full((len(e), 1), float(i)), e], dim=1))
        return torch.cat(rois).to(self.device)

    def crops(self, stacked: Tensor, rois: Tensor,
              pyramid: dict[int, Tensor] | None = None) -> Tensor:
        """Crop-and-resize to the input size: (K, 3, S, S); see :func:`cut_crops`."""
        return cut_crops(stacked, rois, self.image_size, pyramid)

    def regions(
        self,
        image: Tensor | Sequence[Tensor],
        boxes: Tensor | Sequence[Tensor],
        mode: str | None = None,
    ) -> Tensor | list[Tensor]:
        """Region embeddings, L2-normalised.

        image (3, H, W) in [0, 255] with boxes (N, 4) xyxy pixels -> (N, D); or a list
        of images with a list of boxes -> a list of (N_i, D), batched across images.
        ``crop`` (ViLD): per box, the crops at each of ``crop_scales`` (enlarged about
        the centre, clipped to the image), each resized to the input size and encoded,
        each embedding normalised; summed, normalised. ``dense``: the box (clipped to
        the image) average of :meth:`dense` (RoIAlign, one output bin, adaptive
        sampling), normalised; one tower pass per image.
        """
        mode = mode or self.region_mode
        if mode not in REGION_MODES:
            raise ValueError(f"region mode must be one of {REGION_MODES}, got '{mode}'")
        images, boxes, single = _as_list(image, boxes)
        counts = [len(b) for b in boxes]
        if sum(counts) == 0:
            out = [torch.zeros(0, self.embed_dim, device=self.device) for _ in counts]
        elif mode == "crop":
            out = list(self._crop_regions(images, boxes).split(counts))
        else:
            out = [self._dense_regions(im, b) for im, b in zip(images, boxes, strict=True)]
        return out[0] if single else out

    def _crop_regions(self, images: list[Tensor], boxes: list[Tensor]) -> Tensor:
        with torch.inference_mode():
            stacked = self._stack(images)
            rois = self.crop_rois(images, boxes)
            # cut crops one encoder batch at a time: memory stays at batch_size crops
            pyramid: dict[int, Tensor] = {}
            emb = torch.cat([self._encode(self.crops(stacked, r, pyramid))
                             for r in rois.split(self.batch_size)])
            n = sum(len(b) for b in boxes)
            emb = F.normalize(emb.view(len(self.crop_scales), n, -1).sum(0), dim=-1)
        return emb.clone()

    def _dense_regions(self, image: Tensor, boxes: Tensor) -> Tensor:
        if len(boxes) == 0:
            return torch.zeros(0, self.embed_dim, device=self.device)
        fmap = self.dense(image)  # (D, h, w)
        with torch.inference_mode():
            b = enlarge_boxes(boxes.cpu(), 1.0, image.shape[-2], image.shape[-1]).to(fmap.device)
            out = F.normalize(pool_regions(fmap, b, tuple(image.shape[-2:])), dim=-1)
        return out.clone()

    @property
    def dense_tower(self) -> nn.Module:
        """The image tower :meth:`dense` runs: the refined one, else the model's own."""
        return self.dense_visual if self.dense_visual is not None else self.model.visual

    def dense_size(self, height: int, width: int) -> tuple[int, int]:
        """Input size for :meth:`dense`: the image's own size, or scaled to a short side of
        ``dense_short_side`` when that is set (> 0), rounded to the nearest multiple of the
        tower's stride (patch size for ViT, 32 for ResNet)."""
        if self.dense_short_side > 0:
            scale = self.dense_short_side / min(height, width)
            height, width = height * scale, width * scale
        sy, sx = dense_stride(self.dense_tower)
        return max(sy, round(height / sy) * sy), max(sx, round(width / sx) * sx)

    def dense(self, image: Tensor, size: int | tuple[int, int] | None = None,
              mode: str | None = None, keys: bool = False,
              with_keys: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """MaskCLIP pixel embeddings: (3, H, W) -> (D, h, w), or (B, 3, H, W) -> (B, D, h, w).

        The image is resized (bilinear, antialiased) to ``size`` or to
        :meth:`dense_size` (its own resolution rounded to the stride; ViT positional
        embeddings are interpolated to the grid), run once through the tower with
        ``mode`` (default ``dense_mode``) and L2-normalised per location.
        ``h, w = size / stride``. ``keys``: the last attention's keys on the same grid
        instead (not normalised), for MaskCLIP's key smoothing; ``with_keys``: (embeddings,
        keys) from one pass of the tower.
        """
        single = image.dim() == 3
        with torch.inference_mode():
            x = self.normalize(image)
            if size is None:
                target = self.dense_size(*x.shape[-2:])
            else:
                target = (size, size) if isinstance(size, int) else tuple(size)
            if tuple(x.shape[-2:]) != target:
                x = F.interpolate(x, size=target, mode="bilinear", align_corners=False,
                                  antialias=True)
            with self.autocast():
                out = dense_features(self.dense_tower, x, mode or self.dense_mode, keys,
                                     with_keys)
            feats, k = out if with_keys else ((None, out) if keys else (out, None))
            if feats is not None:
                feats = F.normalize(feats.float(), dim=1).clone()
            if k is not None:
                k = k.float().clone()
        if single:
            feats, k = (None if feats is None else feats[0]), (None if k is None else k[0])
        return (feats, k) if with_keys else (k if keys else feats)


def build_teacher(
    model: str = "ViT-B-32",
    pretrained: str | None = None,
    model_config: str | None = None,
    templates: str | Sequence[str] = "openai_imagenet",
    region_mode: str = "crop",
    crop_scales: Sequence[float] = (1.0, 1.5),
    dense_mode: str = "maskclip",
    dense_short_side: int = 0,
    batch_size: int = 256,
    device: str = "cpu",
    temperature: float | None = None,
    dense_pretrained: str | None = None,
    amp_dtype: str | None = None,
    **unknown: Any,
) -> Teacher:
    """Build a :class:`Teacher` from the fields of :class:`~distill.config.TeacherConfig`."""
    if unknown:
        raise TeacherError(f"unknown teacher option(s): {', '.join(sorted(unknown))}")
    from distill.engine import resolve_device  # cuda -> this rank's GPU under torchrun

    clip, model_cfg = load_clip(model, pretrained, model_config, str(resolve_device(device)))
    dense_visual = None
    if dense_pretrained:  # the same model with a refined image tower: its tower only
        dense_visual = load_clip(model, dense_pretrained, model_config,
                                 str(resolve_device(device)))[0].visual
    return Teacher(clip, model, model_cfg=model_cfg, templates=templates,
                   region_mode=region_mode, crop_scales=crop_scales, dense_mode=dense_mode,
                   dense_short_side=dense_short_side, batch_size=batch_size,
                   temperature=temperature, dense_visual=dense_visual, amp_dtype=amp_dtype)
