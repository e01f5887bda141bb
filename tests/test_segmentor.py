"""Student segmenters (segmentors/), their data (distill/data/semantic.py) and tools."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from distill.config import load_config
from distill.data.semantic import ADE20K_CLASSES, DatasetError, ade20k
from ovdistill import ablations
from ovdistill.report import SEG_LABELS
from segmentors import build_segmenter
from segmentors import recipe as segmentation
from tests.parity import assert_same_label_maps, without_open_clip
from tools import seg_ablation

REPO = Path(__file__).resolve().parents[1]
TINY = ["world.num_train=6", "world.num_val=3", "world.image_size=96", "world.max_objects=3",
        f"teacher.model_config={REPO / 'configs/shapes/teacher/tiny_rn.json'}",
        "teacher.model=tiny_rn", "teacher.pretrained=null", "teacher.dense_short_side=96",
        "train.max_iters=2", "train.batch_size=2"]


@torch.no_grad()
def test_pixel_scores_by_hand_independent_of_other_names_and_low_ones_unlabelled():
    """A name's pixel score is its softmax against the training names and itself (counted once
    when it is one), the same with any other names beside it (to 1e-6); predict leaves a pixel
    whose best score is below the threshold unlabelled (-1)."""
    from segmentors.model import UNLABELLED

    torch.manual_seed(0)
    model = build_segmenter("seg_r10_fpn", embed_dim=8, temperature=0.1).eval()
    training = F.normalize(torch.randn(5, 8), dim=-1)
    model.set_training_vocabulary(training)
    new = F.normalize(torch.randn(1, 8), dim=-1)  # a name the student never trained on
    images = torch.randint(0, 256, (1, 3, 32, 40), dtype=torch.uint8)
    emb = model(images)["pixel_embeddings"][0]  # (D, 4, 5)
    model.set_vocabulary(torch.cat([training[2:3], new]))
    scores = model.name_scores(model.score_logits(images))[0]  # (2, 4, 5)
    for y, x in ((0, 0), (3, 4), (2, 1)):
        ref = training @ emb[:, y, x] / 0.1
        assert scores[0, y, x] == pytest.approx(float(ref.softmax(0)[2]), abs=1e-6)
        mine = torch.cat([ref, new @ emb[:, y, x] / 0.1])
        assert scores[1, y, x] == pytest.approx(float(mine.softmax(0)[-1]), abs=1e-6)
    for vocabulary in (training[2:3], torch.cat([training[[0, 4]], training[2:3], new])):
        model.set_vocabulary(vocabulary)
        alone = model.name_scores(model.score_logits(images))[0]
        k = 0 if len(vocabulary) == 1 else 2
        torch.testing.assert_close(alone[k], scores[0], atol=1e-6, rtol=0)
    # the threshold: between two well-separated best scores of the upsampled map, so that no
    # pixel sits on it
    model.set_vocabulary(torch.cat([training[2:3], new]))
    up = F.interpolate(model.score_logits(images), size=(32, 40), mode="bilinear",
                       align_corners=False)
    best, label = model.name_scores(up)[0].max(0)
    values = best.flatten().sort().values
    gap = int((values[1:] - values[:-1]).argmax())
    cut = float(values[gap] + values[gap + 1]) / 2
    got = model.predict(images, threshold=cut)[0]
    assert ((got == UNLABELLED) == (best < cut)).all() and (got == UNLABELLED).any()
    assert (got[best >= cut] == label[best >= cut]).all() and (got >= 0).any()
    assert (model.predict(images)[0] == label).all()  # no threshold: every pixel named


def test_logits_are_pixel_cosine_over_temperature_and_the_vocabulary_swaps():
    torch.manual_seed(0)
    model = build_segmenter("seg_r10_fpn", embed_dim=8, temperature=0.1).eval()
    text = F.normalize(torch.randn(5, 8), dim=-1)
    model.set_vocabulary(text)
    images = torch.randint(0, 256, (2, 3, 64, 48), dtype=torch.uint8)
    out = model(images)
    emb, logits = out["pixel_embeddings"], out["pixel_logits"]
    assert emb.shape == (2, 8, 8, 6) and logits.shape == (2, 5, 8, 6)  # stride 8
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2, 8, 6))
    b, y, x = 1, 3, 2  # one pixel by hand: cosine with each class / 0.1
    torch.testing.assert_close(logits[b, :, y, x], text @ emb[b, :, y, x] / 0.1)
    labels = model.predict(images)
    assert labels.shape == (2, 64, 48) and int(labels.max()) < 5
    model.set_vocabulary(text[[4, 3]])  # two classes, swapped in without retraining
    assert model(images)["pixel_logits"].shape == (2, 2, 8, 6)
    assert int(model.predict(images).max()) <= 1
    with pytest.raises(ValueError, match="embedding dimension 8"):
        model.set_vocabulary(torch.randn(3, 4))
    with pytest.raises(ValueError, match="seg.name: unknown segmenter 'seg_r19_fpn'"):
        build_segmenter("seg_r19_fpn", embed_dim=8)


def test_clip_trunk_is_the_open_clip_tower_and_loads_its_weights():
    """seg_clip_rn_fpn's trunk computes what open_clip's ModifiedResNet computes up to layer 4,
    with the tower's own weights (batch-norm statistics included); other towers are refused."""
    from open_clip.modified_resnet import ModifiedResNet

    from distill.clip_trunk import ClipResNetTrunk, load_tower, tower_shape

    torch.manual_seed(0)
    tower = ModifiedResNet(layers=[1, 2, 1, 1], output_dim=8, heads=2, image_size=64, width=16)
    for m in tower.modules():  # non-trivial statistics and affine terms
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    tower.eval()
    shape = tower_shape(tower)
    assert shape == {"trunk_layers": [1, 2, 1, 1], "trunk_width": 16}
    trunk = ClipResNetTrunk(shape["trunk_layers"], shape["trunk_width"]).eval()
    assert trunk.channels == [64, 128, 256, 512]
    load_tower(trunk, tower)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        want = tower.layer4(tower.layer3(tower.layer2(tower.layer1(tower.stem(x)))))
        torch.testing.assert_close(trunk(x), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"18 tensors missing or of another shape, e\.g\. layer2\.2\."):
        load_tower(ClipResNetTrunk([1, 3, 1, 1], 16), tower)  # one block more than the tower
    with pytest.raises(ValueError, match="not Linear"):
        tower_shape(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="seg.norm: seg_clip_rn_fpn keeps the CLIP tower's"):
        build_segmenter("seg_clip_rn_fpn", embed_dim=8, norm="gn", image_mean=[0.5] * 3,
                        image_std=[0.25] * 3, **shape)


