"""ViLD-family student detectors on torchvision's Faster R-CNN parts.

The model is composed explicitly (as ``torchvision.models.detection.FasterRCNN``):
a backbone with FPN, torchvision's ``RegionProposalNetwork`` and an
:class:`EmbeddingRoIHeads` whose box predictor projects every RoI to the
teacher's embedding space. Classification is by cosine similarity with the
frozen text embeddings of the *current vocabulary* plus one learned background
embedding, divided by a temperature (0.01 as in ViLD). Box regression is
class-agnostic. With ``ensemble=True`` a second, image-distilled head scores the
same RoIs and the two are combined by ViLD-ensemble's geometric rule; with a
:class:`RegionVLM` (F-VLM, a frozen CLIP trunk) the second score of each RoI is the
tower's own: RoIAlign on its last stage, its attention pool, cosine to the names. With
``mask_head=True`` torchvision's Mask R-CNN branch (14 x 14 RoIAlign, four convs,
a deconvolution to 28 x 28) predicts one class-agnostic mask per RoI, as ViLD does:
it trains on the positive RoIs against their matched ground-truth masks, and every
detection gets channel 0's probabilities, pasted at image resolution
(``masks`` (N, 1, H, W)).

The vocabulary is an input: :meth:`ViLD.set_vocabulary` swaps the text
embeddings (and which classes are novel) without touching the weights.

Training forward returns what :class:`detectors.criterion.DetectionCriterion` needs from the model
(it holds no loss code apart from torchvision's RPN); the teacher's embeddings of the
cached boxes are targets, in the same order:

    outputs = model(images, targets, distill_boxes=[(P_i, 4) per image])
    losses = criterion(outputs, {"distill_targets": torch.cat([(P_i, D) per image])})

(targets also hold ``masks`` (N, H, W) uint8 for a student with a mask head; a
horizontal flip of an image mirrors its targets with
:func:`detectors.augment.hflip_target`.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import (
    RoIHeads,
    maskrcnn_inference,
    project_masks_on_boxes,
)
from torchvision.models.detection.rpn import (
    RegionProposalNetwork,
    RPNHead,
    concat_box_prediction_layers,
)
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops import boxes as box_ops
from torchvision.ops.poolers import _convert_to_roi_format, _setup_scales

from distill.backbones import norm_layer
from distill.clip_trunk import AttentionPool
from distill.scoring import cosine_logits, known_names, reference_probs, take_rows

# model.scoring: how a region's names are scored (EmbeddingRoIHeads.class_probs)
SCORING = ("reference", "softmax", "pairwise")


def ensemble_scores(
    text_probs: Tensor, image_probs: Tensor, novel_mask: Tensor, lam: float = 2 / 3
) -> Tensor:
    """ViLD-ensemble scores: base text^lam * image^(1-lam), novel text^(1-lam) * image^lam.

    text_probs (N, C) or (N, 1 + C) with background in column 0 (torchvision order);
    image_probs (N, C), ViLD's image branch (over the vocabulary alone, no background), or
    of text_probs' shape (its background column unused); novel_mask (C,) bool over the
    classes. With a background column, the result keeps the text branch's background
    probability there. Returns the shape of text_probs.
    """
    num_classes = novel_mask.shape[0]
    extra = text_probs.shape[-1] - num_classes
    image_extra = image_probs.shape[-1] - num_classes
    if extra not in (0, 1) or image_extra not in (0, extra) or \
            text_probs.shape[:-1] != image_probs.shape[:-1]:
        raise ValueError(f"text_probs {tuple(text_probs.shape)} and image_probs "
                         f"{tuple(image_probs.shape)} do not fit C={num_classes} classes "
                         f"(text: C or 1 + C columns; image: C or text's)")
    t, i = text_probs[..., extra:], image_probs[..., image_extra:]
    novel = novel_mask.to(device=t.device, dtype=torch.bool)
    w_text = torch.where(novel, 1.0 - lam, lam).to(t.dtype)
    scores = t.pow(w_text) * i.pow(1.0 - w_text)
    if extra:
        scores = torch.cat([text_probs[..., :1], scores], dim=-1)
    return scores


class GatherRoIAlign(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign, with the levels' outputs concatenated and put back
    in the boxes' order by one gather, where torchvision zero-fills the whole result and
    scatters each level into it. Same values; in the ONNX graph that scatter (over every
    pooled value) was 18 % of the student's time, and the zero fill 3 % in PyTorch."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor],
                image_shapes: list[tuple[int, int]]) -> Tensor:
        features = [x[k] for k in self.featmap_names]
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                features, image_shapes, self.canonical_scale, self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        levels = self.map_levels(boxes)
        pooled, index = [], []
        for level, (feature, scale) in enumerate(zip(features, self.scales, strict=True)):
            i = torch.where(levels == level)[0]
            pooled.append(roi_align(feature, rois[i], self.output_size, scale,
                                    self.sampling_ratio))
            index.append(i)
        return torch.cat(pooled)[torch.argsort(torch.cat(index))]


def below(score: float) -> float:
    """The float32 just below ``score``: ``x > below(s)`` is ``x >= s`` for float32 ``x``."""
    return float(np.nextafter(np.float32(score), np.float32(-np.inf)))


def binary_masks(probs: Tensor) -> Tensor:
    """Mask probabilities (N, 1, H, W), as the model returns them -> (N, H, W) bool (> 0.5)."""
    return probs[:, 0] > 0.5


class EmbeddingHead(nn.Module):
    """RoI features -> L2-normalised embeddings (R, D) and class-agnostic deltas (R, 4).

    torchvision's ``FastRCNNConvFCHead`` (``convs`` 3x3 convolutions as wide as the input,
    each with ``norm`` and ReLU, then ``fcs`` FC layers of ``hidden`` with ReLU), then a
    linear projection to D. The default (0 convs, 2 FCs) is torchvision's ``TwoMLPHead``;
    ViLD's is 4 convs with batch norm + FCs.
    """

    def __init__(self, in_channels: int, resolution: int, embed_dim: int, hidden: int = 1024,
                 box_regression: bool = True, convs: int = 0, fcs: int = 2,
                 norm: str = "none"):
        super().__init__()
        if fcs < 1 or convs < 0:
            raise ValueError(f"model.head_fcs must be >= 1 and model.head_convs >= 0 (got "
                             f"{fcs}, {convs})")
        self.trunk = FastRCNNConvFCHead((in_channels, resolution, resolution),
                                        [in_channels] * convs, [hidden] * fcs,
                                        norm_layer=norm_layer(norm, "model.head_norm"))
        self.projection = nn.Linear(hidden, embed_dim)
        self.bbox_pred = nn.Linear(hidden, 4) if box_regression else None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # weights saved before 2026-12-05 named the two FC layers fc6 / fc7
        for old, new in (("fc6", "trunk.1"), ("fc7", "trunk.3")):
            for kind in ("weight", "bias"):
                if f"{prefix}{old}.{kind}" in state_dict:
                    state_dict[f"{prefix}{new}.{kind}"] = state_dict.pop(f"{prefix}{old}.{kind}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        x = self.trunk(x)
        embeddings = F.normalize(self.projection(x), dim=-1)
        return embeddings, (self.bbox_pred(x) if self.bbox_pred is not None else None)


class RegionVLM(nn.Module):
    """F-VLM's region embeddings from a frozen CLIP ResNet trunk: each box's RoIAlign on the
    trunk's last stage (``stage``: its key in the FPN body's outputs, ``stride`` pixels), a
    ``pool.grid`` x ``pool.grid`` map as the tower's attention pool takes at its pretraining
    size, through that pool -> (R, D) L2-normalised, as the tower embeds a crop."""

    def __init__(self, pool: AttentionPool, stage: str = "2", stride: int = 32):
        super().__init__()
        self.pool, self.stage, self.stride = pool, stage, stride
        pool.requires_grad_(False)  # the tower's own weights: never trained here

    def forward(self, feature_map: Tensor, boxes: list[Tensor]) -> Tensor:
        rois = roi_align(feature_map, boxes, self.pool.grid, 1 / self.stride, 2, aligned=True)
        return F.normalize(self.pool(rois), dim=-1)


class EmbeddingRoIHeads(RoIHeads):
    """torchvision ``RoIHeads`` with an embedding classifier (text + background) / temperature.

    Reuses torchvision's proposal matching, sampling, box coder and RoI pooling;
    replaces the predictor, the loss (moved to the criterion) and the
    post-processing (class-agnostic boxes, optional ViLD-ensemble or F-VLM scores). The
    optional Mask R-CNN branch (``mask_roi_pool``, ``mask_head``, ``mask_predictor``
    with one output channel, passed on to ``RoIHeads``) is class-agnostic.
    """

    def __init__(self, box_roi_pool: MultiScaleRoIAlign, text_head: EmbeddingHead,
                 image_head: EmbeddingHead | None, embed_dim: int, temperature: float = 0.01,
                 ensemble_lambda: float = 2 / 3, scoring: str = "reference",
                 vlm: RegionVLM | None = None, **kwargs):
        if scoring not in SCORING:
            raise ValueError(f"model.scoring must be one of {', '.join(SCORING)}, got "
                             f"{scoring!r}")
        if vlm is not None and image_head is not None:
            raise ValueError("model.ensemble and model.vlm_fusion: one second score per box, "
                             "ViLD-ensemble's image head or F-VLM's tower; set one")
        super().__init__(box_roi_pool, box_head=nn.Identity(), box_predictor=nn.Identity(),
                         **kwargs)
        self.text_head, self.image_head, self.vlm = text_head, image_head, vlm
        self.temperature, self.ensemble_lambda, self.scoring = temperature, ensemble_lambda, scoring
        self.background = nn.Parameter(F.normalize(torch.randn(embed_dim), dim=0))
        self.register_buffer("text_embeddings", torch.zeros(0, embed_dim), persistent=False)
        self.register_buffer("novel_mask", torch.zeros(0, dtype=torch.bool), persistent=False)
        # the training vocabulary's text embeddings (A, D), saved with the weights: the
        # ``reference`` scoring's fixed competitors (ViLD.set_training_vocabulary)
        self.register_buffer("reference_embeddings", torch.zeros(0, embed_dim))

    def background_embedding(self) -> Tensor:
        return F.normalize(self.background, dim=0)

    def class_probs(self, embeddings: Tensor) -> Tensor:
        """(R, D) -> (R, 1 + C) scores, background in column 0 (1 - the best name's score
        outside ``softmax``), logits cos / T.

        - ``reference`` (default): each name by a softmax over [background, the training
          names (``reference_embeddings``), that name], the name counted once when it is a
          training name. A name's score depends on the region, that name and what the student
          learned (background and training names), never on the other names asked for. A
          training name scores as in ViLD's softmax over the training vocabulary; a novel
          name competes with the training names, not with the other novel names.
        - ``softmax``: ViLD's, over [background, the vocabulary]: a name's score moves with
          the other names given.
        - ``pairwise``: each name against the background alone, sigmoid((cos(name) -
          cos(background)) / T) (trained with its own loss, ``vild_text_loss``).
        """
        logits = cosine_logits(embeddings, torch.cat([self.background_embedding()[None],
                                                      self.text_embeddings]), self.temperature)
        if self.scoring == "softmax":
            return F.softmax(logits, dim=-1)
        names, fixed = logits[:, 1:], logits[:, :1]
        known = torch.zeros(names.shape[-1], dtype=torch.bool, device=names.device)
        if self.scoring == "reference" and len(self.reference_embeddings):
            ref = self.reference_embeddings
            fixed = torch.cat([fixed, cosine_logits(embeddings, ref, self.temperature)], -1)
            known = known_names(self.text_embeddings, ref)
        probs = reference_probs(names, fixed, known)  # pairwise: sigmoid(name - background)
        return torch.cat([1 - probs.max(-1, keepdim=True).values, probs], -1)

    def name_probs(self, embeddings: Tensor) -> Tensor:
        """(R, D) -> (R, C): ViLD-ensemble's image-branch scores, over the names alone (no
        background column: the image head is distilled from the teacher, never trained
        against the background, which the text branch scores). ``softmax``: the softmax
        over the vocabulary; otherwise each name against the training names and itself
        (``reference``'s rule without the background), independent of the other names."""
        names = cosine_logits(embeddings, self.text_embeddings, self.temperature)
        if self.scoring == "softmax" or not len(self.reference_embeddings):
            return F.softmax(names, dim=-1)
        ref = self.reference_embeddings
        return reference_probs(names, cosine_logits(embeddings, ref, self.temperature),
                               known_names(self.text_embeddings, ref))

    def novel(self) -> Tensor:
        """(C,) bool: the names the ensemble rule treats as novel: those not among the
        training names (``reference_embeddings``) when the student keeps them, else the
        vocabulary's flags (``ViLD.set_vocabulary``)."""
        if len(self.reference_embeddings):
            return ~known_names(self.text_embeddings, self.reference_embeddings)
        return self.novel_mask

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        take_rows(self, "reference_embeddings", state_dict, prefix)  # any number of names
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, features, proposals, image_shapes, targets=None, distill_boxes=None,
                vlm_features: Tensor | None = None):
        """``vlm_features``: the trunk's last stage, for :class:`RegionVLM` (eval only)."""
        if self.training:
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(
                proposals, targets)
            if distill_boxes is not None:  # one pooling (and one head) pass over both sets
                out = self._train_with_distill(features, proposals, image_shapes, distill_boxes,
                                               labels, regression_targets)
            else:
                out = self._train_outputs(
                    *self.text_head(self.box_roi_pool(features, proposals, image_shapes)),
                    labels, regression_targets)
            if self.has_mask():
                out.update(self._mask_train_outputs(features, proposals, image_shapes, targets,
                                                    matched_idxs, labels))
            return out
        pooled = self.box_roi_pool(features, proposals, image_shapes)
        embeddings, box_regression = self.text_head(pooled)
        probs = self.class_probs(embeddings)
        if self.image_head is not None or self.vlm is not None:
            second = (self.image_head(pooled)[0] if self.image_head is not None
                      else self.vlm(vlm_features, proposals))
            probs = ensemble_scores(probs, self.name_probs(second), self.novel(),
                                    self.ensemble_lambda)
        boxes = self.box_coder.decode(box_regression, proposals).reshape(-1, 4)  # (R, 4)
        detections = self.postprocess(probs, boxes, [len(p) for p in proposals], image_shapes)
        if self.has_mask():
            self.predict_masks(features, detections, image_shapes)
        return detections

    def mask_logits(self, features, boxes: list[Tensor], image_shapes) -> Tensor:
        """Class-agnostic mask logits (sum_i N_i, 1, 28, 28) of ``boxes`` [(N_i, 4)] per image."""
        return self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes,
                                                                     image_shapes)))

    def predict_masks(self, features, detections: list[dict[str, Tensor]],
                      image_shapes) -> None:
        """Add ``masks`` (N, 1, 28, 28) probabilities, channel 0 for every box, to each
        image's ``detections`` (in place); the transform pastes them into the image."""
        logits = self.mask_logits(features, [d["boxes"] for d in detections], image_shapes)
        channel = [torch.zeros_like(d["labels"]) for d in detections]  # traceable: no len()
        for d, probs in zip(detections, maskrcnn_inference(logits, channel), strict=True):
            d["masks"] = probs

    def _mask_train_outputs(self, features, proposals, image_shapes, targets, matched_idxs,
                            labels) -> dict:
        """Mask R-CNN on the positive sampled RoIs: ``mask_logits`` (M, 1, S, S) and
        ``mask_targets`` (M, S, S), each RoI's matched ground-truth mask cropped to it."""
        positive = [torch.where(lab > 0)[0] for lab in labels]
        boxes = [p[k] for p, k in zip(proposals, positive, strict=True)]
        logits = self.mask_logits(features, boxes, image_shapes)
        size = logits.shape[-1]
        mask_targets = [project_masks_on_boxes(t["masks"], b, m[k], size)
                        for t, b, m, k in zip(targets, boxes, matched_idxs, positive, strict=True)]
        return {"mask_logits": logits, "mask_targets": torch.cat(mask_targets)}

    def _train_outputs(self, embeddings, box_regression, labels, regression_targets) -> dict:
        return {"region_embeddings": embeddings, "labels": torch.cat(labels),
                "box_regression": box_regression,
                "regression_targets": torch.cat(regression_targets),
                "text_embeddings": self.text_embeddings,
                "background_embedding": self.background_embedding(),
                "temperature": self.temperature, "scoring": self.scoring}

    def _train_with_distill(self, features, proposals, image_shapes, distill_boxes, labels,
                            regression_targets) -> dict:
        """Sampled RoIs and cached distillation boxes pooled in one call: per image the
        sampled ones then the cached ones (the pooler keeps the input order)."""
        boxes = [torch.cat([p, d.to(p.dtype)]) for p, d in
                 zip(proposals, distill_boxes, strict=True)]
        pooled = self.box_roi_pool(features, boxes, image_shapes)
        is_distill = torch.cat([torch.arange(len(b), device=pooled.device) >= len(p)
                                for b, p in zip(boxes, proposals, strict=True)])
        if self.image_head is None:  # ViLD: one head embeds both sets
            embeddings, box_regression = self.text_head(pooled)
            out = self._train_outputs(embeddings[~is_distill], box_regression[~is_distill],
                                      labels, regression_targets)
            out["distill_embeddings"] = embeddings[is_distill]
        else:  # ViLD-ensemble: the image head embeds the cached boxes
            out = self._train_outputs(*self.text_head(pooled[~is_distill]), labels,
                                      regression_targets)
            out["distill_embeddings"] = self.image_head(pooled[is_distill])[0]
        return out

    def postprocess(self, probs: Tensor, boxes: Tensor, counts: list[int],
                    image_shapes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """Per image: drop background, threshold, class-wise NMS, keep the top detections.

        Labels are 1-based indices into the vocabulary (0 would be background).
        """
        results = []
        # one image: no split, so that a traced (ONNX) graph keeps the proposal count dynamic
        per_image = ([probs], [boxes]) if len(counts) == 1 else (probs.split(counts),
                                                                 boxes.split(counts))
        for p, b, shape in zip(*per_image, image_shapes, strict=True):
            b = box_ops.clip_boxes_to_image(b, shape)
            num_classes = p.shape[1] - 1
            scores = p[:, 1:]  # (R, C): box r, class c at row-major index r * C + c
            labels = torch.arange(1, num_classes + 1, device=p.device).expand_as(scores).reshape(-1)
            b = b[:, None, :].expand(-1, num_classes, -1).reshape(-1, 4)
            scores = scores.reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            b, scores, labels = b[keep], scores[keep], labels[keep]
            keep = box_ops.remove_small_boxes(b, min_size=1e-2)
            b, scores, labels = b[keep], scores[keep], labels[keep]
            keep = box_ops.batched_nms(b, scores, labels, self.nms_thresh)[:self.detections_per_img]
            results.append({"boxes": b[keep], "scores": scores[keep], "labels": labels[keep]})
        return results


class ViLD(nn.Module):
    """Backbone + RPN + embedding RoI heads, with torchvision's resize/normalise transform.

    Images are (3, H, W) tensors, uint8 in [0, 255] or float in [0, 1]; targets
    hold ``boxes`` (N, 4) xyxy pixels and ``labels`` (N,) 1-based vocabulary
    indices (and, with a mask head, ``masks`` (N, H, W) uint8); ``distill_boxes`` are
    cached proposals (P, 4) in the same pixel frame, whose embeddings ViLD-image distils.
    """

    def __init__(self, backbone: nn.Module, rpn: RegionProposalNetwork,
                 roi_heads: EmbeddingRoIHeads, transform: GeneralizedRCNNTransform):
        super().__init__()
        self.backbone, self.rpn, self.roi_heads, self.transform = (
            backbone, rpn, roi_heads, transform)

    # ----------------------------------------------------------------- vocabulary
    def set_vocabulary(self, text_embeddings: Tensor, novel_mask: Tensor | None = None) -> None:
        """Use ``text_embeddings`` (C, D), L2-normalised, as the classifier from now on."""
        heads = self.roi_heads
        if text_embeddings.ndim != 2 or text_embeddings.shape[1] != heads.background.shape[0]:
            raise ValueError(f"text embeddings of shape {tuple(text_embeddings.shape)} do not fit "
                             f"a student of embedding dimension {heads.background.shape[0]}")
        if len(text_embeddings) == 0:
            raise ValueError("the vocabulary is empty")
        device = heads.background.device
        heads.text_embeddings = F.normalize(text_embeddings.detach().float(), dim=-1).to(device)
        heads.novel_mask = (torch.zeros(len(text_embeddings), dtype=torch.bool)
                            if novel_mask is None else novel_mask.bool()).to(device)

    def set_training_vocabulary(self, text_embeddings: Tensor) -> None:
        """Train on ``text_embeddings`` (C, D): the vocabulary, and the training names that
        ``reference`` scoring weighs every name against from now on (saved with the weights)."""
        self.set_vocabulary(text_embeddings)
        self.roi_heads.reference_embeddings = self.roi_heads.text_embeddings.clone()

    @property
    def vocabulary_size(self) -> int:
        return len(self.roi_heads.text_embeddings)

    @contextlib.contextmanager
    def scores_at_least(self, score: float) -> Iterator[None]:
        """Within: post-process only class scores >= ``score`` (never below the model's own
        ``box_score_thresh``). Exact for a caller that drops lower scores anyway: in the
        class-wise NMS a box is suppressed only by a higher-scored one, and the top-N cap
        keeps a prefix of the score order; it skips most of the NMS work."""
        heads = self.roi_heads
        saved = heads.score_thresh
        heads.score_thresh = max(saved, below(score))
        try:
            yield
        finally:
            heads.score_thresh = saved

    # ----------------------------------------------------------------- forward
    def _prepare(self, images, targets=None):
        images = [im.float() / 255 if im.dtype == torch.uint8 else im for im in images]
        original = [tuple(im.shape[-2:]) for im in images]
        image_list, targets = self.transform(images, targets)
        return image_list, targets, original

    def forward(self, images: list[Tensor], targets: list[dict] | None = None,
                distill_boxes: list[Tensor] | None = None):
        """Training: dict of outputs for the criterion (``distill_boxes``: the cached boxes
        (P_i, 4) per image, xyxy pixels of the image as given, to embed for ViLD-image).
        Eval: detections per image
        (``boxes``, ``scores``, ``labels``; with a mask head ``masks`` (N, 1, H, W)
        probabilities at the image's resolution)."""
        if self.training and targets is None:
            raise ValueError("targets are required in training mode")
        if self.vocabulary_size == 0:
            raise ValueError("no vocabulary set: call set_vocabulary(text_embeddings) first")
        image_list, targets, original = self._prepare(images, targets)
        features, vlm_features = self.features(image_list.tensors)
        proposals, rpn_losses = self.rpn(image_list, features, targets)
        if distill_boxes is not None:
            distill_boxes = [resize_boxes(b.float(), o, s) for b, o, s in
                             zip(distill_boxes, original, image_list.image_sizes, strict=True)]
        out = self.roi_heads(features, proposals, image_list.image_sizes, targets,
                             distill_boxes, vlm_features)
        if self.training:
            out["rpn_losses"] = rpn_losses
            return out
        return self.transform.postprocess(out, image_list.image_sizes, original)

    def features(self, x: Tensor) -> tuple[dict[str, Tensor], Tensor | None]:
        """The FPN maps of the batch ``x``, and (F-VLM, eval only) the trunk's last stage for
        :class:`RegionVLM`: the backbone (torchvision's ``BackboneWithFPN``) run as its body,
        then its FPN."""
        vlm = self.roi_heads.vlm
        if vlm is None or self.training:
            return self.backbone(x), None
        stages = self.backbone.body(x)
        return self.backbone.fpn(stages), stages[vlm.stage]

    @torch.no_grad()
    def propose(self, images: list[Tensor]) -> list[dict[str, Tensor]]:
        """Class-agnostic RPN proposals per image: ``boxes`` (N, 4) in input pixels, ``scores`` (objectness probabilities).

        N <= the RPN's post-NMS top-n at test time (300 for ViLD's cached proposals).
        """
        was = self.training
        self.eval()
        image_list, _, original = self._prepare(images)
        features = list(self.backbone(image_list.tensors).values())
        objectness, deltas = self.rpn.head(features)
        anchors = self.rpn.anchor_generator(image_list, features)
        per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        boxes = self.rpn.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        boxes, scores = self.rpn.filter_proposals(boxes, objectness, image_list.image_sizes,
                                                  per_level)
        self.train(was)
        return [{"boxes": resize_boxes(b, s, o), "scores": sc}
                for b, sc, s, o in zip(boxes, scores, image_list.image_sizes, original,
                                       strict=True)]


def build_vild(backbone: nn.Module, embed_dim: int, *, min_size: int, max_size: int,
               temperature: float = 0.01, ensemble: bool = False,
               ensemble_lambda: float = 2 / 3, anchor_sizes=((32,), (64,), (128,), (256,)),
               rpn_pre_nms_top_n_train: int = 2000, rpn_post_nms_top_n_train: int = 1000,
               rpn_pre_nms_top_n_test: int = 1000, rpn_post_nms_top_n_test: int = 300,
               box_batch_size_per_image: int = 512, roi_sampling_ratio: int = 2,
               box_score_thresh: float = 0.001,
               box_nms_thresh: float = 0.5, box_detections_per_img: int = 100,
               hidden: int = 1024, featmap_names: tuple[str, ...] = ("0", "1", "2", "3"),
               image_mean=(0.485, 0.456, 0.406),
               image_std=(0.229, 0.224, 0.225), mask_head: bool = False,
               scoring: str = "reference", head_convs: int = 0, head_fcs: int = 2,
               head_norm: str = "none", vlm: RegionVLM | None = None) -> ViLD:
    """Compose a ViLD student around ``backbone`` (with ``out_channels`` and FPN maps '0'..).

    ``mask_head`` adds the class-agnostic Mask R-CNN branch (its convs as wide as the FPN);
    ``head_convs``, ``head_fcs``, ``head_norm``: the RoI head's layers (:class:`EmbeddingHead`);
    ``vlm``: F-VLM's second score of each box (``ensemble_lambda`` its exponents).
    """
    channels = backbone.out_channels
    anchors = AnchorGenerator(anchor_sizes, ((0.5, 1.0, 2.0),) * len(anchor_sizes))
    rpn = RegionProposalNetwork(
        anchors, RPNHead(channels, anchors.num_anchors_per_location()[0]),
        fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=256, positive_fraction=0.5,
        pre_nms_top_n={"training": rpn_pre_nms_top_n_train, "testing": rpn_pre_nms_top_n_test},
        post_nms_top_n={"training": rpn_post_nms_top_n_train, "testing": rpn_post_nms_top_n_test},
        nms_thresh=0.7)
    pool = GatherRoIAlign(list(featmap_names), output_size=7, sampling_ratio=roi_sampling_ratio)
    masks = {}
    if mask_head:
        masks = {"mask_roi_pool": GatherRoIAlign(list(featmap_names), output_size=14,
                                                 sampling_ratio=roi_sampling_ratio),
                 "mask_head": MaskRCNNHeads(channels, (channels,) * 4, 1),
                 "mask_predictor": MaskRCNNPredictor(channels, channels, 1)}
    layers = {"convs": head_convs, "fcs": head_fcs, "norm": head_norm}
    roi_heads = EmbeddingRoIHeads(
        pool, EmbeddingHead(channels, 7, embed_dim, hidden, **layers),
        EmbeddingHead(channels, 7, embed_dim, hidden, box_regression=False, **layers)
        if ensemble else None,
        embed_dim, temperature, ensemble_lambda, scoring, vlm,
        fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=box_batch_size_per_image,
        positive_fraction=0.25, bbox_reg_weights=None, score_thresh=box_score_thresh,
        nms_thresh=box_nms_thresh, detections_per_img=box_detections_per_img, **masks)
    transform = GeneralizedRCNNTransform(min_size, max_size, list(image_mean), list(image_std))
    return ViLD(backbone, rpn, roi_heads, transform)
