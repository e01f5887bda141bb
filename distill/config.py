"""Typed experiment configuration.

Dataclasses are the schema; YAML experiment files hold only what differs from
the defaults (through a chain of ``base:`` files); ``a.b=c`` overrides, and YAML files
of overrides, come from the command line. Loading goes through OmegaConf structured configs, so an
unknown key or a value of the wrong type fails with a :class:`ConfigError`
naming the key and the closest valid key.

    cfg = load_config("configs/shapes/world.yaml", ["world.num_train=100"])
    save_config(cfg, out_dir / "config.yaml")   # reloads to the same config
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf  # noqa: F401
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A config file or override is invalid; the message is one line."""


# --------------------------------------------------------------------------- schemas


@dataclass
class WorldConfig:
    """The embedded synthetic open-vocabulary world (distill/data/synthetic.py)."""

    root: str = "data/shapes"  # worlds are cached under root/<fingerprint>/
    seed: int = 0
    num_train: int = 2000
    num_val: int = 300
    image_size: int = 160  # square images, pixels
    min_objects: int = 1
    max_objects: int = 6
    min_object_size: int = 24  # object bounding-square side, pixels
    max_object_size: int = 64
    num_novel: int = 4  # novel object classes drawn with split_seed ...
    split_seed: int = 0
    novel: list[str] = field(default_factory=list)  # ... unless named explicitly


@dataclass
class DataConfig:
    """Where a split's COCO-style instances JSON and images live.

    Unset paths mean the embedded synthetic world of the ``world`` section;
    ``benchmark`` names a real one under ``$OVD_DATASETS`` (distill/data/roots.py):
    ``coco_ov`` (OV-COCO train / val files), ``lvis`` (LVIS v1 train without rare
    annotations / val) for detectors, ``ade20k`` and ``pascal_context_59`` for segmenters.
    """

    benchmark: str | None = None  # coco_ov | lvis | ade20k | pascal_context_59
    train_instances: str | None = None
    train_images: str | None = None
    val_instances: str | None = None
    val_images: str | None = None
    # a bad annotation record or image file: fail (stop, naming it) | skip (leave it out and
    # list it in the run's skipped.json); see distill.data.coco.CocoDetection
    on_error: str = "fail"
    # which cached proposals a training image hands to ViLD-image (detectors/recipe.py's
    # DistillationSet): those whose RPN objectness is at least this (0: all, as ViLD), then
    # this many of them drawn per image and step (0: all)
    distill_min_objectness: float = 0.0
    distill_per_image: int = 0
    # detector training: large-scale jitter (ViLD: [0.1, 2.0]): scale the long side to
    # model.image_size x U(low, high), cut a window of at most image_size x image_size,
    # pad to that square (detectors/augment.py); []: none (resize to image_size only)
    scale_jitter: list[float] = field(default_factory=list)
    # names of the novel classes (held out of training, scored apart); unset: the files'
    # ``split`` tags (or LVIS's rare frequency). ``tools/pipeline.py`` sets it for
    # untagged files (distill.data.coco.split_classes)
    novel: list[str] | None = None


@dataclass
class TeacherConfig:
    """A frozen open_clip model (distill/teacher/)."""

    model: str = "ViT-B-32"  # open_clip model name (or the model name inside model_config)
    pretrained: str | None = None  # local file, open_clip tag, or None (random weights)
    model_config: str | None = None  # custom model JSON registered with open_clip
    templates: str = "openai_imagenet"  # prompt template set (see distill/teacher/prompts.py)
    region_mode: str = "crop"  # crop (ViLD: 1x + 1.5x crops) | dense (RoIAlign on dense map)
    crop_scales: list[float] = field(default_factory=lambda: [1.0, 1.5])
    dense_mode: str = "maskclip"  # maskclip (keep residual + MLP) | clearclip (drop both)
    dense_short_side: int = 0  # dense input: 0 = the image's own size, else this short side
    # the same model with a CLIPSelf-refined image tower (tools/refine_teacher.py) for the
    # dense path (dense regions, segmenter targets and pseudo-labels, MaskCLIP); crops and
    # text keep `pretrained`. null: the dense path uses `pretrained` too
    dense_pretrained: str | None = None
    batch_size: int = 256  # crops per encoder call
    device: str = "cpu"
    # bfloat16 | float16: the image tower runs under autocast on CUDA (crops and dense maps;
    # embeddings normalised in float32; bench/teacher_amp.py measures the cosine to float32).
    # null, or on the CPU: float32
    amp_dtype: str | None = None
    # the teacher's own text logits are cosine / temperature (the teacher on proposals, its
    # MaskCLIP segmentation and pseudo-labels); null: 1 / its learned logit scale (CLIP: 0.01)
    temperature: float | None = None