def _ade_tree(root: Path, labels: np.ndarray, split: str = "training") -> Path:
    ade = root / "ADEChallengeData2016"
    (ade / "images" / split).mkdir(parents=True)
    (ade / "annotations" / split).mkdir(parents=True)
    image = np.random.default_rng(0).integers(0, 256, (*labels.shape, 3), dtype=np.uint8)
    Image.fromarray(image).save(ade / "images" / split / "ADE_train_00000001.jpg")
    Image.fromarray(labels.astype(np.uint8)).save(ade / "annotations" / split /
                                                  "ADE_train_00000001.png")
    return ade


def test_ade20k_loader_reduces_the_zero_label(tmp_path):
    labels = np.array([[0, 1, 150], [3, 0, 2]])
    ade = _ade_tree(tmp_path, labels)
    data = ade20k(ade, "training", novel=["sky", "flag"])
    assert len(ADE20K_CLASSES) == 150 and data.classes[2] == "sky"
    s = data[0]
    assert s["image"].shape == (3, 2, 3) and s["image"].dtype == torch.uint8
    assert s["labels"].tolist() == [[255, 0, 149], [2, 255, 1]]
    assert data.novel_ids == [2, 149]
    with pytest.raises(FileNotFoundError, match="not an ADE20k root .*images/validation"):
        ade20k(ade, "validation")
    with pytest.raises(Exception, match="unknown ADE20k class 'skyy'"):
        ade20k(ade, "training", novel=["skyy"])


