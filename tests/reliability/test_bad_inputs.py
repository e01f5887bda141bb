"""Bad inputs through the real command-line tools: each gives exit code 2 and one line on
stderr naming the file, record or key (no traceback), and what earlier runs wrote (a cache,
a checkpoint, metrics) stays byte for byte. docs/reliability.md lists the cases."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from distill.cache import EmbeddingCache
from distill.data.semantic import DatasetError, SemanticDataset
from tests.reliability.conftest import REPO, files
from tools import eval as eval_tool
from tools import export, extract, train

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def base(tiny, tmp_path_factory):
    """A cache and a finished 2-iteration run that every case must leave as they are."""
    root = tmp_path_factory.mktemp("bad_inputs")
    assert extract.main(["--no-progress", *tiny.extract("base")]) == 0
    run = root / "run"
    args = tiny.train(run, "base", "train.max_iters=2", "train.checkpoint_period=1",
                      "train.keep_checkpoints=1")
    assert train.main(["--no-progress", *args]) == 0
    return SimpleNamespace(root=root, store=tiny.root / "cache" / "base", run=run, args=args)


def _digest(directory: Path) -> dict[str, str]:
    return {k: hashlib.sha256(v).hexdigest() for k, v in files(directory).items()}


@pytest.fixture(autouse=True)
def prior_outputs_intact(base):
    before = _digest(base.store), _digest(base.run)
    yield
    assert (_digest(base.store), _digest(base.run)) == before


def fails(tool, args: list[str], capsys, *fragments: str) -> str:
    """Run ``tool.main(args)``: exit code 2, one ``error:`` line holding every fragment."""
    rc = tool.main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def train_copy(tiny, tmp_path):
    """A copy of the tiny world's train split: (instances JSON, image folder, overrides)."""
    instances, images = tmp_path / "instances.json", tmp_path / "images"
    shutil.copy(tiny.world.instances["train"], instances)
    shutil.copytree(tiny.world.images["train"], images)
    return instances, images, [f"data.train_instances={instances}", f"data.train_images={images}"]


def _edit(path: Path, change) -> dict:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return data


# --------------------------------------------------------------------------- annotation files

def _ann(index: int, **fields):
    return lambda d: d["annotations"][index].update(fields)


def _dup_image_id(d):
    d["images"][1]["id"] = d["images"][0]["id"]


# a box of zero area or outside its image and a polygon under 3 points are real files'
# quirks, cleaned up rather than refused (tests/test_coco_data.py)
BAD_RECORDS = {
    "bbox of 3 numbers": (_ann(0, bbox=[10, 10, 12]), "is not 4 finite numbers"),
    "unknown category id": (_ann(1, category_id=99), "unknown category id 99"),
    "annotation of an unknown image": (_ann(2, image_id=424242), "unknown image id 424242"),
}


@pytest.mark.parametrize("case", BAD_RECORDS)
def test_bad_annotation_record_is_named(case, tiny, train_copy, capsys):
    instances, _, data_args = train_copy
    change, problem = BAD_RECORDS[case]
    data = _edit(instances, change)
    k = list(BAD_RECORDS).index(case)
    a = data["annotations"][k]
    fails(extract, ["--no-progress", *tiny.extract(f"rec{k}"), *data_args], capsys,
          f"{instances}: annotation {a['id']} (image {a['image_id']}): ", problem,
          "data.on_error=skip")
    assert not (tiny.root / "cache" / f"rec{k}").exists()  # refused before writing anything


def test_duplicate_image_ids(tiny, train_copy, capsys):
    instances, _, data_args = train_copy
    data = _edit(instances, _dup_image_id)
    fails(extract, ["--no-progress", *tiny.extract("dup"), *data_args], capsys,
          f"{instances}: image id {data['images'][0]['id']} appears more than once")


