"""The tiny teacher's contrastive pretraining (distill/teacher/pretrain.py, tools/pretrain_teacher.py)."""

import json
import random
from pathlib import Path

import numpy as np
import open_clip
import torch

from distill.config import load_config
from distill.data.synthetic import generate_world
from distill.teacher.pretrain import CropCaptions
from tools import pretrain_teacher

REPO = Path(__file__).resolve().parents[1]
WORLD = ["world.num_train=40", "world.num_val=12", "world.image_size=96", "world.max_objects=4"]


def test_batches_hold_distinct_captions_colour_by_colour(tmp_path):
    cfg = load_config(REPO / "configs/shapes/teacher.yaml", [f"world.root={tmp_path}", *WORLD])
    data = CropCaptions(generate_world(cfg.world, progress=False))
    mean, std = torch.zeros(3), torch.ones(3)
    crops, captions = data.sample(random.Random(0), 24, 64, mean, std)
    stuff = [n for n, pool in data.stuff.items() if pool]
    assert crops.shape == (len(captions), 3, 64, 64) and len(captions) <= 24 + len(stuff)
    # one crop per stuff class closes the batch, each captioned with its own name
    assert [c.split()[-1] for c in captions[-len(stuff):]] == stuff and len(stuff) >= 3
    # never two objects of the same shape and colour in a batch: no false negatives
    keys = [next((c, n) for c in data.by_key_colours for n in data.names
                 if f" {c} {n}" in f" {cap}") for cap in captions[:-len(stuff)]]
    assert len(set(keys)) == len(keys)
    # crops are cut from [0, 255] pixels and then normalised with (mean, std)
    assert 0 <= crops.min() and crops.max() <= 1.0 + 1e-5


def test_stuff_boxes_hold_their_stuff_class(tmp_path):
    cfg = load_config(REPO / "configs/shapes/teacher.yaml", [f"world.root={tmp_path}", *WORLD])
    world = generate_world(cfg.world, progress=False)
    data = CropCaptions(world)
    files = sorted(Path(world.semantic["train"]).glob("*.png"))
    from PIL import Image
    checked = 0
    for k, pool in enumerate(data.stuff.values()):
        label = len(world.classes) + 1 + k
        for i, (x0, y0, x1, y1) in pool:
            sem = np.asarray(Image.open(files[i]))[y0:y1, x0:x1]
            assert x1 - x0 == y1 - y0 >= 16 and (sem == label).mean() >= 0.9
            checked += 1
    assert checked >= 10


def test_pretrain_writes_a_checkpoint_open_clip_loads_and_its_record(tmp_path, capsys):
    out = tmp_path / "teacher.safetensors"
    args = ["--no-progress", f"world.root={tmp_path / 'world'}", *WORLD,
            "pretrain.iters=12", "pretrain.eval_period=6", "pretrain.batch_size=32",
            f"pretrain.output={out}"]
    assert pretrain_teacher.main(args) == 0
    printed = capsys.readouterr().out
    assert "iteration 6: loss" in printed and "zero-shot top-1 on val object crops" in printed
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["checkpoint"] == str(out) and record["pretrain"]["iters"] == 12
    assert record["command"].startswith("python -m tools.pretrain_teacher --no-progress")
    assert set(record["zero_shot"]) == {"top1_all", "top1_base", "top1_novel", "objects_base",
                                        "objects_novel"}
    open_clip.add_model_config(str(REPO / "configs/shapes/teacher/tiny_rn.json"))
    model = open_clip.create_model("tiny_rn", pretrained=str(out))
    fresh = open_clip.create_model("tiny_rn", pretrained=None)
    assert not torch.equal(model.visual.conv1.weight, fresh.visual.conv1.weight)
    assert len(list(tmp_path.glob(".*tmp*"))) == 0
    # --evaluate-only rescores the checkpoint and keeps the recorded training time
    assert pretrain_teacher.main([*args, "--evaluate-only"]) == 0
    again = json.loads(out.with_suffix(".json").read_text())
    assert again["zero_shot"] == record["zero_shot"]
    assert again["pretrain_seconds"] == record["pretrain_seconds"]