def test_ade20k_bad_label_files_are_named(tmp_path):
    ade = _ade_tree(tmp_path, np.array([[0, 151]]))
    with pytest.raises(DatasetError, match=r"ADE_train_00000001.png: label value 151 outside"):
        ade20k(ade, "training")[0]
    (ade / "annotations/training/ADE_train_00000001.png").unlink()
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(
        ade / "annotations/training/ADE_train_00000001.png")
    with pytest.raises(DatasetError, match=r"label map \(3, 3\) does not match image \(1, 2\)"):
        ade20k(ade, "training")[0]


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    return tmp_path_factory.mktemp("seg")


@pytest.mark.parametrize("name", ["seg_supervised", "seg_distill", "seg_distill_pseudo"])
def test_one_training_iteration_per_config(tiny_world, name):
    out = tiny_world / name
    cfg = load_config(REPO / f"configs/shapes/{name}.yaml",
                      [f"world.root={tiny_world / 'world'}", *TINY, f"output_dir={out}"])
    metrics = segmentation.train(cfg, progress=False)
    assert set(metrics) == {"mIoU", "mIoU_base", "mIoU_novel", "hIoU", "aAcc", "images_per_s",
                            "pixel_threshold", "mIoU_3names", "unnamed_painted_3names",
                            "mIoU_3names_no_cut", "unnamed_painted_no_cut"}
    few = json.loads((out / "eval/few_names.json").read_text())  # segmentors/few_names.py
    assert few["all"] == pytest.approx(metrics["mIoU"], abs=1e-6)  # the same IoUs, every name
    assert metrics["pixel_threshold"] == few["threshold"] and few["subsets"] == 21
    assert few["few"] == max(v["few"] for v in few["by_threshold"].values())
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    losses = {k for k in first if k.startswith("loss_")}
    want = {"loss_supervised_seg"} | ({"loss_pixel_distill"} if cfg.seg.pixel_distill else set())
    want |= {"loss_pseudo_label"} if cfg.seg.pseudo_label else set()
    assert losses == want
    saved = json.loads((out / "eval/metrics.json").read_text())
    assert saved["mIoU"] == pytest.approx(metrics["mIoU"])
    assert (out / "eval/per_class_iou.png").is_file() and (out / "eval/overlay_0.png").is_file()
    assert (out / "model_final.safetensors").is_file()


def test_seg_ablation_floors_hand_computed():
    mean = {"seg_supervised": {"mIoU_novel": 0.01}, "seg_teacher": {"mIoU_novel": 0.04},
            "seg_distill": {"mIoU_novel": 0.03}, "seg_distill_pseudo": {"mIoU_novel": 0.05}}
    got = [(what.split(":")[0], round(v, 4), ok)
           for what, v, _, ok in ablations.seg_floors(mean, 21 * 60)]
    assert got == [("pixel-distilled student", 3.0, True), ("pixel-distilled student", -1.0, False),
                   ("pixel-distilled + pseudo-labels", 5.0, True),
                   ("pixel-distilled + pseudo-labels", 1.0, True),
                   ("segmentation ablation wall time (minutes)", 21.0, False)]
    mean["seg_supervised"]["mIoU_novel"] = 0.0  # 0 for base-only: any positive is infinitely more
    assert ablations.seg_floors(mean, 60)[0][1:] == (math.inf, ">= 2", True)