@dataclass
class CacheConfig:
    """The offline teacher-embedding store (distill/cache.py, tools/extract.py)."""

    root: str = "data/cache"  # stores live under root/<name>/
    name: str = "shapes_train"
    split: str = "train"  # which split of the dataset to extract
    dtype: str = "float16"  # float16 | int8 (per-vector scale)
    shard_size: int = 256  # images per shard
    proposals: str = "gt"  # gt | jitter | <path to a proposals file> | rpn
    num_proposals: int = 300  # per image (top-scoring)
    jitter: float = 0.1  # box jitter (fraction of box size) for proposals=jitter
    store_dense: bool = False  # also store the dense embedding map per image


@dataclass
class PretrainConfig:
    """Contrastive pretraining of the tiny teacher on the synthetic world's captions."""

    output: str = "configs/shapes/teacher/tiny_rn_shapes.safetensors"
    iters: int = 1500
    batch_size: int = 96  # 6 colours x 16 shapes: one crop per (shape, colour)
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_iters: int = 50
    crop_jitter: float = 0.05  # crop scale and centre jitter around the 1x / 1.5x crops
    stuff_crops: bool = False  # add one crop per stuff class ("sand", ...) to every batch
    eval_period: int = 0  # > 0: log zero-shot top-1 on val crops every this many iterations
    seed: int = 0


@dataclass
class RefineConfig:
    """CLIPSelf refinement of the teacher's image tower (distill/teacher/refine.py); its
    schedule is the ``train`` section, its checkpoints go to ``output_dir``."""

    output: str = "outputs/refine/refined.safetensors"
    max_split: int = 6  # each image cut into m x n regions, m and n uniform in 1..max_split
    # CLIPSelf's region-proposal variant: a proposals file of the train split
    # (tools/proposals.py: an RPN trained on base classes) whose top `max_boxes` boxes per
    # image are the regions instead of the grids (null: grids)
    proposals: str | None = None
    max_boxes: int = 20


@dataclass
class DetectorConfig:
    """A student detector (detectors/); built by ``build_detector(**model, embed_dim=D)``."""

    name: str = "vild_r18_fpn"  # see detectors.BUILDERS
    image_size: int = 160  # images are resized to this (min and max side)
    fpn_channels: int = 64
    # the ResNet's norm: gn | bn (trainable; SyncBatchNorm under DDP on CUDA) | frozen_bn
    # (only with backbone_weights: a random ResNet with frozen norms is refused)
    norm: str = "gn"
    fpn_norm: str = "none"  # the FPN convolutions' norm: none (torchvision's) | bn | gn
    backbone_weights: str | None = None  # local torchvision ResNet state_dict
    temperature: float = 0.01  # ViLD: logits = cosine / 0.01
    # how a region's names are scored (detectors/vild.py EmbeddingRoIHeads.class_probs):
    # reference: each name against the background and the training names, independent of
    # the other names given | softmax: ViLD's, over [background, names] | pairwise: each name
    # against the background alone (trained with a per-name binary loss)
    scoring: str = "reference"
    ensemble: bool = False  # ViLD-ensemble: a second, image-distilled head
    ensemble_lambda: float = 0.6667  # base: text^l image^(1-l); novel: text^(1-l) image^l
    mask_head: bool = False  # class-agnostic Mask R-CNN mask branch (instance masks)
    # the RoI head (detectors/vild.py EmbeddingHead): head_convs 3x3 convolutions with
    # head_norm (none | bn | gn), then head_fcs FC layers of width hidden; ViLD's: 4, bn, 1
    head_convs: int = 0
    head_norm: str = "none"
    head_fcs: int = 2
    hidden: int = 1024
    box_batch_size_per_image: int = 512
    roi_sampling_ratio: int = 2  # RoIAlign samples per bin side (torchvision's Faster R-CNN: 2)
    box_score_thresh: float = 0.001
    box_detections_per_img: int = 100
    rpn_post_nms_top_n_test: int = 300  # ViLD: 300 proposals per image
    anchor_sizes: list[int] = field(default_factory=list)  # one per FPN map; []: the builder's
    # the teacher's tower (model.name=vild_clip_rn_fpn, a ResNet teacher) or an ImageNet
    # ResNet (backbone_weights) frozen: only the FPN and heads train (F-VLM)
    freeze_trunk: bool = False
    # F-VLM: each box's score fused with the frozen tower's own (RoIAlign on its last stage,
    # its attention pool, cosine to the names) by ensemble_lambda's rule (F-VLM: 0.65)
    vlm_fusion: bool = False


