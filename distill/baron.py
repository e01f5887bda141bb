"""BARON's bag-of-regions alignment (Wu et al., CVPR 2023), as wusize/ovdet has it, for a
ViLD-style student. Training only: an exported student holds none of it.

A *bag* is a proposal and some of its neighbours on a 3 x 3 grid of boxes of its size
(:func:`neighbourhood_bags`). The student embeds each box of the bag; :class:`PseudoWords`
turns each embedding, plus the box's place in the bag, into pseudo-words of the teacher's
text tower; the frozen text tower reads the bag's words as one sentence
(:meth:`distill.teacher.Teacher.pseudo_text`, gradients flow back through it to the
student) and its embedding is aligned with the teacher's image embedding of the bag's
enclosing box by a symmetric InfoNCE over the batch and a queue of past bags
(:func:`distill.losses.bag_loss`, in :class:`detectors.criterion.DetectionCriterion`, which
keeps the queues: :class:`EmbeddingQueue`).

Where the teacher's bag embeddings come from: online, the teacher's region embedding of each
enclosing box (the same crops as the cache's) at every step. Bags are drawn anew each step
around the augmented image's proposals (BARON's random groups and word orders), so no fixed
set of enclosing boxes could be cached; each step costs a handful of crops per image, where
ViLD's cache holds hundreds per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import clip_boxes_to_image, nms

# the 3 x 3 grid's cells, row-major; 4 is the proposal itself
GRID = 9  # the most boxes a bag holds
_COLS, _ROWS = torch.arange(GRID) % 3, torch.arange(GRID) // 3


@dataclass
class Bags:
    """The bags of one image.

    ``boxes`` (M, 4) every member box (xyxy pixels; a box shared by a group's orders once);
    ``spans`` (G, 4) each group's enclosing box; ``members`` (S, L) long, each bag's boxes in
    reading order as rows of ``boxes``, -1 padded; ``group`` (S,) long, the row of ``spans``
    of each bag (the orders of one group share it, and its teacher embedding);
    ``normed`` (S, L, 4) the members' boxes relative to their span (x / span width ...).
    """

    boxes: Tensor
    spans: Tensor
    members: Tensor
    group: Tensor
    normed: Tensor

    def as_dict(self) -> dict[str, Tensor]:
        return {"boxes": self.boxes, "spans": self.spans, "members": self.members,
                "group": self.group, "normed": self.normed}


def grid_boxes(box: Tensor, interval: float = -0.1) -> Tensor:
    """(9, 4): the 3 x 3 grid of boxes of ``box``'s size centred on it, row-major; neighbours
    overlap it by -``interval`` of its size (BARON's -0.1) or stand that far apart."""
    w, h = box[2] - box[0], box[3] - box[1]
    dx = (_COLS.to(box) - 1) * (1 + interval) * w
    dy = (_ROWS.to(box) - 1) * (1 + interval) * h
    return box[None] + torch.stack([dx, dy, dx, dy], 1)


def cell_probabilities(box: Tensor, height: int, width: int, *, alpha: float = 3.0,
                       base_probability: float = 0.3, cut_off: float = 0.3,
                       interval: float = -0.1) -> Tensor:
    """(9,) the chance of each grid cell joining the bag (the centre: 1). A side's is
    ``base_probability`` x (the box's extent across / along it) ** ``alpha``, at most
    ``base_probability`` (a tall box grows sideways, a wide one up and down), 0 when the
    image leaves less than ``cut_off`` + ``interval`` of the box's size on that side; a
    corner's is the geometric mean of its two sides'."""
    w = float(box[2] - box[0]) + 1e-12
    h = float(box[3] - box[1]) + 1e-12
    side = torch.tensor([(h / w) ** alpha, (h / w) ** alpha, (w / h) ** alpha,
                         (w / h) ** alpha]) * base_probability  # left, right, up, down
    room = torch.tensor([float(box[0]) / w, (width - float(box[2])) / w,
                         float(box[1]) / h, (height - float(box[3])) / h])
    side = torch.nan_to_num(side * (room > cut_off + interval)).clamp(0, base_probability)
    p = torch.ones(9)
    p[_COLS == 0] *= side[0]
    p[_COLS == 2] *= side[1]
    p[_ROWS == 0] *= side[2]
    p[_ROWS == 2] *= side[3]
    corners = torch.tensor([0, 2, 6, 8])
    p[corners] = p[corners].sqrt()
    return p.clamp(0, 1)


def neighbourhood_bags(box: Tensor, height: int, width: int, generator: torch.Generator | None,
                       *, max_groups: int = 3, max_permutations: int = 2, alpha: float = 3.0,
                       base_probability: float = 0.3, cut_off: float = 0.3,
                       interval: float = -0.1) -> list[tuple[Tensor, Tensor]]:
    """BARON's neighbourhood sampling around one ``box`` (4,) in an image of ``height`` x
    ``width``: up to ``max_groups`` distinct groups (the box and a Bernoulli draw of its grid
    neighbours, :func:`cell_probabilities`), each read in up to ``max_permutations`` distinct
    random orders. Returns per group (boxes (n, 4) clipped to the image in grid order,
    orders (k, n) long)."""
    p = cell_probabilities(box, height, width, alpha=alpha, base_probability=base_probability,
                           cut_off=cut_off, interval=interval)
    cells = grid_boxes(box, interval)
    possible = int((p[torch.arange(9) != 4] > 0).sum())
    wanted = min(max_groups, 2 ** possible)
    groups, seen = [], set()
    for _ in range(20 * wanted):  # distinct draws; the cap ends a run of repeats
        if len(groups) == wanted:
            break
        pick = torch.bernoulli(p, generator=generator).bool()
        pick[4] = True
        key = tuple(pick.tolist())
        if key in seen:
            continue
        seen.add(key)
        b = cells[pick].clone()
        b[:, 0::2] = b[:, 0::2].clamp(0, width)
        b[:, 1::2] = b[:, 1::2].clamp(0, height)
        n = len(b)
        orders, keys = [], set()
        wanted_orders = min(math.factorial(n), max_permutations)
        while len(orders) < wanted_orders:
            order = torch.randperm(n, generator=generator)
            if tuple(order.tolist()) not in keys:
                keys.add(tuple(order.tolist()))
                orders.append(order)
        groups.append((b, torch.stack(orders)))
    return groups


def bag_seeds(boxes: Tensor, scores: Tensor, height: int, width: int, *,
              min_objectness: float = 0.85, nms_iou: float = 0.1, shape_ratio: float = 0.25,
              area_ratio: float = 0.01) -> Tensor:
    """The boxes (K, 4) that bags grow around (BARON's proposal filter): those whose
    objectness ``scores`` exceed ``min_objectness``, whose width / height lies in
    (``shape_ratio``, 1 / ``shape_ratio``) and whose part inside the image exceeds
    ``area_ratio`` of it, then NMS at ``nms_iou``; none left: the best-scored box alone."""
    if len(boxes) == 0:
        return boxes
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)
    ratio = wh[:, 0] / (wh[:, 1] + 1e-12)
    clipped = clip_boxes_to_image(boxes, (height, width))
    inside = (clipped[:, 2:] - clipped[:, :2]).clamp(min=0).prod(1) / (wh.prod(1) + 1e-12)
    keep = ((scores > min_objectness) & (ratio > shape_ratio) & (ratio < 1 / shape_ratio)
            & (inside > area_ratio))
    if not bool(keep.any()):
        return boxes[scores.argmax()][None]
    boxes, scores = boxes[keep], scores[keep]
    return boxes[nms(boxes, scores, nms_iou)]


def sample_bags(seeds: Tensor, height: int, width: int, generator: torch.Generator | None,
                max_len: int, **sampling) -> Bags:
    """Every bag of one image around its ``seeds`` (K, 4) (:func:`bag_seeds`), at most
    ``max_len`` boxes each (:func:`neighbourhood_bags`, ``sampling`` its settings)."""
    boxes, spans, members, group, normed = [], [], [], [], []
    for seed in seeds:
        for b, orders in neighbourhood_bags(seed, height, width, generator, **sampling):
            span = torch.cat([b[:, :2].min(0).values, b[:, 2:].max(0).values])
            size = (span[2:] - span[:2]).clamp(min=1e-6).repeat(2)
            rows = torch.arange(len(b)) + sum(len(x) for x in boxes)
            for order in orders:
                members.append(torch.full((max_len,), -1, dtype=torch.long))
                members[-1][:len(order)] = rows[order]
                pos = torch.zeros(max_len, 4)
                pos[:len(order)] = (b[order] - span[:2].repeat(2)) / size
                normed.append(pos)
                group.append(len(spans))
            boxes.append(b)
            spans.append(span)
    if not spans:
        return Bags(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, max_len, dtype=torch.long),
                    torch.zeros(0, dtype=torch.long), torch.zeros(0, max_len, 4))
    return Bags(torch.cat(boxes), torch.stack(spans), torch.stack(members),
                torch.tensor(group), torch.stack(normed))