def test_teacher_baseline_and_the_ablation_table(tiny_world, tmp_path):
    results = tmp_path / "results.md"
    results.write_text("# Results\n\n<!-- seg-ablation -->\nold\n<!-- /seg-ablation -->\nkept\n")
    args = ["--no-progress", "--seeds", "0", "--results", str(results), "--output-dir",
            str(tmp_path / "out"), f"world.root={tiny_world / 'world'}", *TINY]
    assert seg_ablation.main(args) == 0
    text = results.read_text()
    assert "old" not in text and text.endswith("<!-- /seg-ablation -->\nkept\n")
    for label in SEG_LABELS.values():
        assert f"| {label} |" in text
    assert "| pixel-distilled student: novel mIoU / base-only novel mIoU |" in text
    assert "| pixel-distilled + pseudo-labels: novel mIoU - teacher novel mIoU (points) |" in text
    stages = sorted(p.name.split("-")[0] for p in (tmp_path / "out").iterdir() if p.is_dir())
    assert stages == sorted(ablations.SEG_STAGES)
    teacher = json.loads(next((tmp_path / "out").glob("seg_teacher-*/eval/summary.json"))
                         .read_text())
    assert 0 <= teacher["mIoU_novel"] <= 1
    assert seg_ablation.main(args) == 0  # a rerun reuses every stage
    assert "| n/a: stages reused |" in results.read_text()


def test_exported_segmenter_round_trip_onnx_and_no_open_clip(tiny_world, tmp_path, threads):
    from distill.engine import load_weights
    from distill.teacher import Teacher
    from segmentors import load_student
    from segmentors.onnx import OnnxSegmenter
    from tools import export

    run = tiny_world / "seg_supervised"  # trained by test_one_training_iteration_per_config
    if not (run / "model_final.safetensors").is_file():
        cfg = load_config(REPO / "configs/shapes/seg_supervised.yaml",
                          [f"world.root={tiny_world / 'world'}", *TINY, f"output_dir={run}"])
        segmentation.train(cfg, progress=False)
    out = tmp_path / "segmenter"
    assert export.main(["--run", str(run), "--output", str(out), "--onnx"]) == 0
    student = load_student(out)
    assert student.vocabulary.names[-4:] == ["sky", "grass", "water", "sand"]
    assert sum(student.vocabulary.novel) == 4
    cfg = load_config(run / "config.yaml")
    teacher = Teacher.from_config(cfg.teacher)
    model = segmentation.build_student(cfg, teacher).eval()
    load_weights(model, run / "model_final.safetensors")
    model.set_vocabulary(teacher.text(student.vocabulary.names))
    image = sorted((tiny_world / "world").glob("*/images/val/*.png"))[0]
    pixels = np.array(Image.open(image).convert("RGB"))
    found = student.predict(image)
    # the export holds the training names and the pixel threshold chosen on val
    summary = json.loads((run / "eval" / "summary.json").read_text())
    assert student.threshold == summary["pixel_threshold"]
    torch.testing.assert_close(student.model.reference_embeddings,
                               teacher.text(segmentation.datasets(cfg)[0].classes))
    want = model.predict(torch.from_numpy(pixels).permute(2, 0, 1)[None],
                         student.threshold)[0].numpy()
    assert found["labels"].shape == pixels.shape[:2]
    np.testing.assert_array_equal(found["labels"], want)
    assert set(found["present"]) <= set(found["names"]) and found["present"]
    # below the threshold a pixel is unlabelled (-1); at 0 every pixel has a name
    everything = student.predict(image, threshold=0.0)["labels"]
    assert (everything >= 0).all()
    none = student.predict(image, threshold=1.01)
    assert (none["labels"] == -1).all() and none["present"] == []
    # the demo draws it with a legend and writes the label map and the names' pixel shares
    from tools import demo

    drawn = tmp_path / "demo"
    assert demo.main(["--student", str(out), "--output", str(drawn), "--no-progress",
                      str(image)]) == 0
    with Image.open(drawn / f"{image.stem}.png") as im:
        assert im.width > pixels.shape[1] and im.height >= pixels.shape[0]
        assert np.array_equal(np.asarray(im.convert("RGB"))[:, pixels.shape[1]:].min((0, 1)) <
                              255, [True] * 3)  # the legend's swatches and names
    np.testing.assert_array_equal(np.asarray(Image.open(drawn / f"{image.stem}_labels.png")),
                                  np.where(found["labels"] < 0, 255, found["labels"]))
    record = json.loads((drawn / "predictions.json").read_text())[0]
    assert [r["name"] for r in record["present"]] == found["present"]
    k = found["names"].index(found["present"][0])
    assert record["present"][0]["share"] == round(float((found["labels"] == k).mean()), 4)
    # ONNX Runtime gives the same label map, at the export's size and at another one, but
    # where the two best logits tie (tests/parity.py)
    onnx = OnnxSegmenter(out, threads=threads)
    for picture in (pixels, pixels[:64, :80].copy()):
        for cut in (0.0, 0.5):
            ref = student.predict(picture, threshold=cut)["labels"]
            got = onnx.predict(picture, threshold=cut)["labels"]
            assert_same_label_maps(got, ref, student.model, picture, cut)
    # a detector loader refuses it, naming the task
    from detectors import load_student as load_detector
    from distill.export import ExportError
    with pytest.raises(ExportError, match="task 'segmentation', not a detection student"):
        load_detector(out)
    rows = without_open_clip(f"from segmentors import load_student\n"
                             f"r = load_student({str(out)!r}).predict({str(image)!r})\n"
                             f"print(r['labels'].shape[0])")
    assert int(rows) == pixels.shape[0]