@dataclass
class SegmenterConfig:
    """A student segmenter (segmentors/) and its losses (segmentors/criterion.py, MaskCLIP+).

    Variants: base-only ``supervised: 1`` (the rest 0); pixel-distilled
    ``pixel_distill: 1``; + pseudo-labels ``pseudo_label: 1``. Data: ``data_root``
    (ADE20k layout) or, unset, the synthetic world's label PNGs.
    """

    data_root: str | None = None  # ADEChallengeData2016/; unset: the synthetic world
    name: str = "seg_r18_fpn"  # see segmentors.BUILDERS
    fpn_channels: int = 64
    norm: str = "gn"
    backbone_weights: str | None = None  # seg_r50_fpn: local torchvision ResNet state_dict
    temperature: float = 0.05  # logits = cosine / temperature
    supervised: float = 1.0  # cross-entropy on base-class pixels (novel ones unlabelled)
    pixel_distill: float = 0.0  # L1 (or cosine) to the teacher's dense embeddings
    pixel_distill_mode: str = "l1"  # l1 | cosine
    # teacher dense maps for pixel_distill / pseudo_label: computed from each batch
    # (online) or read from cache.root/cache.name, written by tools/extract.py with
    # cache.store_dense=true (cache: embedded world only, whole images, no key smoothing)
    dense_source: str = "online"  # online | cache
    pseudo_label: float = 0.0  # cross-entropy on the teacher's dense argmax over all names
    pseudo_label_threshold: float | None = None  # ignore pixels the teacher is less sure of
    # all: every pixel, argmax over every name (annotation-free MaskCLIP+); unlabeled: only
    # pixels without a base label, argmax over the novel names (transductive zero-shot)
    pseudo_label_scope: str = "all"
    # MaskCLIP+'s: "bilinear" upsamples the teacher's logits to the label resolution, takes
    # the argmax there and the loss at that resolution (the student's logits upsampled too);
    # "nearest" resizes the argmax of the teacher's coarse grid to the student's (1/8)
    pseudo_label_upsample: str = "nearest"
    pixel_distill_reduction: str = "sum"  # the L1 over D: sum (ViLD's) | mean (MaskCLIP+'s)
    # leave the crop's padding out of pixel_distill and pseudo_label (MaskCLIP+: 255 there);
    # the supervised loss ignores it always (its labels are 255)
    ignore_padding: bool = False
    # views (segmentors/inference.py); ADE20k as mmsegmentation: 512, 512, 0.5-2, 512 / 341
    short_side: int = 0  # resize the short side to this for training and inference; 0: as is
    crop_size: int = 0  # training: random square crop, padded with ignore; 0: whole image
    scale_range: list[float] = field(default_factory=lambda: [1.0, 1.0])  # training: x U(range)
    window: int = 0  # inference: sliding-window side; 0: whole image
    stride: int = 341  # sliding-window stride
    # the teacher's dense logits (baseline and pseudo-labels), MaskCLIP: 1.0 and 0.5; 0: off
    key_smoothing: float = 0.0
    prompt_denoising: float = 0.0


