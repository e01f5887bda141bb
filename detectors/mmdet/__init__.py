"""ovdistill's ViLD parts inside mmdetection 3.x (optional: ``make mmdet`` installs it).

An mmdet config loads them with::

    custom_imports = dict(imports=["detectors.mmdet"], allow_failed_imports=False)

and names them by ``type``. Every part reads one ovdistill experiment config
(``ovd_config``: the ``config.yaml`` a native ViLD run saved, or any YAML whose
``cache`` names an extracted cache), so the mmdet student trains on the same data,
teacher and cached embeddings as the native one:

- ``OVDCocoDataset``: the config's train (base classes only) or val split (every class),
  class order = category-id order;
- ``OVDResNetFPN``: the native students' ResNet + FPN (:func:`distill.backbones.resnet_fpn`),
  its maps as a tuple (use with ``neck=None``);
- ``EmbeddingBBoxHead``: the native :class:`detectors.vild.EmbeddingHead` (FCs -> projection
  -> L2 norm, class-agnostic deltas); logits = cosine to the teacher's text embeddings
  of the vocabulary (base names in training, every name at test time) and a learned
  background, over the temperature; ViLD-text and box losses are
  :func:`distill.losses.vild_text_loss` and :func:`distill.losses.box_regression_loss`;
- ``ViLDRoIHead``: mmdet's ``StandardRoIHead`` + ViLD-image (:func:`distill.losses.vild_image_loss`)
  on the cached proposals;
- ``LoadDistillTargets``: an image's cached proposals and teacher embeddings, mapped
  through the pipeline's ``Resize`` and ``RandomFlip`` (put it after them);
- ``OVDCocoMetric``: :class:`distill.evaluation.OVCocoEvaluator` (COCO-OV's AP50 on novel,
  base and all classes in the generalized setting).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

try:
    import mmdet  # noqa: F401
    from mmcv.transforms import BaseTransform
    from mmdet.datasets import CocoDataset
    from mmdet.models.roi_heads import StandardRoIHead
    from mmdet.models.roi_heads.bbox_heads import BBoxHead
    from mmdet.registry import DATASETS, METRICS, MODELS, TRANSFORMS
    from mmdet.structures.bbox import bbox2roi
    from mmengine.evaluator import BaseMetric
    from mmengine.model import BaseModule
except ImportError as e:  # pragma: no cover - exercised where mmdet is absent
    raise ImportError(f"detectors.mmdet needs mmdetection 3.x with mmcv's ops ({e}); "
                      "install them with `make mmdet` (tools/install_mmdet.sh)") from None

import numpy as np
import torch
import torch.nn.functional as F

from detectors.vild import EmbeddingHead
from distill.backbones import resnet_fpn
from distill.losses import box_regression_loss, vild_image_loss, vild_text_loss


@dataclass(frozen=True)
class Experiment:
    """What the mmdet parts need from an ovdistill experiment config."""

    config: object  # distill.config.ExperimentConfig
    train: tuple[Path, Path]  # (instances JSON, image dir)
    val: tuple[Path, Path]
    categories: tuple[dict, ...]  # val categories, by id
    novel: tuple[bool, ...]
    cache: Path


@functools.lru_cache(maxsize=4)
def experiment(ovd_config: str) -> Experiment:
    from distill.config import load_config
    from distill.data.coco import dataset_paths, is_novel, read_instances

    path = Path(ovd_config)
    if not path.is_file():
        raise FileNotFoundError(f"ovd_config {path} not found: give the config.yaml of a "
                                "native ViLD run (outputs/shapes/vild-*/config.yaml)")
    cfg = load_config(path)
    val = dataset_paths(cfg, "val")
    categories = tuple(sorted(read_instances(val[0])["categories"], key=lambda c: c["id"]))
    return Experiment(cfg, dataset_paths(cfg, "train"), val, categories,
                      tuple(is_novel(c) for c in categories),
                      Path(cfg.cache.root) / cfg.cache.name)


def class_names(ovd_config: str, split: str) -> tuple[str, ...]:
    """Category names in id order: base only for ``train``, every one for ``val``."""
    e = experiment(ovd_config)
    return tuple(c["name"] for c, n in zip(e.categories, e.novel, strict=True)
                 if split == "val" or not n)


@functools.lru_cache(maxsize=2)
def _teacher(ovd_config: str):
    from distill.teacher import Teacher

    return Teacher.from_config(experiment(ovd_config).config.teacher)


@functools.lru_cache(maxsize=8)
def text_embeddings(ovd_config: str, split: str) -> torch.Tensor:
    """The teacher's (C, D) text embeddings of ``class_names(ovd_config, split)``."""
    teacher = _teacher(ovd_config)  # loaded once for both splits
    names = [n.replace("_", " ") for n in class_names(ovd_config, split)]
    return teacher.text(names).float()


