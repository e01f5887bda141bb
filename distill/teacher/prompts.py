"""Prompt template sets for the text prompt ensemble.

A template is a ``str.format`` string with one positional ``{}`` for the class
name and an optional ``{article}`` ("a" / "an", chosen from the name):

    fill("a photo of {article} {}.", "apple")  ->  "a photo of an apple."
    templates("openai_imagenet")               ->  80 templates (open_clip's list)

Sets: ``openai_imagenet`` (80) and ``simple`` (7) from open_clip's zero-shot
metadata, ``vild`` (ViLD's 63, with the ViLD colab's "This is " prefix on the
templates that start with "a"/"the"), ``shapes`` (the embedded synthetic world,
whose captions read like "a red star" and "a red star and a blue ring on grass").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from open_clip import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

from distill.config import ConfigError
from distill.data.vocab import COLORS


def _from_open_clip(fns: Sequence[Callable[[str], str]]) -> tuple[str, ...]:
    """open_clip's templates are ``lambda c: f"..."``; called with "{}" they give format strings."""
    return tuple(fn("{}") for fn in fns)


_VILD_RAW = (
    "There is {article} {} in the scene.", "There is the {} in the scene.",
    "a photo of {article} {} in the scene.", "a photo of the {} in the scene.",
    "a photo of one {} in the scene.",
    "itap of {article} {}.", "itap of my {}.", "itap of the {}.",
    "a photo of {article} {}.", "a photo of my {}.", "a photo of the {}.",
    "a photo of one {}.", "a photo of many {}.",
    "a good photo of {article} {}.", "a good photo of the {}.",
    "a bad photo of {article} {}.", "a bad photo of the {}.",
    "a photo of a nice {}.", "a photo of the nice {}.",
    "a photo of a cool {}.", "a photo of the cool {}.",
    "a photo of a weird {}.", "a photo of the weird {}.",
    "a photo of a small {}.", "a photo of the small {}.",
    "a photo of a large {}.", "a photo of the large {}.",
    "a photo of a clean {}.", "a photo of the clean {}.",
    "a photo of a dirty {}.", "a photo of the dirty {}.",
    "a bright photo of {article} {}.", "a bright photo of the {}.",
    "a dark photo of {article} {}.", "a dark photo of the {}.",
    "a photo of a hard to see {}.", "a photo of the hard to see {}.",
    "a low resolution photo of {article} {}.", "a low resolution photo of the {}.",
    "a cropped photo of {article} {}.", "a cropped photo of the {}.",
    "a close-up photo of {article} {}.", "a close-up photo of the {}.",
    "a jpeg corrupted photo of {article} {}.", "a jpeg corrupted photo of the {}.",
    "a blurry photo of {article} {}.", "a blurry photo of the {}.",
    "a pixelated photo of {article} {}.", "a pixelated photo of the {}.",
    "a black and white photo of the {}.", "a black and white photo of {article} {}.",
    "a plastic {}.", "the plastic {}.",
    "a toy {}.", "the toy {}.", "a plushie {}.", "the plushie {}.",
    "a cartoon {}.", "the cartoon {}.",
    "an embroidered {}.", "the embroidered {}.",
    "a painting of the {}.", "a painting of a {}.",
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "openai_imagenet": _from_open_clip(OPENAI_IMAGENET_TEMPLATES),
    "simple": _from_open_clip(SIMPLE_IMAGENET_TEMPLATES),
    "vild": tuple("This is " + t if t.startswith(("a", "the")) else t for t in _VILD_RAW),
    # the caption forms the tiny teacher is pretrained on (distill/teacher/pretrain.py)
    # the synthetic world's caption forms, averaged over its colours (the prompt
    # ensemble then describes the shape whatever its colour)
    "shapes": ("a {}", *(f"a {c} {{}}" for c in COLORS), *(f"a photo of a {c} {{}}" for c in COLORS)),
}


def article(name: str) -> str:
    return "an" if name[:1].lower() in tuple("aeiou") else "a"


def fill(template: str, name: str) -> str:
    """Format one template with a class name."""
    return template.format(name, article=article(name))


def templates(spec: str | Sequence[str]) -> tuple[str, ...]:
    """A template set by name, or an explicit list of templates (each must contain "{}")."""
    if isinstance(spec, str):
        if spec not in TEMPLATE_SETS:
            raise ConfigError(
                f"unknown template set '{spec}'; known: {', '.join(TEMPLATE_SETS)}")
        return TEMPLATE_SETS[spec]
    out = tuple(spec)
    bad = [t for t in out if "{}" not in t]
    if not out or bad:
        raise ConfigError(
            f"templates must be non-empty and each contain '{{}}'; got {bad or out!r}")
    return out
