"""Running a student over a dataset and scoring it with the COCO-OV (or LVIS) evaluator:
box AP, and mask AP for a student with a mask head."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import torch
from tqdm import tqdm

from detectors.vild import ViLD, binary_masks
from distill.data.coco import CocoDetection
from distill.engine import broadcast_from_main, gather_to_main, get_rank, shard, to_device
from distill.evaluation.coco import DetectionCollector, OVCocoEvaluator


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's parameters live on (where its inputs must go)."""
    return next(model.parameters()).device


@torch.no_grad()
def evaluate_detector(model: ViLD, dataset: CocoDetection, text_embeddings: torch.Tensor,
                      novel: Sequence[bool], out_dir: str | os.PathLike | None = None,
                      batch_size: int = 4, progress: bool = True) -> dict[str, float]:
    """Box AP of ``model`` on ``dataset`` with the vocabulary ``text_embeddings`` (C, D).

    The vocabulary is the dataset's categories in label order (generalized
    setting: base and novel names together); ``novel`` (C,) marks the novel ones.
    Returns flat metrics (``AP50_novel``, ``AP50_base``, ``AP50_all``, ``AP``,
    ``images_per_s``); a student with a mask head is also scored on its masks
    (probabilities > 0.5): the same keys prefixed ``mask_`` (``mask_AP50_novel``, ...).
    With ``out_dir`` also writes the COCO results JSON,
    ``metrics.json`` and the per-class AP50 plot there. The model's previous
    vocabulary is restored afterwards.
    """
    if len(text_embeddings) != len(dataset.categories):
        raise ValueError(f"{len(text_embeddings)} text embeddings for "
                         f"{len(dataset.categories)} categories of {dataset.instances_json}")
    saved = (model.roi_heads.text_embeddings, model.roi_heads.novel_mask)
    was_training = model.training
    model.eval()
    model.set_vocabulary(text_embeddings, torch.as_tensor(list(novel), dtype=torch.bool))
    try:
        return _evaluate(model, dataset, novel, out_dir, batch_size, progress,
                         masks=model.roi_heads.has_mask(), device=model_device(model))
    finally:
        model.roi_heads.text_embeddings, model.roi_heads.novel_mask = saved
        model.train(was_training)


@torch.no_grad()
def evaluate_teacher_on_proposals(rpn: ViLD, teacher, dataset: CocoDetection,
                                  text_embeddings: torch.Tensor, novel: Sequence[bool],
                                  out_dir: str | os.PathLike | None = None, batch_size: int = 4,
                                  temperature: float = 0.01, num_proposals: int | None = None,
                                  progress: bool = True) -> dict[str, float]:
    """ViLD's "teacher on cropped regions" baseline, scored like :func:`evaluate_detector`.

    Per image: ``rpn``'s class-agnostic proposals (its ``rpn_post_nms_top_n_test``
    best, or the ``num_proposals`` best of those), embedded by ``teacher`` in crop mode (1x + 1.5x crops), classified
    against ``text_embeddings``: score = softmax over the vocabulary of
    cosine / ``temperature``, times the proposal's objectness (the teacher has
    no background class); then the student's post-processing (threshold,
    class-wise NMS, top detections). ``images_per_s`` counts RPN + teacher.
    """
    predict = teacher_on_proposals(rpn, teacher, text_embeddings, temperature, num_proposals)
    was_training = rpn.training
    rpn.eval()
    try:
        return _evaluate(predict, dataset, novel, out_dir, batch_size, progress,
                         device=model_device(rpn))
    finally:
        rpn.train(was_training)