@pytest.mark.parametrize("cut", ["malformed", "truncated"])
def test_malformed_or_truncated_json(cut, tiny, train_copy, capsys):
    instances, _, data_args = train_copy
    text = instances.read_text()
    instances.write_text(text[: len(text) // 2] if cut == "truncated" else text.replace(":", "=", 1))
    fails(extract, ["--no-progress", *tiny.extract("json"), *data_args], capsys,
          f"{instances}: malformed JSON")


def test_empty_annotation_list(tiny, train_copy, tmp_path, capsys):
    instances, _, data_args = train_copy
    _edit(instances, lambda d: d.update(annotations=[]))
    fails(train, ["--no-progress", *tiny.train(tmp_path / "run", "base"), *data_args], capsys,
          f"{instances}: no annotations of the 12 base categories to train on")
    assert not (tmp_path / "run").exists()


def test_duplicate_class_names(tiny, train_copy, tmp_path, capsys):
    instances, _, data_args = train_copy
    _edit(instances, lambda d: d["categories"][2].update(name=d["categories"][1]["name"]))
    fails(train, ["--no-progress", *tiny.train(tmp_path / "run", "base"), *data_args], capsys,
          f"{instances}: categories 2 and 3 are both named 'square'")


# --------------------------------------------------------------------------- image files

def _corrupt(path: Path) -> None:
    path.write_bytes(b"\x89PNG\r\n\x1a\n but then garbage " * 8)


def _resize(path: Path) -> None:
    Image.new("RGB", (97, 96)).save(path)


BAD_IMAGES = {
    "corrupt bytes": (_corrupt, "cannot decode image {path}: "),
    "missing file": (Path.unlink, "image file not found: {path}"),
    "size disagrees with the annotation": (
        _resize, "image {path} is 96x97 (HxW) but instances.json says 96x96"),
}


@pytest.mark.parametrize("case", BAD_IMAGES)
def test_bad_image_stops_extraction_keeping_the_shards_written(case, tiny, train_copy, capsys):
    """The 11th of 11 images is bad: the first batch's 8 images were stored (4 shards) and
    stay; once the image is fixed the same command finishes without redoing them."""
    instances, images, data_args = train_copy
    name = f"img{list(BAD_IMAGES).index(case)}"
    last = images / json.loads(instances.read_text())["images"][-1]["file_name"]
    good = last.read_bytes()
    damage, message = BAD_IMAGES[case]
    damage(last)
    args = ["--no-progress", *tiny.extract(name), *data_args]
    fails(extract, args, capsys, message.format(path=last))
    store = tiny.root / "cache" / name
    cache = EmbeddingCache.open(store)
    cache.verify()
    assert len(cache) == 8 and not cache.complete
    stamps = {p.name: p.stat().st_mtime_ns for p in store.glob("shard-*.bin")}
    last.write_bytes(good)
    assert extract.main(args) == 0
    assert EmbeddingCache.open(store).complete
    assert {p: t for p, t in stamps.items()} == {
        p.name: p.stat().st_mtime_ns for p in store.glob("shard-*.bin") if p.name in stamps}


def test_skip_policy_leaves_bad_records_and_images_out_and_lists_them(tiny, train_copy,
                                                                      tmp_path, capsys):
    instances, images, data_args = train_copy
    data = json.loads(instances.read_text())
    for change, _ in BAD_RECORDS.values():
        change(data)
    instances.write_text(json.dumps(data))
    files_ = [images / im["file_name"] for im in data["images"]]
    _corrupt(files_[-1])
    files_[-2].unlink()
    _resize(files_[-3])
    skip = [*data_args, "data.on_error=skip"]
    assert extract.main(["--no-progress", *tiny.extract("skip"), *skip]) == 0
    store = tiny.root / "cache" / "skip"
    listed = json.loads((store / "skipped.json").read_text())
    bad_images = {im["id"] for im in data["images"][-3:]}
    assert {e["image_id"] for e in listed if "file" in e} == bad_images
    reasons = " | ".join(e["reason"] for e in listed)
    for _, problem in BAD_RECORDS.values():
        assert problem in reasons
    assert "file not found" in reasons and "not a readable image" in reasons
    assert "is 96x97 (HxW)" in reasons
    cache = EmbeddingCache.open(store)
    assert cache.complete and set(cache.ids()) == {im["id"] for im in data["images"]} - bad_images
    # training with the same policy reads the same images: the cache covers them all
    run = tmp_path / "run"
    assert train.main(["--no-progress", *tiny.train(run, "skip", "train.max_iters=1"), *skip]) == 0
    assert "left out" in capsys.readouterr().out
    assert json.loads((run / "skipped.json").read_text())["train"] == listed


def test_label_png_outside_the_class_range(tiny, tmp_path):
    for d in ("images", "labels"):
        (tmp_path / d).mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images/a.png")
    label = np.zeros((8, 8), np.uint8)
    label[2, 3] = 200
    Image.fromarray(label).save(tmp_path / "labels/a.png")
    data = SemanticDataset(tmp_path / "images", tmp_path / "labels", tiny.world.semantic_classes)
    with pytest.raises(DatasetError) as e:
        data[0]
    assert str(e.value) == f"{tmp_path / 'labels/a.png'}: label value 200 outside the 20 classes"


# --------------------------------------------------------------------------- configuration

@pytest.mark.parametrize("override, message", [
    ("train.max_iter=5", "unknown config key 'train.max_iter'; did you mean 'train.max_iters'?"),
    ("train.max_iters=abc", "bad value for 'train.max_iters'"),
    ("data.on_error=ignore", "data.on_error must be one of fail, skip, got 'ignore'"),
    ("model.name=vild_r11_fpn", "model.name: unknown detector 'vild_r11_fpn'"),
    ("teacher.model=ViT-B-99", "unknown open_clip model 'ViT-B-99'"),
], ids=["config typo", "wrong value type", "bad on_error", "unknown model", "unknown teacher"])
def test_bad_config_value(override, message, tiny, tmp_path, capsys):
    args = tiny.train(tmp_path / "run", "base", override)
    if override.startswith("teacher."):
        args.append("teacher.model_config=null")  # a plain open_clip name
    fails(train, ["--no-progress", *args], capsys, message)
    assert not (tmp_path / "run").exists()


def test_extract_typo_missing_proposals_and_another_teacher(tiny, capsys):
    fails(extract, ["--no-progress", *tiny.extract("x"), "cache.nmae=x"], capsys,
          "unknown config key 'cache.nmae'")
    fails(extract, ["--no-progress", *tiny.extract("x"), "cache.proposals=nowhere.safetensors"],
          capsys, "file not found: nowhere.safetensors")
    # another teacher (one crop scale) into the existing store: refused, store untouched
    fails(extract, ["--no-progress", *tiny.extract("base"), "teacher.crop_scales=[1.0]"], capsys,
          "was written by teacher fingerprint", "use another cache.name")


def test_rerun_with_another_config_into_a_run_is_refused(base, capsys):
    fails(train, ["--no-progress", *base.args, "train.optim.lr=0.5"], capsys,
          f"{base.run} holds a run of another config (train.optim.lr: 0.0005 there, 0.5 now)")


# --------------------------------------------------------------------------- caches

def test_cache_written_by_another_teacher(tiny, tmp_path, capsys):
    fails(train, ["--no-progress", *tiny.train(tmp_path / "run", "base",
                                                "teacher.crop_scales=[1.0]")], capsys,
          f"cache {tiny.root / 'cache' / 'base'} was written by another teacher")


def _store_copy(tiny, base, name: str) -> Path:
    store = tiny.root / "cache" / name
    shutil.rmtree(store, ignore_errors=True)
    shutil.copytree(base.store, store)
    return store


def test_cache_from_another_dataset(tiny, base, tmp_path, capsys):
    store = _store_copy(tiny, base, "other_dataset")
    meta = json.loads((store / "meta.json").read_text())
    (store / "meta.json").write_text(json.dumps({**meta, "dataset_id": "0123456789abcdef"}))
    fails(train, ["--no-progress", *tiny.train(tmp_path / "run", "other_dataset")], capsys,
          f"cache {store} was written by dataset 0123456789abcdef, this run's is "
          f"{meta['dataset_id']}")


def test_corrupt_cache_shard(tiny, base, tmp_path, capsys):
    """A flipped byte is found by ``tools.extract --verify`` (a student's start checks only the
    shards' sizes: issue 33); a shard cut short stops the student at its start."""
    store = _store_copy(tiny, base, "corrupt")
    shard = store / "shard-00001.bin"
    data = bytearray(shard.read_bytes())
    data[7] ^= 0xFF
    shard.write_bytes(bytes(data))
    fails(extract, ["--no-progress", *tiny.extract("corrupt"), "--verify"], capsys,
          f"cache shard {shard} is corrupt", "rerun extraction with the same command")
    shard.write_bytes(bytes(data[:-3]))
    fails(train, ["--no-progress", *tiny.train(tmp_path / "run", "corrupt")], capsys,
          f"cache shard {shard} is truncated", "rerun extraction with the same command")


# --------------------------------------------------------------------------- checkpoints

def test_checkpoint_of_another_architecture(base, capsys):
    fails(eval_tool, ["--no-progress", *base.args, "model.name=vild_r18_fpn"], capsys,
          f"{base.run / 'model_final.safetensors'}: does not fit ViLD")


def test_teacher_and_student_embedding_sizes_differ(base, tmp_path, capsys):
    config = json.loads((REPO / "configs/shapes/teacher/tiny_vit.json").read_text())
    (tmp_path / "tiny_vit64.json").write_text(json.dumps({**config, "embed_dim": 64}))
    fails(eval_tool, ["--no-progress", *base.args, "teacher.model=tiny_vit64",
                      f"teacher.model_config={tmp_path / 'tiny_vit64.json'}"], capsys,
          "does not fit ViLD", "differ in shape", "in the file and", "another embedding size")


class _Payload:
    """Unpickling this creates ``target``: proof that a pickle was executed."""

    target = ""

    def __reduce__(self):
        return (Path.touch, (Path(_Payload.target),))


def _partial_run(base, tmp_path) -> Path:
    """config.yaml, model_final and the last checkpoint of the base run, copied."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "model_final.safetensors", "checkpoints/last_checkpoint"):
        shutil.copy(base.run / name, run / name)
    shutil.copytree(base.run / "checkpoints/iter_0000002", run / "checkpoints/iter_0000002")
    return run


@pytest.mark.parametrize("target", ["model_final.safetensors", "checkpoints/iter_0000002/state.pt"])
def test_pickle_posing_as_a_checkpoint_is_refused_unexecuted(target, base, tmp_path, capsys):
    run = _partial_run(base, tmp_path)
    _Payload.target = str(tmp_path / "pwned")
    (run / target).write_bytes(pickle.dumps({"w": _Payload(), "t": torch.zeros(1)}, protocol=2))
    if target.endswith("state.pt"):  # the rerun resumes from this checkpoint
        fails(train, ["--no-progress", *base.args, f"output_dir={run}"], capsys,
              f"{run / target}: unreadable training state")
    else:
        fails(eval_tool, ["--no-progress", *base.args, f"output_dir={run}"], capsys,
              f"{run / target}: not a safetensors checkpoint", "pickled checkpoints are refused")
    assert not (tmp_path / "pwned").exists()


def test_truncated_weights(base, tmp_path, capsys):
    run = _partial_run(base, tmp_path)
    weights = run / "model_final.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    fails(eval_tool, ["--no-progress", *base.args, f"output_dir={run}"], capsys,
          f"{weights}: not a safetensors checkpoint")


def test_non_finite_loss_stops_keeping_the_last_checkpoint(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    line = fails(train, ["--no-progress", *tiny.train(
        run, "base", "train.max_iters=8", "train.checkpoint_period=1", "train.optim.lr=1e4",
        "train.clip_grad_norm=0", "train.schedule.warmup_iters=0")], capsys,
        "loss term 'loss_", "; stopped. Last good checkpoint: ")
    k = int(re.search(r"at iteration (\d+)", line).group(1))
    assert k >= 2 and line.endswith(f"{run / 'checkpoints' / f'iter_{k - 1:07d}'}")
    state = torch.load(run / f"checkpoints/iter_{k - 1:07d}/state.pt", weights_only=True)
    assert state["iteration"] == k - 1
    logged = [json.loads(x)["iter"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, k))


# --------------------------------------------------------------------------- export

def test_export_with_an_empty_vocabulary(base, tmp_path, capsys):
    fails(export, ["--run", str(base.run), "--output", str(tmp_path / "out"),
                   "--vocabulary", " , "], capsys, "the vocabulary: no class names")
    assert not (tmp_path / "out").exists()