def test_pixel_targets_from_the_dense_cache_equal_the_online_ones(tiny_world, monkeypatch):
    """seg.dense_source=cache reads the maps tools/extract.py stored (cache.store_dense=true):
    the same first-step losses as computing them online, up to float16 storage."""
    from tools import extract

    common = [f"world.root={tiny_world / 'world'}", *TINY, f"cache.root={tiny_world / 'cache'}",
              "cache.name=dense", "cache.proposals=gt", "seg.pseudo_label=1.0"]
    assert extract.main(["--config", str(REPO / "configs/shapes/extract.yaml"), "--no-progress",
                         *common, "cache.store_dense=true"]) == 0
    first = {}
    for source in ("online", "cache"):
        if source == "cache":  # the teacher's image tower must not run
            from distill.teacher import Teacher

            monkeypatch.setattr(Teacher, "dense", lambda *a, **k: pytest.fail("tower ran"))
        out = tiny_world / f"dense_{source}"
        cfg = load_config(REPO / "configs/shapes/seg_distill.yaml",
                          [*common, f"output_dir={out}", f"seg.dense_source={source}",
                           "train.max_iters=1"])
        segmentation.train(cfg, progress=False)
        first[source] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    c, o = first["cache"], first["online"]
    assert c["loss_supervised_seg"] == o["loss_supervised_seg"]  # the same batches and flips
    assert c["loss_pixel_distill"] == pytest.approx(o["loss_pixel_distill"], rel=2e-3)
    # a random teacher's class logits are near ties: float16 storage flips a few argmaxes
    assert c["loss_pseudo_label"] == pytest.approx(o["loss_pseudo_label"], rel=5e-2)
    # a cache without dense maps, or settings the cache cannot serve: one clear error
    bad = load_config(REPO / "configs/shapes/seg_distill.yaml",
                      [*common, "cache.name=missing", "seg.dense_source=cache",
                       f"output_dir={tiny_world / 'dense_bad'}"])
    with pytest.raises(FileNotFoundError, match="no embedding cache at .*missing"):
        segmentation.train(bad, progress=False)
    crop = load_config(REPO / "configs/shapes/seg_distill.yaml",
                       [*common, "seg.dense_source=cache", "seg.crop_size=64",
                        f"output_dir={tiny_world / 'dense_crop'}"])
    with pytest.raises(ValueError, match="seg.crop_size=0"):
        segmentation.train(crop, progress=False)


