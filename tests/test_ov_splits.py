"""OV split tools (tools/make_ov_{coco,lvis}.py) and dataset roots (distill/data/roots.py)
on the real COCO val2014 / LVIS v0.5 fixtures, with counts checked against plain-Python
counts over the input files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from distill.config import ConfigError
from distill.data import roots
from distill.data.coco import CocoDetection, DatasetError
from distill.data.vocab import COCO_OV_BASE, COCO_OV_BASE_IDS, COCO_OV_NOVEL, COCO_OV_NOVEL_IDS
from tools import make_ov_coco, make_ov_lvis

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
COCO_JSON = FIXTURES / "coco_instances_val2014_100.json"
LVIS_JSON = FIXTURES / "lvis_v0.5_val_100.json"

# Independent of distill.data.vocab: the split as DESIGN.md states it (OVR-CNN), by name.
NOVEL = {"airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard",
         "skateboard", "cup", "knife", "cake", "couch", "keyboard", "sink", "scissors"}
NOT_OV = {"traffic light", "fire hydrant", "stop sign", "parking meter", "sports ball",
          "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog",
          "potted plant", "dining table", "cell phone", "teddy bear", "hair drier"}


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture
def coco_json(tmp_path) -> Path:
    return Path(shutil.copy(COCO_JSON, tmp_path / "instances_val2014.json"))


@pytest.fixture
def lvis_json(tmp_path) -> Path:
    return Path(shutil.copy(LVIS_JSON, tmp_path / "lvis_val.json"))


def expected_coco(split: str) -> dict:
    """Counts of the OV-COCO ``split`` computed directly from the fixture."""
    data = _json(COCO_JSON)
    name = {c["id"]: c["name"] for c in data["categories"]}
    keep = {i for i, n in name.items() if n not in NOT_OV and (split == "val" or n not in NOVEL)}
    anns = [a for a in data["annotations"] if a["category_id"] in keep]
    images = {a["image_id"] for a in anns}  # images left without annotations are dropped
    return {"images": len(images), "annotations": len(anns), "ann_ids": {a["id"] for a in anns},
            "image_ids": images, "categories": len(name) - len(NOT_OV), "novel": len(NOVEL)}


def expected_lvis() -> dict:
    data = _json(LVIS_JSON)
    rare = {c["id"] for c in data["categories"] if c["frequency"] == "r"}
    return {"images": len(data["images"]), "rare": rare, "categories": len(data["categories"]),
            "annotations": sum(a["category_id"] not in rare for a in data["annotations"]),
            "neg_removed": sum(c in rare for im in data["images"]
                               for c in im["neg_category_ids"])}


def counts_line(n: dict, base: int, novel: int) -> str:
    return (f"{n['images']} images, {n['annotations']} annotations, {n['categories']} "
            f"categories ({base} base, {novel} novel)")


# --------------------------------------------------------------------------- class lists


def test_vocab_lists_match_the_coco_file():
    name = {c["id"]: c["name"] for c in _json(COCO_JSON)["categories"]}
    assert [name[i] for i in COCO_OV_BASE_IDS] == list(COCO_OV_BASE)
    assert [name[i] for i in COCO_OV_NOVEL_IDS] == list(COCO_OV_NOVEL)
    assert set(COCO_OV_NOVEL) == NOVEL and len(COCO_OV_BASE) == 48
    assert set(COCO_OV_BASE) == set(name.values()) - NOVEL - NOT_OV


# --------------------------------------------------------------------------- OV-COCO


@pytest.mark.parametrize("split", ["train", "val"])
def test_make_ov_coco_counts_and_tags(split):
    data = _json(COCO_JSON)
    out = make_ov_coco.make_ov_coco(data, split, where=COCO_JSON)
    want = expected_coco(split)
    assert len(out["images"]) == want["images"]
    assert {im["id"] for im in out["images"]} == want["image_ids"]
    assert len(out["annotations"]) == want["annotations"]
    assert {a["id"] for a in out["annotations"]} == want["ann_ids"]
    assert len(out["categories"]) == want["categories"] == 65
    split_of = {c["name"]: c["split"] for c in out["categories"]}
    assert split_of == {n: "novel" if n in NOVEL else "base"
                        for n in (c["name"] for c in data["categories"]) if n not in NOT_OV}
    novel_ids = {c["id"] for c in out["categories"] if c["split"] == "novel"}
    n_novel = sum(a["category_id"] in novel_ids for a in out["annotations"])
    if split == "train":
        assert n_novel == 0 and want["images"] < len(data["images"])  # fixture drops 6 images
    else:
        assert n_novel > 0
    assert out["info"] == data["info"] and out["licenses"] == data["licenses"]
    assert data == _json(COCO_JSON)  # the input dict is not modified


def test_coco_cli_as_module_prints_counts_and_output_loads(coco_json, tmp_path):
    out = tmp_path / "out" / "instances_train_ov.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "tools.make_ov_coco", "--split", "train",
                           "--input", str(coco_json), "--output", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    want = expected_coco("train")
    assert counts_line(want, 48, 17) in done.stdout
    assert "100 images, 839 annotations, 80 categories" in done.stdout  # the input's counts
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temp file left
    ds = CocoDetection(out, tmp_path)
    assert len(ds) == want["images"] and len(ds.categories) == 65
    assert sum(len(ds.anns[i]) for i in range(len(ds))) == want["annotations"]
    base = [c["id"] for c in ds.categories if c.get("split") != "novel"]
    assert base == list(COCO_OV_BASE_IDS)
    novel = torch.tensor(COCO_OV_NOVEL_IDS)
    assert not any(torch.isin(ds.targets(i)["category_ids"], novel).any() for i in range(len(ds)))


def test_coco_defaults_read_and_write_the_datasets_root(monkeypatch, tmp_path, capsys):
    root = tmp_path / "ds"
    (root / "coco" / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        shutil.copy(COCO_JSON, root / "coco" / "annotations" / f"instances_{split}2017.json")
        (root / "coco" / f"{split}2017").mkdir()
    monkeypatch.setenv("OVD_DATASETS", str(root))
    assert make_ov_coco.main([]) == 0
    printed = capsys.readouterr().out
    for split, split_ov in (("train", "train_ov"), ("val", "val_ov")):
        ann, images = roots.coco_paths(split_ov)
        assert ann.name == {"train": "instances_train2017_ov_base.json",
                            "val": "instances_val2017_ov_all.json"}[split]
        assert images == root / "coco" / f"{split}2017"
        assert f"wrote {ann} (OV-COCO {split}): {counts_line(expected_coco(split), 48, 17)}" \
            in printed
        ds = CocoDetection(ann, images)
        assert len(ds) == expected_coco(split)["images"]


# --------------------------------------------------------------------------- LVIS-OV


def test_make_ov_lvis_counts_tags_and_negatives():
    data = _json(LVIS_JSON)
    out = make_ov_lvis.make_ov_lvis(data, where=LVIS_JSON)
    want = expected_lvis()
    rare = want["rare"]
    assert len(out["images"]) == want["images"] == 100
    assert len(out["annotations"]) == want["annotations"]
    assert not any(a["category_id"] in rare for a in out["annotations"])
    assert len(out["categories"]) == want["categories"] == 1230
    assert {c["id"] for c in out["categories"] if c["split"] == "novel"} == rare
    assert all(c["split"] == "base" for c in out["categories"] if c["id"] not in rare)
    assert all(c["image_count"] == c["instance_count"] == 0
               for c in out["categories"] if c["id"] in rare)
    before = {c["id"]: c for c in data["categories"]}
    assert all(c["image_count"] == before[c["id"]]["image_count"]
               for c in out["categories"] if c["id"] not in rare)
    for old, new in zip(data["images"], out["images"], strict=True):
        for key in ("neg_category_ids", "not_exhaustive_category_ids"):
            assert new[key] == [c for c in old[key] if c not in rare]
    assert want["neg_removed"] > 0  # the fixture exercises the stripping
    assert data == _json(LVIS_JSON)


def test_lvis_cli_prints_counts_and_output_loads(lvis_json, tmp_path, capsys):
    out = tmp_path / "lvis_train_ov.json"
    assert make_ov_lvis.main(["--input", str(lvis_json), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    want = expected_lvis()
    n_rare = len(want["rare"])
    assert counts_line(want, want["categories"] - n_rare, n_rare) in printed
    assert f"{want['neg_removed']} rare ids from neg_category_ids" in printed
    ds = CocoDetection(out, tmp_path)
    assert len(ds) == 100 and len(ds.categories) == 1230
    assert sum(len(a) for a in ds.anns) == want["annotations"]


def test_lvis_v1_records_find_images_from_coco_url(lvis_json, tmp_path):
    """LVIS v1 image records have no file_name: <folder>/<file> of coco_url under coco/."""
    data = _json(lvis_json)
    for im in data["images"]:
        del im["file_name"]
    data["images"][1]["coco_url"] = data["images"][1]["coco_url"].replace("val2017", "train2017")
    lvis_json.write_text(json.dumps(data))
    coco = tmp_path / "coco"
    ds = CocoDetection(lvis_json, coco)
    first, second = data["images"][:2]
    assert ds.image_path(0) == coco / "val2017" / first["coco_url"].rsplit("/", 1)[1]
    assert ds.image_path(1) == coco / "train2017" / second["coco_url"].rsplit("/", 1)[1]
    ds.image_path(0).parent.mkdir(parents=True)
    Image.new("RGB", (first["width"], first["height"])).save(ds.image_path(0))
    sample = ds[0]
    assert tuple(sample["image"].shape) == (3, first["height"], first["width"])
    assert sample["file_name"] == str(ds.image_path(0))


def test_image_record_without_file_name_or_coco_url(coco_json, tmp_path):
    data = _json(coco_json)
    del data["images"][0]["file_name"], data["images"][0]["coco_url"]
    coco_json.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="neither file_name nor a coco_url"):
        CocoDetection(coco_json, tmp_path).image_path(0)


# --------------------------------------------------------------------------- bad inputs


def _one_line_error(capsys, code: int) -> str:
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err


def test_truncated_json_is_one_line_naming_the_file(coco_json, tmp_path, capsys):
    coco_json.write_bytes(coco_json.read_bytes()[:5000])
    code = make_ov_coco.main(["--split", "val", "--input", str(coco_json),
                              "--output", str(tmp_path / "o.json")])
    assert str(coco_json) in _one_line_error(capsys, code)
    assert not (tmp_path / "o.json").exists()


@pytest.mark.parametrize("tool", ["coco", "lvis"])
def test_missing_categories_is_one_line_naming_the_file(tool, coco_json, lvis_json, tmp_path,
                                                        capsys):
    path = coco_json if tool == "coco" else lvis_json
    data = _json(path)
    del data["categories"]
    path.write_text(json.dumps(data))
    out = ["--input", str(path), "--output", str(tmp_path / "o.json")]
    code = (make_ov_coco.main(["--split", "train", *out]) if tool == "coco"
            else make_ov_lvis.main(out))
    err = _one_line_error(capsys, code)
    assert str(path) in err and "categories" in err


def test_coco_file_with_wrong_class_name_or_missing_id(coco_json):
    data = _json(coco_json)
    data["categories"] = [dict(c, name="plane") if c["id"] == 5 else c
                          for c in data["categories"]]
    with pytest.raises(DatasetError, match=f"{coco_json}: category id 5 is named 'plane', "
                                           "expected 'airplane'"):
        make_ov_coco.make_ov_coco(data, "val", where=coco_json)
    data["categories"] = [c for c in data["categories"] if c["id"] != 90]
    with pytest.raises(DatasetError, match=r"no category id 90 \('toothbrush'\)"):
        make_ov_coco.make_ov_coco(data, "train", where=coco_json)
    with pytest.raises(ConfigError, match="unknown COCO-OV split"):
        make_ov_coco.make_ov_coco(_json(coco_json), "test")


def test_lvis_without_frequency_and_malformed_records(lvis_json, capsys, tmp_path):
    data = _json(lvis_json)
    del data["categories"][3]["frequency"]
    with pytest.raises(DatasetError, match=f"{lvis_json}: category .* has frequency None"):
        make_ov_lvis.make_ov_lvis(data, where=lvis_json)
    data = _json(lvis_json)
    del data["annotations"][0]["category_id"]
    lvis_json.write_text(json.dumps(data))
    code = make_ov_lvis.main(["--input", str(lvis_json), "--output", str(tmp_path / "o.json")])
    assert "malformed LVIS record" in _one_line_error(capsys, code)


def test_output_must_not_overwrite_the_input(coco_json, capsys):
    code = make_ov_coco.main(["--split", "val", "--input", str(coco_json),
                              "--output", str(coco_json)])
    assert "is the input file" in _one_line_error(capsys, code)
    assert _json(coco_json) == _json(COCO_JSON)


def test_input_output_need_one_split(coco_json):
    with pytest.raises(SystemExit):
        make_ov_coco.main(["--input", str(coco_json)])


# --------------------------------------------------------------------------- roots


@pytest.fixture
def empty_root(monkeypatch, tmp_path) -> Path:
    root = tmp_path / "empty"
    root.mkdir()
    monkeypatch.setenv("OVD_DATASETS", str(root))
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    return root


@pytest.mark.parametrize("call, path, layout", [
    (lambda: roots.coco_paths("val"), "coco/annotations/instances_val2017.json",
     "coco/{train2017,val2017,annotations/instances_{train,val}2017.json}"),
    (lambda: roots.lvis_paths("train"), "lvis/lvis_v1_train.json",
     "lvis/lvis_v1_{train,val}.json with the COCO 2017 images in $OVD_DATASETS/coco/"),
    (roots.ade20k_root, "ADEChallengeData2016",
     "ADEChallengeData2016/{images,annotations}/{training,validation}"),
])
def test_missing_root_names_path_and_layout(empty_root, call, path, layout):
    with pytest.raises(FileNotFoundError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{empty_root / path} not found; expected $OVD_DATASETS/{layout}")
    assert f"OVD_DATASETS={empty_root}" in msg


def test_missing_images_and_ov_files(empty_root):
    (empty_root / "coco" / "annotations").mkdir(parents=True)
    shutil.copy(COCO_JSON, empty_root / "coco" / "annotations" / "instances_val2017.json")
    with pytest.raises(FileNotFoundError, match=f"^{empty_root}/coco/val2017 not found"):
        roots.coco_paths("val")
    with pytest.raises(FileNotFoundError, match="instances_val2017_ov_all.json not found.*"
                                                "ovd-make-ov-coco"):
        roots.coco_paths("val_ov")
    (empty_root / "lvis").mkdir()
    (empty_root / "lvis" / "lvis_v1_val.json").write_text("{}")
    (empty_root / "coco" / "val2017").mkdir()
    with pytest.raises(FileNotFoundError, match=f"^{empty_root}/coco/train2017 not found"):
        roots.lvis_paths("val")  # LVIS v1 val draws images from train2017 too
    with pytest.raises(FileNotFoundError, match="ovd-make-ov-lvis"):
        roots.lvis_paths("train_ov")
    (empty_root / "ADEChallengeData2016" / "images" / "training").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="images/validation not found"):
        roots.ade20k_root()


def test_default_root_and_detectron2_fallback(monkeypatch, tmp_path):
    monkeypatch.delenv("OVD_DATASETS", raising=False)
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    assert roots.datasets_root() == Path("datasets")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"^datasets/coco/annotations/instances_val2017"
                                                r"\.json not found; .*unset: \./datasets\)$"):
        roots.coco_paths("val")

    d2 = tmp_path / "d2"
    for rel in ("coco/annotations", "coco/train2017", "coco/val2017", "lvis",
                "ADEChallengeData2016/images/training", "ADEChallengeData2016/images/validation",
                "ADEChallengeData2016/annotations/training",
                "ADEChallengeData2016/annotations/validation"):
        (d2 / rel).mkdir(parents=True)
    for rel in ("coco/annotations/instances_val2017.json", "lvis/lvis_v1_val.json"):
        (d2 / rel).write_text("{}")
    monkeypatch.setenv("DETECTRON2_DATASETS", str(d2))
    assert roots.datasets_root() == d2
    assert roots.coco_paths("val") == (d2 / "coco/annotations/instances_val2017.json",
                                       d2 / "coco/val2017")
    assert roots.lvis_paths("val") == (d2 / "lvis/lvis_v1_val.json", d2 / "coco")
    assert roots.ade20k_root() == d2 / "ADEChallengeData2016"
    monkeypatch.setenv("OVD_DATASETS", "")  # empty counts as unset
    assert roots.datasets_root() == d2
    monkeypatch.setenv("OVD_DATASETS", str(tmp_path / "ovd"))  # OVD_DATASETS wins
    assert roots.datasets_root() == tmp_path / "ovd"
    with pytest.raises(FileNotFoundError, match=f"OVD_DATASETS={tmp_path / 'ovd'}"):
        roots.coco_paths("val")
    monkeypatch.delenv("OVD_DATASETS")
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="OVD_DATASETS unset, DETECTRON2_DATASETS="):
        roots.lvis_paths("val")


def test_unknown_split_and_unchecked_paths(empty_root):
    with pytest.raises(ConfigError, match="unknown COCO split 'test'.*train, val, train_ov"):
        roots.coco_paths("test")
    with pytest.raises(ConfigError, match="unknown LVIS split 'val_ov'"):
        roots.lvis_paths("val_ov")
    ann, images = roots.coco_paths("train_ov", check=False)  # tools write here
    assert ann == empty_root / "coco/annotations/instances_train2017_ov_base.json"
    assert roots.ade20k_root(check=False) == empty_root / "ADEChallengeData2016"
