"""The pipeline on a user's own COCO-format files: plain JSON + PNGs, written here by hand."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from distill.data.coco import CocoDetection, DatasetError, check_images, split_classes
from tools import pipeline

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# category ids that are not 1..N, no "split" tags; "ring" and "bolt" appear in val only,
# "drop" is listed in the training file but annotated nowhere
CATEGORIES = [{"id": 11, "name": "circle"}, {"id": 23, "name": "square"},
              {"id": 37, "name": "triangle"}, {"id": 50, "name": "ring"},
              {"id": 64, "name": "bolt"}, {"id": 78, "name": "drop"}]
TRAIN_IDS, VAL_IDS = (11, 23, 37), (11, 23, 37, 50, 64)
COLOURS = {11: (220, 40, 40), 23: (40, 40, 220), 37: (40, 200, 40), 50: (230, 200, 20),
           64: (200, 40, 200)}
SMALL = ["train.max_iters=4", "train.batch_size=2", "train.checkpoint_period=2",
         "model.image_size=96", "model.hidden=32", "model.box_batch_size_per_image=16",
         "model.rpn_post_nms_top_n_test=20", "cache.num_proposals=8", "pipeline.pictures=3"]


def write_split(root, split, count, ids, seed):
    """``count`` 96 x 80 PNGs with 1-3 filled shapes each, and their COCO instances file."""
    rng = np.random.default_rng(seed)
    folder = root / f"{split}_images"
    folder.mkdir(parents=True)
    images, anns = [], []
    for i in range(count):
        im = Image.new("RGB", (96, 80), (128, 128, 128))
        pen = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(1, 4))):
            cid = int(ids[(i + len(anns)) % len(ids)])
            s, x, y = int(rng.integers(16, 30)), int(rng.integers(0, 60)), int(rng.integers(0, 48))
            pen.rectangle([x, y, x + s, y + s], fill=COLOURS[cid])
            anns.append({"id": 1000 + len(anns), "image_id": 500 + i, "category_id": cid,
                         "bbox": [x, y, s + 1, s + 1], "area": float((s + 1) ** 2),
                         "iscrowd": 0,
                         "segmentation": [[x, y, x + s + 1, y, x + s + 1, y + s + 1, x,
                                           y + s + 1]]})
        im.save(folder / f"img{i:03d}.png")
        images.append({"id": 500 + i, "file_name": f"img{i:03d}.png", "width": 96, "height": 80})
    ann = root / f"{split}.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns,
                               "categories": CATEGORIES}))
    return ann, folder


@pytest.fixture
def dataset(tmp_path):
    train = write_split(tmp_path / "data", "train", 8, TRAIN_IDS, 0)
    val = write_split(tmp_path / "data", "val", 5, VAL_IDS, 1)
    return [f"data.train_instances={train[0]}", f"data.train_images={train[1]}",
            f"data.val_instances={val[0]}", f"data.val_images={val[1]}"]


def run(tmp_path, data, *extra):
    return pipeline.main(["--config", "configs/custom/pipeline.yaml", "--no-progress",
                          f"output_dir={tmp_path / 'out'}", f"cache.root={tmp_path / 'cache'}",
                          *data, *SMALL, *extra])


def test_pipeline_on_plain_coco_files(tmp_path, dataset, capsys):
    assert run(tmp_path, dataset) == 0
    out = capsys.readouterr().out
    assert ("3 base classes (trained on): circle, square, triangle" in out)
    assert ("2 novel classes (annotated in val, none in train; held out of training, scored "
            "apart): ring, bolt") in out
    assert "never trained, not scored): drop" in out
    # the base/novel lists come before any training
    assert out.index("novel classes") < out.index("proposals:")
    summary = json.loads((tmp_path / "out/pipeline.json").read_text())
    assert summary["data"]["novel"] == ["ring", "bolt"]
    rows = [line for line in summary["table"].splitlines() if line.startswith("| ViLD")]
    assert [r.split(" | ")[0] for r in rows] == ["| ViLD-text", "| ViLD"]
    # every stage got the held-out classes: ViLD-text trained on 3 names, ViLD too
    for stage in ("vild_text", "vild"):  # val annotates both novel classes: a score, not -1
        assert summary["students"][stage]["AP50_novel"] >= 0
    from detectors import load_student

    student = load_student(tmp_path / "out/export")
    assert student.vocabulary.names == ["circle", "square", "triangle", "ring", "bolt", "drop"]
    assert list(student.vocabulary.novel) == [False, False, False, True, True, True]
    found = student.predict(tmp_path / "data/val_images/img000.png", score_threshold=0.0)
    assert len(found["boxes"]) == len(found["scores"]) > 0
    # the report and its pictures: PNGs of the expected size that are not blank
    report = (tmp_path / "out/report.md").read_text()
    for png in ("per_class_ap50", "training_curves", "predictions"):
        assert f"(report/{png}.png)" in report
        with Image.open(tmp_path / f"out/report/{png}.png") as im:
            pixels = np.asarray(im.convert("L"), dtype=np.float32)
        assert pixels.std() > 5, png  # not one flat colour
        if png == "predictions":  # 3 pictures in a row of 4 cells of 320 px
            assert im.size == (4 * 320, 320)
    assert len(list((tmp_path / "out/pictures").glob("*.png"))) == 3
    # the masks made a segmenter too, on the same classes
    assert "| pixel-distilled student |" in summary["seg_table"]
    assert summary["segmenter"]["mIoU_novel"] >= 0 and "## Segmentation mIoU" in report


def test_changed_annotations_rerun_the_stages_that_read_them(tmp_path, dataset, capsys):
    assert run(tmp_path, dataset) == 0
    capsys.readouterr()
    assert run(tmp_path, dataset) == 0
    assert "vild_text: reusing" in capsys.readouterr().out
    val = tmp_path / "data/val.json"
    data = json.loads(val.read_text())
    data["annotations"].pop()
    val.write_text(json.dumps(data))  # the same path, other content
    assert run(tmp_path, dataset) == 0
    out = capsys.readouterr().out
    assert "vild_text: reusing" not in out and "vild: reusing" not in out
    assert len(list((tmp_path / "out").glob("vild_text-*"))) == 2


def test_data_novel_names_the_held_out_classes(tmp_path, dataset, capsys):
    assert run(tmp_path, dataset, 'data.novel=["Square"]', "pipeline.pictures=0",
               "pipeline.segmenter=null", "--with-teacher", "--onnx") == 0
    out = capsys.readouterr().out
    assert "2 base classes (trained on): circle, triangle" in out
    assert "3 novel classes (data.novel; held out of training, scored apart): square, " \
           "ring, bolt" in out
    summary = json.loads((tmp_path / "out/pipeline.json").read_text())
    assert "| teacher on proposals |" in summary["table"]  # --with-teacher
    assert (tmp_path / "out/export/model.onnx").is_file()  # --onnx
    from detectors import load_student

    vocab = load_student(tmp_path / "out/export").vocabulary
    assert [n for n, v in zip(vocab.names, vocab.novel, strict=True) if v] == \
        ["square", "ring", "bolt", "drop"]


def cats(path, categories, anns=((1, 11),)):
    path.write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}],
        "annotations": [{"id": k, "image_id": 1, "category_id": c, "bbox": [1, 1, 4, 4],
                         "area": 16, "iscrowd": 0} for k, c in anns],
        "categories": categories}))
    return CocoDetection(path, path.parent)


def test_class_split_rules(tmp_path):
    both = [{"id": 11, "name": "a"}, {"id": 12, "name": "b"}, {"id": 13, "name": "c"}]
    train = cats(tmp_path / "t.json", both, [(1, 11)])
    val = cats(tmp_path / "v.json", both, [(1, 11), (2, 12)])
    split = split_classes(train, val)
    assert (split.base, split.novel, split.untrained) == (["a"], ["b"], ["c"])
    assert split.novel_setting == ["b", "c"]  # neither is trained
    # no novel class: measured on base classes only
    split = split_classes(train, cats(tmp_path / "v1.json", both, [(1, 11)]))
    assert (split.base, split.novel, split.untrained) == (["a"], [], ["b", "c"])
    # tags decide when the files have them; an untagged-base class without boxes is held out
    tagged = [{"id": 11, "name": "a", "split": "base"}, {"id": 12, "name": "b", "split": "novel"},
              {"id": 13, "name": "c", "split": "base"}]
    split = split_classes(cats(tmp_path / "t2.json", tagged, [(1, 11)]),
                          cats(tmp_path / "v2.json", tagged, [(1, 11), (2, 12), (3, 13)]))
    assert (split.base, split.novel) == (["a"], ["b", "c"])
    with pytest.raises(DatasetError, match=r"data.novel: \['z'\] are not categories of .*v.json"):
        split_classes(train, val, ["z"])


@pytest.mark.parametrize("categories, message", [
    ([{"id": 11, "name": "a"}, {"id": 12, "name": "A"}],
     r"t.json: categories 11 and 12 are both named 'A'$"),
    ([{"id": 11, "name": "a"}, {"id": 12, "name": " "}], r"t.json: category 12 has an empty name$"),
])
def test_bad_categories_one_line(tmp_path, categories, message):
    data = cats(tmp_path / "t.json", categories)
    with pytest.raises(DatasetError, match=message):
        split_classes(data, data)


def test_missing_images_fail_before_training_and_lose_nothing(tmp_path, dataset, capsys):
    (tmp_path / "data/val_images/img003.png").unlink()
    keep = tmp_path / "out" / "notes.txt"
    keep.parent.mkdir()
    keep.write_text("mine")
    assert run(tmp_path, dataset) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {tmp_path / 'data/val.json'}: 1 of 5 image files are missing from "
                   f"{tmp_path / 'data/val_images'}, e.g. img003.png (data.on_error=skip leaves "
                   f"those images out)")
    assert keep.read_text() == "mine" and not list((tmp_path / "out").glob("vild_text-*"))
    with pytest.raises(DatasetError, match="1 of 5 image files"):
        check_images(CocoDetection(tmp_path / "data/val.json", tmp_path / "data/val_images"))


def test_label_maps_painted_from_instance_masks(tmp_path):
    """Two overlapping polygons (the smaller on top), a box without a mask, a crowd region,
    and a category outside the classes: each pixel checked by hand."""
    ann = {"images": [{"id": 1, "file_name": "a.png", "width": 10, "height": 8}],
           "categories": [{"id": 5, "name": "Big"}, {"id": 9, "name": "small"},
                          {"id": 3, "name": "boxed"}, {"id": 4, "name": "other"}],
           "annotations": [
               {"id": 1, "image_id": 1, "category_id": 9, "bbox": [2, 2, 2, 2], "area": 4,
                "iscrowd": 0, "segmentation": [[2, 2, 4, 2, 4, 4, 2, 4]]},
               {"id": 2, "image_id": 1, "category_id": 5, "bbox": [0, 0, 6, 6], "area": 36,
                "iscrowd": 0, "segmentation": [[0, 0, 6, 0, 6, 6, 0, 6]]},
               {"id": 3, "image_id": 1, "category_id": 3, "bbox": [7, 5, 2, 3], "area": 6,
                "iscrowd": 0},
               {"id": 4, "image_id": 1, "category_id": 4, "bbox": [7, 0, 3, 2], "area": 6,
                "iscrowd": 0, "segmentation": [[7, 0, 10, 0, 10, 2, 7, 2]]},
               {"id": 5, "image_id": 1, "category_id": 5, "bbox": [0, 6, 2, 2], "area": 4,
                "iscrowd": 1, "segmentation": [[0, 6, 2, 6, 2, 8, 0, 8]]}]}
    (tmp_path / "a.json").write_text(json.dumps(ann))
    Image.new("RGB", (10, 8)).save(tmp_path / "a.png")
    from distill.data.semantic import IGNORE, InstanceSemantic

    data = InstanceSemantic(CocoDetection(tmp_path / "a.json", tmp_path),
                            ["small", "big", "boxed"], [True, False, False])
    labels = data[0]["labels"]
    expected = torch.full((8, 10), IGNORE)
    expected[0:6, 0:6] = 1  # "Big" (any case)
    expected[2:4, 2:4] = 0  # "small", painted over it
    expected[5:8, 7:9] = 2  # "boxed": no segmentation, its box
    assert torch.equal(labels, expected)  # "other" and the crowd stay unlabelled
    assert data.novel_ids == [0] and len(data) == 1


def test_no_novel_class_measures_base_classes_only(tmp_path, dataset, capsys):
    train_only = [dataset[0], dataset[1], dataset[0].replace("train_instances", "val_instances", 1),
                  dataset[1].replace("train_images", "val_images", 1)]
    assert run(tmp_path, train_only, "pipeline.pictures=0", "pipeline.segmenter=null") == 0
    out = capsys.readouterr().out
    assert ("no novel class (annotated in val, none in train): this run measures the base "
            "classes only") in out
    summary = json.loads((tmp_path / "out/pipeline.json").read_text())
    assert summary["data"]["novel"] == [] and summary["students"]["vild"]["AP50_novel"] == -1
    assert "| ViLD | - | " in summary["table"]