def test_clip_trunk_student_starts_from_the_teacher_and_exports_without_open_clip(tiny_world,
                                                                                 tmp_path,
                                                                                 threads):
    """seg.name=seg_clip_rn_fpn: the student's trunk is the ResNet teacher's tower at the start;
    it trains, and its export (CLIP normalisation, tower shape in config.json) predicts as the
    trained model does, in PyTorch without open_clip and in ONNX Runtime."""
    from distill.config import ConfigError
    from distill.engine import load_weights
    from distill.teacher import Teacher
    from segmentors import load_student
    from segmentors.onnx import OnnxSegmenter
    from tools import export

    run = tmp_path / "clip_rn"  # configs/shapes/seg_base.yaml's student
    cfg = load_config(REPO / "configs/shapes/seg_distill_pseudo.yaml",
                      [f"world.root={tiny_world / 'world'}", *TINY, f"output_dir={run}"])
    assert cfg.seg.name == "seg_clip_rn_fpn"
    teacher = Teacher.from_config(cfg.teacher)
    start = segmentation.build_student(cfg, teacher)
    tower = teacher.model.visual.state_dict()
    for k, v in start.backbone.body.state_dict().items():
        torch.testing.assert_close(v, tower[k].to(v.dtype), rtol=0, atol=0)
    torch.testing.assert_close(start.mean.flatten(), torch.tensor(teacher.mean))
    segmentation.train(cfg, progress=False)
    out = tmp_path / "segmenter"
    assert export.main(["--run", str(run), "--output", str(out), "--onnx"]) == 0
    config = json.loads((out / "config.json").read_text())["model"]
    assert config["trunk_layers"] == [1, 1, 1, 1] and config["trunk_width"] == 16
    model = segmentation.build_student(load_config(run / "config.yaml"), teacher).eval()
    load_weights(model, run / "model_final.safetensors")
    student = load_student(out)
    model.set_vocabulary(teacher.text(student.vocabulary.names))
    image = sorted((tiny_world / "world").glob("*/images/val/*.png"))[0]
    pixels = np.array(Image.open(image).convert("RGB"))
    found = student.predict(image)["labels"]
    want = model.predict(torch.from_numpy(pixels).permute(2, 0, 1)[None])[0].numpy()
    np.testing.assert_array_equal(found, want)
    assert_same_label_maps(OnnxSegmenter(out, threads=threads).predict(pixels)["labels"], found,
                           student.model, pixels)
    total = without_open_clip(f"from segmentors import load_student\n"
                              f"print(load_student({str(out)!r}).predict({str(image)!r})"
                              f"['labels'].sum())")
    assert int(total) == int(found.sum())
    vit = load_config(REPO / "configs/shapes/seg_supervised.yaml",
                      [f"world.root={tiny_world / 'world'}", *TINY, "teacher.model=tiny_vit",
                       f"teacher.model_config={REPO / 'configs/shapes/teacher/tiny_vit.json'}",
                       f"output_dir={tmp_path / 'vit'}"])
    with pytest.raises(ConfigError, match=r"ResNet teacher's tower .*not VisionTransformer "
                                          r"\(teacher.model: tiny_vit\); with this teacher "
                                          r"set e.g. seg.name=seg_r10_fpn seg.norm=gn"):
        segmentation.train(vit, progress=False)


def test_deeplabv2_r101_student_layout_and_torchvision_weights(tmp_path):
    """MaskCLIP+'s student: dilated ResNet-101 (output stride 8) + ASPP (rates 6-24, summed),
    starting from a torchvision ResNet-101 state_dict file."""
    import torchvision

    from distill.backbones import ASPP

    torch.manual_seed(0)
    start = torchvision.models.resnet101().state_dict()
    torch.save(start, tmp_path / "r101.pth")
    model = build_segmenter("seg_deeplabv2_r101", embed_dim=8, fpn_channels=16,
                            backbone_weights=str(tmp_path / "r101.pth"))
    body = model.backbone.body
    assert torch.equal(body.layer4[0].conv2.weight, start["layer4.0.conv2.weight"])
    assert (body.layer3[1].conv2.dilation, body.layer4[1].conv2.dilation) == ((2, 2), (4, 4))
    aspp = model.backbone.aspp
    assert isinstance(aspp, ASPP) and [b.dilation for b in aspp.branches] == [
        (6, 6), (12, 12), (18, 18), (24, 24)]
    assert sum(p.numel() for p in aspp.parameters()) == 4 * (2048 * 16 * 9 + 16)
    model.set_vocabulary(torch.nn.functional.normalize(torch.randn(3, 8), dim=-1))
    out = model(torch.randint(0, 256, (1, 3, 64, 96), dtype=torch.uint8))
    assert out["pixel_logits"].shape == (1, 3, 8, 12)  # stride 8