class EmbeddingQueue(nn.Module):
    """FIFO of the last ``size`` embeddings (detached), as a persistent ring buffer.

    The dimension is taken from the first :meth:`enqueue` (or from a loaded state dict).
    :meth:`contents` returns (n, D), n <= size, oldest first.
    """

    def __init__(self, size: int = 1024, dim: int | None = None) -> None:
        super().__init__()
        if size < 0:
            raise ValueError(f"queue size must be >= 0, got {size}")
        self.size = size
        self.register_buffer("buffer", torch.zeros(size if dim else 0, dim or 0))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # next slot to write
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # filled slots

    def __len__(self) -> int:
        return int(self.count)

    @torch.no_grad()
    def enqueue(self, embeddings: Tensor) -> None:
        """Append embeddings (N, D), dropping the oldest beyond ``size``."""
        if self.size == 0 or embeddings.shape[0] == 0:
            return
        x = embeddings.detach()[-self.size:]
        if self.buffer.shape[0] == 0:
            self.buffer = torch.zeros(self.size, x.shape[1], dtype=torch.float32, device=x.device)
        elif x.shape[1] != self.buffer.shape[1]:
            raise ValueError(f"queue holds {self.buffer.shape[1]}-d embeddings, got {x.shape[1]}-d")
        idx = (int(self.ptr) + torch.arange(x.shape[0], device=x.device)) % self.size
        self.buffer[idx] = x.to(self.buffer)
        self.ptr.fill_((int(self.ptr) + x.shape[0]) % self.size)
        self.count.fill_(min(int(self.count) + x.shape[0], self.size))

    def contents(self) -> Tensor:
        """(n, D) queued embeddings, oldest first: a copy (a later :meth:`enqueue` leaves it,
        and the graph of a loss computed from it, as it was)."""
        n, p = int(self.count), int(self.ptr)
        if n < self.size:
            return self.buffer[:n].clone()
        return torch.cat([self.buffer[p:], self.buffer[:p]], dim=0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        saved = state_dict.get(prefix + "buffer")
        if saved is not None and saved.shape != self.buffer.shape:  # lazily sized buffer
            self.buffer = torch.zeros_like(saved, device=self.buffer.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def sine_positions(normed: Tensor, features: int = 32, temperature: float = 10000.0) -> Tensor:
    """(..., 4) boxes relative to their bag (x1, y1, x2, y2 in [0, 1]) as (cx, cy, w, h),
    each coordinate in ``features`` sines and cosines of DETR's frequencies (2 pi x /
    temperature ** (2 i / features)) -> (..., 4 x features)."""
    c = torch.cat([(normed[..., :2] + normed[..., 2:]) / 2, normed[..., 2:] - normed[..., :2]], -1)
    i = torch.arange(features // 2, device=normed.device, dtype=normed.dtype)
    freq = temperature ** (2 * i / features)
    x = 2 * math.pi * c[..., None] / freq  # (..., 4, features / 2)
    return torch.cat([x.sin(), x.cos()], -1).flatten(-2)


class PseudoWords(nn.Module):
    """Region embeddings (R, D) -> ``words`` pseudo-words each (R, words, width) of the text
    tower's width: a linear map of the embedding, plus a linear map of the box's sine
    position in its bag (:func:`sine_positions`), as BARON's positional embedding."""

    def __init__(self, embed_dim: int, width: int, words: int = 1, position_features: int = 32):
        super().__init__()
        self.words, self.width, self.position_features = words, width, position_features
        self.project = nn.Linear(embed_dim, words * width)
        self.position = nn.Linear(4 * position_features, words * width)

    def forward(self, embeddings: Tensor, normed: Tensor) -> Tensor:
        x = self.project(embeddings) + self.position(sine_positions(normed, self.position_features))
        return x.view(-1, self.words, self.width)


def drop_words(mask: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """BARON's word dropout: (R, words) bool kept words -> each dropped with chance ``p``,
    at least the first word of every region kept."""
    if p <= 0:
        return mask
    keep = torch.rand(mask.shape, generator=generator, device=mask.device) >= p
    keep[:, 0] |= ~keep.any(1)
    return mask & keep


def pack_sentences(words: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Each bag's kept pseudo-words, in reading order, as one sentence: words (S, N, W) and
    keep (S, N) bool -> (S, max kept, W) left-aligned sentences and their lengths (S,)."""
    lengths = keep.sum(1)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)  # kept first, in order
    length = max(int(lengths.max()), 1) if len(lengths) else 1
    packed = words.gather(1, order[:, :length, None].expand(-1, -1, words.shape[-1]))
    return packed, lengths


def bag_outputs(words: PseudoWords, teacher, images: list[Tensor], member_embeddings: list[Tensor],
                bags: list[dict[str, Tensor]], image_ids: list[int]) -> dict[str, Tensor]:
    """What :func:`distill.losses.bag_loss` needs for a batch: the student's embeddings of its
    bags' boxes (``member_embeddings``, (M_i, D) per image, rows of each image's
    ``bags["boxes"]``) made into pseudo-words (``words``), read by the teacher's text tower
    (``bag_embeddings``); the teacher's region embeddings of the bags' enclosing boxes on the
    (augmented) ``images`` (``bag_targets``); group and image ids, unique over the batch."""
    device = member_embeddings[0].device if member_embeddings else torch.device("cpu")
    sentences, groups, ids, offset = [], [], [], 0
    for emb, bag, image_id in zip(member_embeddings, bags, image_ids, strict=True):
        members = bag["members"]
        s, length = members.shape
        if s == 0:
            continue
        rows = emb[members.clamp(min=0).flatten()]
        w = words(rows, bag["normed"].flatten(0, 1).to(rows.dtype))  # (S * L, words, W)
        keep = (members >= 0)[..., None] & bag["words"]  # (S, L, words)
        sentences.append((w.view(s, length * words.words, -1), keep.view(s, -1)))
        groups.append(bag["group"] + offset)
        ids.append(torch.full((s,), float(image_id), device=device))
        offset += len(bag["spans"])
    if not sentences:
        zero = torch.zeros(0, teacher.embed_dim, device=device)
        return {"bag_embeddings": zero, "bag_targets": zero,
                "bag_groups": torch.zeros(0, dtype=torch.long, device=device),
                "bag_image_ids": torch.zeros(0, device=device)}
    width = max(w.shape[1] for w, _ in sentences)
    w = torch.cat([F.pad(x, (0, 0, 0, width - x.shape[1])) for x, _ in sentences])
    k = torch.cat([F.pad(x, (0, width - x.shape[1])) for _, x in sentences])
    packed, lengths = pack_sentences(w, k)
    targets = teacher.regions(images, [b["spans"] for b in bags])
    group = torch.cat(groups)
    spans = torch.cat(targets).to(device)  # (G, D): the batch's enclosing boxes, in group order
    return {"bag_embeddings": teacher.pseudo_text(packed, lengths).to(device),
            "bag_targets": spans[group], "bag_groups": group, "bag_image_ids": torch.cat(ids)}
