"""Contrastive pretraining of a tiny open_clip teacher on the synthetic world.

The teacher plays CLIP's part: it has "seen the web", so it is trained on the
captions of every object class, base and novel alike (only the student's box
labels are restricted). Training pairs are object crops and their captions
("a small red star"), cut with ViLD's crop scales (1x, 1.5x) with a little jitter, so
that the teacher sees the kind of crops it embeds later. A batch never holds two
objects of the same shape and colour (their captions would describe each other's
crops: false negatives for the contrastive loss), and it is built as a few colours x
every shape, so that colour alone never tells a crop's caption from the others.

With ``pretrain.stuff_crops`` the teacher also learns the world's stuff, as CLIP saw
grass and sky as often as things: each batch adds one crop of every stuff class
("sand", "water", ...) cut where the semantic map holds that stuff and no object.
Without them a crop of bare background (most of an RPN's proposals) embeds as
confidently as an object; docs/results.md measures the trade-off.

    model = pretrain(world, teacher_cfg, pretrain_cfg)   # an open_clip CLIP model
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from PIL import Image
from tqdm import tqdm

from distill.config import PretrainConfig, TeacherConfig, atomic_write
from distill.data.synthetic import World
from distill.teacher.clip import cut_crops, save_clip
from distill.teacher.dense import dense_features

CAPTION_FORMS = (  # (form, weight): every form names the colour and the shape
    ("a {color} {name}", 6),
    ("a {size} {color} {name}", 1),
    ("a photo of a {color} {name}", 1),
)
_FORMS, _WEIGHTS = zip(*CAPTION_FORMS, strict=True)
STUFF_FORMS = ("{stuff}", "a photo of {stuff}", "a patch of {stuff}")
STUFF_PURITY = 0.9  # a stuff crop holds at least this fraction of its stuff class


class CropCaptions:
    """Every object of a split, with its image kept in memory for fast crop sampling.

    images (N, 3, S, S) uint8; objects: (image index, bbox xyxy, name, colour, size word).
    """

    def __init__(self, world: World, split: str = "train"):
        import json

        data = json.loads(Path(world.captions[split]).read_text())["images"]
        image_dir = Path(world.images[split])
        self.images = torch.from_numpy(np.stack([
            np.asarray(Image.open(image_dir / rec["file_name"]).convert("RGB"))
            for rec in data])).permute(0, 3, 1, 2).contiguous()
        self.objects = []
        for i, rec in enumerate(data):
            for obj in rec["objects"]:
                x, y, w, h = obj["bbox"]
                self.objects.append((i, (x, y, x + w, y + h), obj["name"], obj["color"],
                                     obj["size"]))
        self.by_key: dict[tuple[str, str], list[int]] = {}
        for k, (_, _, name, color, _) in enumerate(self.objects):
            self.by_key.setdefault((name, color), []).append(k)
        self.names = sorted({o[2] for o in self.objects})
        self.by_key_colours = sorted({o[3] for o in self.objects})
        self.stuff = _stuff_boxes(world, split, data)  # stuff name -> [(image index, box)]

    def _stuff_crops(self, rng: random.Random) -> tuple[list[tuple[int, tuple]], list[str]]:
        picked, captions = [], []
        for name, pool in self.stuff.items():
            if pool:
                picked.append(rng.choice(pool))
                captions.append(rng.choice(STUFF_FORMS).format(stuff=name))
        return picked, captions

    def sample(self, rng: random.Random, n: int, image_size: int, mean: torch.Tensor,
               std: torch.Tensor, scales: tuple[float, ...] = (1.0, 1.5),
               jitter: float = 0.05, stuff: bool = True) -> tuple[torch.Tensor, list[str]]:
        """Up to n object crops then (``stuff``) one crop per stuff class, (m, 3, image_size,
        image_size) normalised, with m distinct captions (never two objects of the same
        shape and colour: each caption would fit the other).

        Each object crop is the object's box enlarged by one of ``scales`` (the teacher's
        crop rule), with size and centre jittered by up to ``jitter``.
        """
        # a few colours x every shape: each crop's in-batch negatives of its own colour
        # differ from it only in shape, so colour alone cannot solve the batch
        colours = list(self.by_key_colours)
        rng.shuffle(colours)
        picked, captions = [], []
        for color in colours:
            for name in self.names:
                pool = self.by_key.get((name, color))
                if pool and len(picked) < n:
                    obj = self.objects[rng.choice(pool)]
                    picked.append(obj)
                    form = rng.choices(_FORMS, _WEIGHTS)[0]
                    captions.append(form.format(name=name, color=color, size=obj[4]))
        rois = []
        for k, (_, (x0, y0, x1, y1), *_) in enumerate(picked):
            s = rng.choice(scales) * rng.uniform(1 - jitter, 1 + jitter)
            cx = (x0 + x1) / 2 + rng.uniform(-jitter, jitter) * (x1 - x0)
            cy = (y0 + y1) / 2 + rng.uniform(-jitter, jitter) * (y1 - y0)
            hw, hh = s * (x1 - x0) / 2, s * (y1 - y0) / 2
            rois.append([k, cx - hw, cy - hh, cx + hw, cy + hh])
        if stuff:
            stuff_picked, stuff_captions = self._stuff_crops(rng)
            rois += [[len(rois), *box] for _, box in stuff_picked]
            picked, captions = picked + stuff_picked, captions + stuff_captions
        imgs = self.images[[p[0] for p in picked]].float()
        crops = cut_crops(imgs, torch.tensor(rois, dtype=torch.float32),
                          (image_size, image_size))
        # cutting is linear: normalising the crops equals cutting normalised images
        crops = (crops / 255 - mean[:, None, None]) / std[:, None, None]
        flip = torch.tensor([rng.random() < 0.5 for _ in picked])
        crops[flip] = crops[flip].flip(-1)
        return crops, captions


def _stuff_boxes(world: World, split: str, records: list[dict], per_image: int = 2,
                 tries: int = 12, seed: int = 0) -> dict[str, list[tuple[int, tuple]]]:
    """Boxes of pure stuff: per image and stuff class present, up to ``per_image`` random
    squares (16 px to half the image) whose pixels are >= STUFF_PURITY that class.

    Returns stuff name -> [(image index, (x0, y0, x1, y1))]; a class never found has [].
    """
    rng = np.random.default_rng(seed)
    first = len(world.classes) + 1  # semantic label of the first stuff class
    pools: dict[str, list[tuple[int, tuple]]] = {n: [] for n in world.stuff_classes}
    for i, rec in enumerate(records):
        label = np.asarray(Image.open(Path(world.semantic[split]) / rec["file_name"]))
        size = label.shape[0]
        for k, name in enumerate(world.stuff_classes):
            found = 0
            if name not in rec.get("stuff", ()):
                continue
            for _ in range(tries):
                s = int(rng.integers(16, size // 2 + 1))
                x, y = (int(v) for v in rng.integers(0, size - s + 1, 2))
                if (label[y:y + s, x:x + s] == first + k).mean() >= STUFF_PURITY:
                    pools[name].append((i, (x, y, x + s, y + s)))
                    found += 1
                    if found == per_image:
                        break
    return pools


def pretrain(world: World, teacher: TeacherConfig, cfg: PretrainConfig,
             progress: bool = True, log=print) -> torch.nn.Module:
    """Train ``teacher.model`` (built from ``teacher.model_config``) from scratch."""
    if teacher.model_config:
        open_clip.add_model_config(teacher.model_config)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model = open_clip.create_model(teacher.model, pretrained=None)
    model.train()
    # channels-last convolutions: the ResNet tower's step is ~25% faster on CPU
    model.visual.to(memory_format=torch.channels_last)
    tokenizer = open_clip.get_tokenizer(teacher.model)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD)
    data = CropCaptions(world, "train")
    # as open_clip's training: no weight decay on gains, biases, embeddings and logit_scale
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}],
                                  lr=cfg.lr, fused=True)  # one kernel: 5x faster step on CPU
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: min(
        1.0, (it + 1) / max(cfg.warmup_iters, 1)) * 0.5 * (1 + math.cos(math.pi * it / cfg.iters)))
    loss_fn = ClipLoss()
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.iters), desc="pretrain teacher", disable=not progress, dynamic_ncols=True)
    for it in bar:
        crops, captions = data.sample(rng, cfg.batch_size, size, mean, std,
                                      tuple(teacher.crop_scales), cfg.crop_jitter,
                                      cfg.stuff_crops)
        image_features = model.encode_image(crops.contiguous(memory_format=torch.channels_last),
                                            normalize=True)
        text_features = model.encode_text(tokenizer(captions), normalize=True)
        loss = loss_fn(image_features, text_features, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if (it + 1) % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if cfg.eval_period and (it + 1) % cfg.eval_period == 0 and it + 1 < cfg.iters:
            acc = _quick_zero_shot(model, teacher, world)
            log(f"iteration {it + 1}: loss {loss.item():.3f}, zero-shot top-1 on 100 val images: "
                f"all {acc['top1_all']:.3f}, base {acc['top1_base']:.3f}, "
                f"novel {acc['top1_novel']:.3f} ({time.perf_counter() - t0:.0f} s)")
            model.train()
    log(f"pretrained {teacher.model} for {cfg.iters} iterations in "
        f"{time.perf_counter() - t0:.0f} s")
    return model.eval()


def _quick_zero_shot(model: torch.nn.Module, teacher: TeacherConfig, world: World) -> dict:
    """Zero-shot accuracy of a snapshot of ``model`` on the first 100 val images."""
    import copy

    from distill.teacher.clip import Teacher

    snapshot = Teacher(copy.deepcopy(model).to(memory_format=torch.contiguous_format),
                       teacher.model, templates=teacher.templates,
                       crop_scales=teacher.crop_scales, batch_size=teacher.batch_size)
    return zero_shot_accuracy(snapshot, world, max_images=100)


def _val_objects(world: World, split: str, max_images: int | None, batch_images: int):
    """Batches of (records, images, boxes) of ``split``'s objects (xyxy pixels)."""
    from distill.data.coco import load_image

    data = json.loads(Path(world.captions[split]).read_text())["images"][:max_images]
    for start in range(0, len(data), batch_images):
        recs = data[start:start + batch_images]
        images = [load_image(Path(world.images[split]) / r["file_name"]) for r in recs]
        boxes = [torch.tensor([[o["bbox"][0], o["bbox"][1], o["bbox"][0] + o["bbox"][2],
                                o["bbox"][1] + o["bbox"][3]] for o in r["objects"]],
                              dtype=torch.float32).reshape(-1, 4) for r in recs]
        yield recs, images, boxes