@dataclass
class BagConfig:
    """BARON's bags of regions (distill/baron.py), for ``loss.bag`` > 0; the defaults are
    BARON's (wusize/ovdet's COCO recipe)."""

    words: int = 6  # pseudo-words per region; a bag of 9 regions must fit the text context
    word_dropout: float = 0.5  # each word dropped with this chance (a region keeps one)
    temperature: float = 0.0333  # logits x 30
    queue: int = 1024  # past bags kept as negatives, of each side
    # the proposals bags grow around: the cached ones (and the ground-truth boxes, with_gt)
    # with objectness above min_objectness, width / height in (shape_ratio, 1 / shape_ratio),
    # more than area_ratio inside the image, then NMS at nms_iou
    min_objectness: float = 0.85
    shape_ratio: float = 0.25
    area_ratio: float = 0.01
    nms_iou: float = 0.1
    with_gt: bool = True
    # each grows into max_groups groups of its 3 x 3 neighbourhood, each read in
    # max_permutations orders (distill.baron.neighbourhood_bags)
    max_groups: int = 3
    max_permutations: int = 2
    alpha: float = 3.0
    base_probability: float = 0.3
    cut_off: float = 0.3
    interval: float = -0.1


@dataclass
class LossConfig:
    """Loss weights (0 disables a loss) and BARON's bag settings (detectors/criterion.py).

    Variants: ViLD-text ``vild_image: 0``; ViLD-image ``vild_text: 0`` (box_reg kept);
    ViLD = defaults; + BARON's bag-of-regions ``bag: 1.0``.
    """

    vild_text: float = 1.0
    box_reg: float = 1.0
    vild_image: float = 0.5  # ViLD R50 weight; the L1 is summed over dimensions
    bag: float = 0.0  # BARON's bag-of-regions alignment (BARON: 1.0)
    objectness: float = 1.0
    rpn_box_reg: float = 1.0
    mask: float = 1.0  # mask BCE; computed only for a student with model.mask_head
    bags: BagConfig = field(default_factory=BagConfig)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class ScheduleConfig:
    name: str = "step"  # step | cosine | poly
    warmup_iters: int = 100
    warmup_factor: float = 0.001  # lr multiplier at iteration 0 of the linear warm-up
    steps: list[int] = field(default_factory=list)  # step: iterations where lr *= gamma
    gamma: float = 0.1
    min_lr_factor: float = 0.0  # cosine, poly: final lr = lr * min_lr_factor
    power: float = 0.9  # poly: lr factor (1 - it / max_iters) ** power (mmseg's 0.9)


@dataclass
class TrainConfig:
    max_iters: int = 1000
    batch_size: int = 2  # per process
    # the total batch (processes x batch_size) that lr and the schedule are written for; a run
    # with another total batch B scales lr by B / reference_batch and every iteration count
    # (max_iters, steps, warm-up, eval and checkpoint periods) by reference_batch / B, as
    # detectron2's auto_scale_workers does (Goyal et al. 2017). 0: used as written
    reference_batch: int = 0
    num_workers: int = 0
    seed: int = 0
    device: str = "cpu"
    clip_grad_norm: float = 0.0  # 0 disables clipping
    amp: bool = False  # autocast; bf16 on CPU is ~6x slower than fp32 on AVX2-only CPUs
    amp_dtype: str = "bfloat16"  # bfloat16 | float16
    log_period: int = 20
    eval_period: int = 0  # 0: evaluate only at the end
    checkpoint_period: int = 500
    keep_checkpoints: int = 2
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


@dataclass
class PipelineConfig:
    """The one-command pipeline (ovdistill/pipeline.py, ``python -m tools.pipeline``)."""

    segmenter: str | None = "configs/shapes/seg_distill.yaml"  # its stage's config; null: none
    teacher_baseline: bool = False  # also the teacher on proposals (slow on a CPU)
    # the RPN's top proposals per val image that the teacher on proposals classifies (0: as
    # many as a student scores, model.rpn_post_nms_top_n_test)
    teacher_proposals: int = 0
    onnx: bool = False  # the exported student also as model.onnx
    pictures: int = 8  # val images drawn with the exported student's detections