@DATASETS.register_module()
class OVDCocoDataset(CocoDataset):
    """mmdet's ``CocoDataset`` on an ovdistill experiment's ``split`` (train: base classes)."""

    def __init__(self, ovd_config: str, split: str = "train", **kwargs):
        if split not in ("train", "val"):
            raise ValueError(f"OVDCocoDataset split must be train or val, got {split!r}")
        ann, images = getattr(experiment(ovd_config), split)
        super().__init__(ann_file=str(ann), data_prefix=dict(img=str(images) + "/"),
                         metainfo=dict(classes=class_names(ovd_config, split)), **kwargs)


@MODELS.register_module()
class OVDResNetFPN(BaseModule):
    """:func:`distill.backbones.resnet_fpn` for mmdet: image -> tuple of FPN maps."""

    def __init__(self, depth: int = 10, returned_layers=(2, 3, 4), fpn_channels: int = 64,
                 norm: str = "gn", weights: str | None = None, init_cfg=None):
        super().__init__(init_cfg)
        self.net = resnet_fpn(depth, tuple(returned_layers), fpn_channels, norm, weights)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.net(x).values())


@MODELS.register_module()
class EmbeddingBBoxHead(BBoxHead):
    """ViLD's embedding box head (see the module doc); ``num_classes`` follows the training
    vocabulary; in eval mode the test vocabulary (``ovd_config``'s val classes) is used."""

    def __init__(self, ovd_config: str, embed_dim: int, hidden: int = 1024,
                 temperature: float = 0.01, in_channels: int = 256, roi_feat_size: int = 7,
                 init_cfg=None, **kwargs):
        train_text = text_embeddings(ovd_config, "train")
        kwargs.setdefault("reg_class_agnostic", True)
        if not kwargs["reg_class_agnostic"]:
            raise ValueError("EmbeddingBBoxHead regresses class-agnostic boxes "
                             "(reg_class_agnostic=True)")
        super().__init__(with_avg_pool=False, roi_feat_size=roi_feat_size,
                         in_channels=in_channels, num_classes=len(train_text),
                         init_cfg=init_cfg, **kwargs)
        del self.fc_cls, self.fc_reg  # replaced by the native head below
        self.init_cfg = init_cfg
        if train_text.shape[1] != embed_dim:
            raise ValueError(f"embed_dim {embed_dim} differs from the teacher's "
                             f"{train_text.shape[1]} ({ovd_config})")
        self.head = EmbeddingHead(in_channels, roi_feat_size, embed_dim, hidden)
        self.background = torch.nn.Parameter(F.normalize(torch.randn(embed_dim), dim=0))
        self.temperature = temperature
        self.register_buffer("train_text", train_text, persistent=False)
        self.register_buffer("test_text", text_embeddings(ovd_config, "val"), persistent=False)
        self.last_embeddings: torch.Tensor | None = None

    def text(self) -> torch.Tensor:
        return self.train_text if self.training else self.test_text

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoI features -> (logits (R, C + 1), background last as in mmdet; deltas (R, 4))."""
        embeddings, deltas = self.head(x)
        self.last_embeddings = embeddings
        classifier = torch.cat([self.text(), F.normalize(self.background, dim=0)[None]])
        return embeddings @ classifier.T / self.temperature, deltas

    def loss(self, cls_score, bbox_pred, rois, labels, label_weights, bbox_targets,
             bbox_weights, reduction_override=None) -> dict:
        ours = torch.where(labels == self.num_classes, 0, labels + 1)  # background 0, as native
        return {"loss_cls": vild_text_loss(self.last_embeddings, ours, self.train_text,
                                           F.normalize(self.background, dim=0),
                                           self.temperature),
                "loss_bbox": box_regression_loss(bbox_pred, bbox_targets, ours)}


@MODELS.register_module()
class ViLDRoIHead(StandardRoIHead):
    """``StandardRoIHead`` + ViLD-image: L1 between the embeddings of the cached proposals
    (``distill_boxes`` in the data samples' metainfo) and their teacher embeddings."""

    def __init__(self, *args, vild_image_weight: float = 0.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.vild_image_weight = vild_image_weight

    def loss(self, x, rpn_results_list, batch_data_samples) -> dict:
        losses = super().loss(x, rpn_results_list, batch_data_samples)
        if self.vild_image_weight:
            device = x[0].device
            boxes = [torch.as_tensor(s.distill_boxes, device=device) for s in batch_data_samples]
            targets = torch.cat([torch.as_tensor(s.distill_embeddings, device=device)
                                 for s in batch_data_samples])
            feats = self.bbox_roi_extractor(x[:self.bbox_roi_extractor.num_inputs],
                                            bbox2roi(boxes))
            student, _ = self.bbox_head.embed(feats)
            losses["loss_vild_image"] = self.vild_image_weight * vild_image_loss(student, targets)
        return losses


@TRANSFORMS.register_module()
class LoadDistillTargets(BaseTransform):
    """``distill_boxes`` (P, 4) and ``distill_embeddings`` (P, D) of the image from the
    experiment's embedding cache, in the pipeline's current frame (after ``Resize`` and
    ``RandomFlip``); only proposals with objectness >= ``min_objectness`` (as
    ``data.distill_min_objectness``), of which ``per_image`` > 0 draws that many (as
    ``data.distill_per_image``)."""

    def __init__(self, ovd_config: str, per_image: int = 0, min_objectness: float = 0.0):
        self.ovd_config, self.per_image = ovd_config, per_image
        self.min_objectness = min_objectness

    @functools.cached_property
    def cache(self):
        from distill.cache import EmbeddingCache
        from distill.data.coco import dataset_id

        e = experiment(self.ovd_config)
        if not e.cache.is_dir():
            raise FileNotFoundError(f"no embedding cache at {e.cache} (cache.root/cache.name of "
                                    f"{self.ovd_config}): run tools/extract.py first")
        return EmbeddingCache.open(e.cache, dataset_id=dataset_id(e.train[0]))

    def transform(self, results: dict) -> dict:
        rec = self.cache.get(int(results["img_id"]))
        boxes, emb = rec["boxes"].astype(np.float32), rec["embeddings"].astype(np.float32)
        if self.min_objectness > 0:
            keep = rec["scores"] >= self.min_objectness
            boxes, emb = boxes[keep], emb[keep]
        if 0 < self.per_image < len(boxes):
            pick = np.random.permutation(len(boxes))[:self.per_image]
            boxes, emb = boxes[pick], emb[pick]
        sx, sy = results.get("scale_factor", (1.0, 1.0))
        boxes = boxes * np.array([sx, sy, sx, sy], dtype=np.float32)
        if results.get("flip", False):
            if results.get("flip_direction", "horizontal") != "horizontal":
                raise ValueError("LoadDistillTargets maps horizontal flips only")
            w = results["img_shape"][1]
            boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
        results["distill_boxes"], results["distill_embeddings"] = boxes, emb
        return results


@METRICS.register_module()
class OVDCocoMetric(BaseMetric):
    """COCO-OV box AP50 on novel / base / all classes (generalized setting), AP."""

    default_prefix = "ov"

    def __init__(self, ovd_config: str, collect_device: str = "cpu", prefix: str | None = None):
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.ovd_config = ovd_config

    def process(self, data_batch, data_samples) -> None:
        for s in data_samples:
            p = s["pred_instances"]
            self.results.append((int(s["img_id"]), p["bboxes"].cpu().numpy(),
                                 p["scores"].cpu().numpy(), p["labels"].cpu().numpy()))

    def compute_metrics(self, results: list) -> dict:
        from distill.evaluation import OVCocoEvaluator

        e = experiment(self.ovd_config)
        ids = [int(c["id"]) for c in e.categories]
        evaluator = OVCocoEvaluator(str(e.val[0]), category_ids=ids,
                                    novel_category_ids=[i for i, n in zip(ids, e.novel,
                                                                          strict=True) if n])
        for image_id, boxes, scores, labels in results:
            evaluator.add(image_id, boxes, scores, [ids[k] for k in labels.tolist()])
        m = evaluator.evaluate()["bbox"]
        return {k: float(m[k]) for k in ("AP", "AP50", "AP50_novel", "AP50_base", "AP50_all")}