def zero_shot_accuracy(teacher, world: World, split: str = "val", batch_images: int = 32,
                       max_images: int | None = None) -> dict[str, float]:
    """Top-1 zero-shot classification of every object crop of ``split`` over all object classes.

    Crops follow the teacher's region rule (ViLD: 1x + 1.5x); the classifier is
    the prompt-ensembled text embedding of each class name. Returns accuracy on
    all, base and novel objects, and the number of objects of each.
    """
    classes = list(world.classes)
    text = teacher.text(classes)
    correct, novel = [], []
    for recs, images, boxes in _val_objects(world, split, max_images, batch_images):
        for r, emb in zip(recs, teacher.regions(images, boxes), strict=True):
            pred = (emb @ text.T).argmax(-1).tolist()
            for o, p in zip(r["objects"], pred, strict=True):
                correct.append(classes[p] == o["name"])
                novel.append(o["name"] in world.novel_classes)
    c, n = torch.tensor(correct, dtype=torch.float32), torch.tensor(novel)
    return {"top1_all": c.mean().item(), "top1_base": c[~n].mean().item(),
            "top1_novel": c[n].mean().item(), "objects_base": int((~n).sum()),
            "objects_novel": int(n.sum())}


def _dense_on_own_crops(teacher, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(N, D) normalised: the teacher's dense path on each box's 1x crop of ``image`` at the
    tower's input size, averaged over its map."""
    rois = torch.cat([boxes.new_zeros(len(boxes), 1), boxes], 1).to(teacher.device)
    with torch.inference_mode():
        crops = cut_crops(teacher.normalize(image[None]), rois, teacher.image_size)
        feats = dense_features(teacher.dense_tower, crops, teacher.dense_mode)
    return F.normalize(feats.float().mean((-2, -1)), dim=-1)


def region_accuracy(teacher, world: World, split: str = "val", batch_images: int = 32,
                    max_images: int | None = None) -> dict[str, float]:
    """The dense-vs-crop protocol (issue 24): zero-shot top-1 over the world's object names
    of every ``split`` object box, embedded from crops (``crop_top1``, the teacher's crop
    rule) and from the dense map (``dense_top1``: RoIAlign on :meth:`Teacher.dense` at the
    teacher's dense input size), and the mean cosine of the two embeddings of a box.
    ``dense_on_crop_top1`` is a diagnostic: the dense path run on each object's own 1x crop
    at the tower's input size and averaged over its map, i.e. the dense path without the
    rest of the image or a change of scale (what is left is the dense path's own loss)."""
    classes = list(world.classes)
    text = teacher.text(classes)
    hits = {"crop": [], "dense": [], "dense_on_crop": []}
    cosines = []
    for recs, images, boxes in _val_objects(world, split, max_images, batch_images):
        crop = teacher.regions(images, boxes, mode="crop")
        dense = teacher.regions(images, boxes, mode="dense")
        own = [_dense_on_own_crops(teacher, i, b) for i, b in zip(images, boxes, strict=True)]
        for r, c, d, s in zip(recs, crop, dense, own, strict=True):
            names = [o["name"] for o in r["objects"]]
            for mode, emb in (("crop", c), ("dense", d), ("dense_on_crop", s)):
                hits[mode] += [classes[p] == n for p, n in
                               zip((emb @ text.T).argmax(-1).tolist(), names, strict=True)]
            cosines += (c * d).sum(-1).tolist()
    return {f"{mode}_top1": sum(h) / len(h) for mode, h in hits.items()} | {
        "cosine": sum(cosines) / len(cosines), "objects": len(cosines)}


def pretrain_and_save(cfg, world, progress: bool, argv: list[str]) -> dict:
    """Pretrain ``cfg.teacher`` on ``world``, write ``cfg.pretrain.output`` atomically, score it."""
    t = time.perf_counter()
    model = pretrain(world, cfg.teacher, cfg.pretrain, progress=progress)
    seconds = round(time.perf_counter() - t, 1)
    save_clip(model, cfg.pretrain.output)
    return evaluate_and_record(cfg, world, argv, seconds)


def evaluate_and_record(cfg, world, argv: list[str], seconds: float | None = None) -> dict:
    """Zero-shot accuracy of the checkpoint; written to ``<checkpoint>.json`` with how it was
    made (``argv``: the command, as words)."""
    out = Path(cfg.pretrain.output)
    record_path = out.with_suffix(".json")
    from distill.teacher.clip import Teacher

    teacher = Teacher.from_config(dataclasses.replace(cfg.teacher, pretrained=str(out)))
    previous = json.loads(record_path.read_text()) if record_path.is_file() else {}
    record = {
        "checkpoint": str(out),
        "command": " ".join(argv),
        "teacher": dataclasses.asdict(cfg.teacher),
        "pretrain": dataclasses.asdict(cfg.pretrain),
        "world": world.fingerprint,
        "fingerprint": teacher.fingerprint,
        "pretrain_seconds": seconds if seconds is not None else previous.get("pretrain_seconds"),
        "zero_shot": zero_shot_accuracy(teacher, world),
    }
    atomic_write(record_path, json.dumps(record, indent=2) + "\n")
    return record