def teacher_on_proposals(rpn: ViLD, teacher, text_embeddings: torch.Tensor,
                         temperature: float = 0.01, num_proposals: int | None = None):
    """``predict(images) -> [{boxes, scores, labels}]``: ``rpn``'s proposals (its ``num_proposals``
    best) embedded by ``teacher`` (1x + 1.5x crops), softmax of cosine / ``temperature`` over
    ``text_embeddings`` (C, D) times objectness, then ``rpn``'s post-processing; on ``rpn``'s
    device (the teacher runs on its own and its embeddings come over)."""
    device = model_device(rpn)
    text = torch.nn.functional.normalize(text_embeddings.float(), dim=-1).to(device)
    heads = rpn.roi_heads

    @torch.no_grad()
    def predict(images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        proposals = [{k: v[:num_proposals] for k, v in p.items()} for p in rpn.propose(images)]
        embeddings = teacher.regions(images, [p["boxes"] for p in proposals], mode="crop")
        out = []
        for im, p, e in zip(images, proposals, embeddings, strict=True):
            probs = torch.softmax(e.to(device) @ text.T / temperature, dim=-1) \
                * p["scores"][:, None]
            probs = torch.cat([probs.new_zeros(len(probs), 1), probs], dim=1)  # no background
            out += heads.postprocess(probs, p["boxes"], [len(p["boxes"])],
                                     [tuple(im.shape[-2:])])
        return out

    return predict


def _evaluate(predict, dataset: CocoDetection, novel: Sequence[bool],
              out_dir: str | os.PathLike | None, batch_size: int,
              progress: bool, masks: bool = False,
              device: torch.device | str = "cpu") -> dict[str, float]:
    """Run ``predict(images) -> [{boxes, scores, labels (1-based vocabulary index)}]`` over
    ``dataset`` and score it in the generalized setting: LVIS's federated evaluator when
    the categories carry LVIS ``frequency`` tags (novel = rare), else COCO-OV's. With
    ``masks`` the predictions also hold ``masks`` (N, 1, H, W) probabilities, scored as
    binary masks (> 0.5) under the ``mask_`` keys. Images go to ``device``, predictions come
    back to the CPU. Under torchrun each rank predicts its :func:`distill.engine.shard` of the
    images; rank 0 scores them all with one evaluator and writes ``out_dir``; every rank
    returns the metrics."""
    if len(novel) != len(dataset.categories):
        raise ValueError(f"{len(novel)} novel flags for {len(dataset.categories)} categories "
                         f"of {dataset.instances_json}")
    category_ids = [int(c["id"]) for c in dataset.categories]
    lvis = all("frequency" in c for c in dataset.categories)
    iou_types = ("bbox", "segm") if masks else ("bbox",)
    # each rank predicts its slice of the images; rank 0 gathers them into one evaluator
    mine = DetectionCollector({int(im["id"]): im for im in dataset.images}, category_ids,
                              iou_types)
    indices = shard(len(dataset))
    seconds = 0.0
    for start in tqdm(range(0, len(indices), batch_size), desc="evaluate",
                      disable=not progress or get_rank() != 0, dynamic_ncols=True):
        samples = [dataset[i] for i in indices[start:start + batch_size]]
        t = time.perf_counter()
        results = to_device(predict([s["image"].to(device) for s in samples]), "cpu")
        seconds += time.perf_counter() - t
        for s, r in zip(samples, results, strict=True):
            mine.add(s["image_id"], r["boxes"], r["scores"],
                     [category_ids[k - 1] for k in r["labels"].tolist()],
                     binary_masks(r["masks"]) if masks else None)
    parts = gather_to_main((mine.state(), seconds))
    flat = None
    if parts is not None:  # rank 0
        if lvis:
            from distill.evaluation import LVISEvaluator

            evaluator = LVISEvaluator(dataset.instances_json, iou_types=iou_types)
            keys: tuple[str, ...] = ("AP", "AP50", "APr", "APc", "APf")
        else:
            novel_ids = [cid for cid, n in zip(category_ids, novel, strict=True) if n]
            evaluator = OVCocoEvaluator(dataset.instances_json, novel_category_ids=novel_ids,
                                        category_ids=category_ids, iou_types=iou_types)
            keys = ("AP", "AP50", "AP50_novel", "AP50_base", "AP50_all")
        evaluator.merge(state for state, _ in parts)
        metrics = evaluator.evaluate()
        if out_dir is not None:
            evaluator.write(out_dir)
        flat = {k: float(metrics["bbox"][k]) for k in keys}
        if masks:
            flat.update({f"mask_{k}": float(metrics["segm"][k]) for k in keys})
        # the ranks ran side by side: the slowest one's time is the split's
        flat["images_per_s"] = len(dataset) / max(max(sec for _, sec in parts), 1e-9)
    return broadcast_from_main(flat)


@torch.no_grad()
def write_proposals(model: ViLD, dataset: CocoDetection, path: str | os.PathLike,
                    batch_size: int = 8, progress: bool = True) -> int:
    """Class-agnostic RPN proposals of every image of ``dataset`` -> a proposals file.

    ViLD's offline recipe: the RPN, trained on base-class boxes only, proposes
    (at most ``rpn_post_nms_top_n_test``, 300 by default) boxes per image with
    their objectness; ``tools/extract.py`` embeds them with the teacher
    (``cache.proposals=<path>``). Runs on the model's device; under torchrun each rank
    proposes for its :func:`distill.engine.shard` of the images and rank 0 writes the file.
    Returns the number of proposals written.
    """
    from distill.data.proposals import save_proposals

    out = {}
    indices = shard(len(dataset))
    for start in tqdm(range(0, len(indices), batch_size), desc="proposals",
                      disable=not progress or get_rank() != 0, dynamic_ncols=True):
        samples = [dataset[i] for i in indices[start:start + batch_size]]
        found = model.propose([s["image"].to(model_device(model)) for s in samples])
        for s, p in zip(samples, to_device(found, "cpu"), strict=True):
            out[s["image_id"]] = (p["boxes"], p["scores"])
    parts = gather_to_main(out)
    if parts is not None:  # rank 0: every rank's images, in the dataset's order
        out = {k: v for part in parts for k, v in part.items()}
        save_proposals(path, out, metadata={"source": "ViLD RPN (base classes)"})
    return broadcast_from_main(sum(len(b) for b, _ in out.values()))