@dataclass
class ExperimentConfig:
    name: str = "default"
    output_dir: str = "outputs/default"
    world: WorldConfig = field(default_factory=WorldConfig)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    model: DetectorConfig = field(default_factory=DetectorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    seg: SegmenterConfig = field(default_factory=SegmenterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


# --------------------------------------------------------------------------- loading


def _valid_keys(node: Any, prefix: str = "") -> list[str]:
    """All dotted keys of a structured config (leaves and sections)."""
    keys = []
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            key = f"{prefix}{f.name}"
            keys.append(key)
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value):
                keys.extend(_valid_keys(value, key + "."))
    return keys


# keys that moved to another section: the old name says where
MOVED = {"loss.distill_min_objectness": "data.distill_min_objectness",
         "loss.distill_per_image": "data.distill_per_image"}


def _closest(key: str, schema: type) -> str:
    if key in MOVED:
        return f"; it moved to '{MOVED[key]}'"
    valid = _valid_keys(schema())
    leaf = key.rsplit(".", 1)[-1]
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not match:  # try the last component against the same section's keys
        section = key.rsplit(".", 1)[0] + "." if "." in key else ""
        same = [k for k in valid if k.startswith(section) and "." not in k[len(section):]]
        match = [section + m for m in difflib.get_close_matches(
            leaf, [k[len(section):] for k in same], n=1, cutoff=0.4)]
    return f"; did you mean '{match[0]}'?" if match else ""


def _explain(err: OmegaConfBaseException, source: str, schema: type) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError) or "not in struct" in str(err) or "Key '" in str(err):
        return ConfigError(f"{source}: unknown config key '{key}'{_closest(key, schema)}")
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return ConfigError(f"{source}: bad value for '{key}': {msg}")
    return ConfigError(f"{source}: {str(err).splitlines()[0]} (key '{key}')")


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _base_chain(path: Path) -> list[tuple[Path, dict]]:
    """``path`` and the files its ``base:`` keys name, nearest first, each with its content
    (less the ``base`` key)."""
    chain: list[tuple[Path, dict]] = []
    seen: list[Path] = []
    while path is not None:
        if path.resolve() in seen:
            names = " -> ".join(str(p) for p in [*seen, path.resolve()])
            raise ConfigError(f"{path}: a cycle of base configs ({names})")
        seen.append(path.resolve())
        data = _read_yaml(path)
        base = data.pop("base", None)
        if base is not None and not isinstance(base, str):
            raise ConfigError(f"{path}: 'base' must be one file name, got {base!r}")
        chain.append((path, data))
        path = (path.parent / base).resolve() if base is not None else None
    return chain


def _merge(base: DictConfig, data: dict, source: str, schema: type) -> DictConfig:
    try:
        return OmegaConf.merge(base, data)
    except OmegaConfBaseException as e:
        raise _explain(e, source, schema) from None


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    schema: type = ExperimentConfig,
) -> Any:
    """Defaults <- ``base:`` files, farthest first <- ``path`` <- ``overrides``; returns a
    schema instance. Each override is ``key=value`` or a YAML file of overrides (merged with
    its own ``base:`` chain where it stands: e.g. a schedule, ``configs/vild_r50_short.yaml``).

    Each ``base`` is resolved relative to the file that names it, and may name its own
    ``base`` (any depth; a cycle is refused, naming the files).
    """
    cfg = OmegaConf.structured(schema)
    if path is not None:
        for source, data in reversed(_base_chain(Path(path))):
            cfg = _merge(cfg, data, str(source), schema)
    for item in overrides or []:
        if "=" not in item and item.endswith((".yaml", ".yml")):  # a file of overrides
            for source, data in reversed(_base_chain(Path(item))):
                cfg = _merge(cfg, data, str(source), schema)
            continue
        if "=" not in item:
            raise ConfigError(f"override '{item}' is neither key=value nor a .yaml file")
        try:
            cfg.merge_with_dotlist([item])
        except OmegaConfBaseException as e:
            raise _explain(e, f"override '{item}'", schema) from None
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _explain(e, str(path or "config"), schema) from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def non_defaults(node: Any, recorded: dict | None = None) -> dict:
    """The fields of the config dataclass ``node`` whose value differs from its default, as
    a nested dict (nested sections only when something in them differs). The default of a
    field is its value in ``recorded`` (a nested dict, e.g. an earlier ``to_dict`` of the
    defaults) when it holds the field, else the schema's own default."""
    recorded = recorded if isinstance(recorded, dict) else {}
    defaults = type(node)()
    changed: dict = {}
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            inner = non_defaults(value, recorded.get(f.name))
            if inner:
                changed[f.name] = inner
            continue
        default = recorded[f.name] if f.name in recorded else getattr(defaults, f.name)
        if value != default:
            changed[f.name] = value
    return changed


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs are for others to read
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the fully resolved config as YAML; ``load_config(path)`` gives it back."""
    atomic_write(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
