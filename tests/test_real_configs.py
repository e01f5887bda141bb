"""configs/coco_ov, configs/lvis and configs/ade20k: each loaded and run for one iteration on
a fake datasets tree in the real layout ($OVD_DATASETS), with the fixture annotations and
generated pixels. Only the teacher (a tiny random open_clip ViT instead of ViT-B), the
device (CPU) and the sizes are overridden; the steps are docs/reproduce.md's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from detectors import recipe as detection
from distill.config import load_config
from segmentors import recipe as segmentation
from tests.fake_datasets import fake_datasets
from tools import extract, make_ov_coco, make_ov_lvis, pipeline, train, train_seg

REPO = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]

TINY = [f"teacher.model_config={REPO / 'configs/shapes/teacher/tiny_vit.json'}",
        "teacher.model=tiny_vit", "teacher.pretrained=null", "teacher.device=cpu",
        "teacher.templates=simple", "train.device=cpu", "train.amp=false",
        "train.num_workers=0"]
# train.reference_batch=1: the configs' schedules (for 16 images a step) are not scaled up to
# 16 iterations of one image
ONE_STEP = ["train.max_iters=1", "train.batch_size=1", "train.reference_batch=1",
            "train.checkpoint_period=1",
            "train.schedule.warmup_iters=0", "train.schedule.steps=[]"]
DETECTOR = ["model.image_size=128", "model.fpn_channels=32", "model.hidden=64",
            "model.box_batch_size_per_image=32", "model.rpn_post_nms_top_n_test=20",
            "cache.num_proposals=20"]


@pytest.fixture
def datasets(tmp_path, monkeypatch) -> Path:
    """$OVD_DATASETS: the fake tree of tests/fake_datasets.py."""
    root = tmp_path / "datasets"
    monkeypatch.setenv("OVD_DATASETS", str(root))
    monkeypatch.delenv("DETECTRON2_DATASETS", raising=False)
    fake_datasets(root)
    return root


def _cfg(path: str, tmp_path: Path, *extra: str):
    return load_config(REPO / path, [*TINY, *ONE_STEP, *extra])


def _detector_steps(bench: str, tmp_path: Path) -> dict[str, dict]:
    """docs/reproduce.md's steps for one benchmark, one iteration each."""
    out = tmp_path / "outputs" / bench
    common = [*DETECTOR, f"cache.root={tmp_path / 'cache'}",
              f"cache.proposals={out / 'vild_text' / 'proposals_train.safetensors'}"]
    text = _cfg(f"configs/{bench}/vild_text.yaml", tmp_path, *common,
                f"output_dir={out / 'vild_text'}")
    metrics = {"vild_text": detection.train(text, progress=False)}
    detection.write_split_proposals(text, "train", progress=False)
    assert extract.main(["--config", str(REPO / f"configs/{bench}/extract.yaml"), *TINY, *common,
                         f"output_dir={out / 'extract'}", "--no-progress"]) == 0
    names = ("vild", "vild_ensemble", "fvlm", "baron") if bench == "coco_ov" else \
        ("vild", "vild_ensemble", "fvlm")
    for name in names:
        # F-VLM's trunk is a ResNet teacher's tower: the tiny ResNet one here
        tower = [f"teacher.model_config={REPO / 'configs/shapes/teacher/tiny_rn.json'}",
                 "teacher.model=tiny_rn"] if name == "fvlm" else []
        # BARON's 9 regions x 6 words outrun the tiny teacher's 48 tokens: 4 words here
        words = ["loss.bags.words=4", "loss.bags.min_objectness=0"] if name == "baron" else []
        cfg = _cfg(f"configs/{bench}/{name}.yaml", tmp_path, *common, *tower, *words,
                   f"output_dir={out / name}")
        metrics[name] = detection.train(cfg, progress=False)
        assert (out / name / "model_final.safetensors").is_file()
    return metrics


def test_coco_ov_configs_one_iteration_each(datasets, tmp_path, capsys):
    assert make_ov_coco.main([]) == 0  # default paths under $OVD_DATASETS
    assert "65 categories" in capsys.readouterr().out
    cfg = load_config(REPO / "configs/coco_ov/vild.yaml")
    assert (cfg.model.name, cfg.teacher.model, cfg.model.temperature) == (
        "vild_r50_fpn", "ViT-B-32", 0.01)
    assert cfg.train.optim.lr == pytest.approx(0.32 * 16 / 256)
    assert cfg.train.max_iters == 180000 * 256 // 16
    metrics = _detector_steps("coco_ov", tmp_path)
    first = (tmp_path / "outputs/coco_ov/baron/metrics.jsonl").read_text().splitlines()[0]
    assert "loss_bag" in json.loads(first) and "loss_vild_image" not in json.loads(first)
    run = load_config(tmp_path / "outputs/coco_ov/vild/config.yaml")  # what trained
    assert run.data.scale_jitter == [0.1, 2.0]  # ViLD's recipe parts were active
    assert (run.model.norm, run.model.fpn_norm, run.model.head_convs, run.model.head_norm,
            run.model.head_fcs, run.model.backbone_weights) == ("bn", "bn", 4, "bn", 2, None)
    for m in metrics.values():
        assert {"AP50_novel", "AP50_base", "AP50_all"} <= set(m)
        assert all(0.0 <= m[k] <= 1.0 or m[k] == -1.0 for k in ("AP50_novel", "AP50_base"))


def test_lvis_configs_one_iteration_each(datasets, tmp_path):
    assert make_ov_lvis.main([]) == 0
    cfg = load_config(REPO / "configs/lvis/vild.yaml")
    assert cfg.model.box_detections_per_img == 300 and cfg.model.mask_head
    metrics = _detector_steps("lvis", tmp_path)
    for m in metrics.values():  # ViLD's LVIS figure is mask APr: the masks are scored too
        assert {"AP", "APr", "APc", "APf", "mask_AP", "mask_APr"} <= set(m)
    ev = json.loads((tmp_path / "outputs/lvis/vild/eval/metrics.json").read_text())
    assert "APr" in ev["bbox"] and "APr" in ev["segm"]


def test_the_short_schedule_trains_from_an_imagenet_resnet50_file(datasets, tmp_path):
    """configs/vild_r50_short.yaml after the config: the ResNet-50 starts from the file."""
    import torch
    import torchvision
    from safetensors.torch import load_file

    assert make_ov_coco.main([]) == 0
    torch.manual_seed(0)
    weights = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), weights)
    out = tmp_path / "short"
    cfg = load_config(REPO / "configs/coco_ov/vild_text.yaml",
                      [str(REPO / "configs/vild_r50_short.yaml"), *TINY, *ONE_STEP, *DETECTOR,
                       f"model.backbone_weights={weights}", f"output_dir={out}"])
    detection.train(cfg, progress=False)
    trained = load_file(out / "model_final.safetensors")
    start = torch.load(weights, weights_only=True)
    # the stem is frozen with ImageNet weights: it ends as the file gave it
    assert torch.equal(trained["backbone.body.conv1.weight"], start["conv1.weight"])
    assert not torch.equal(trained["backbone.body.layer4.0.conv1.weight"],
                           start["layer4.0.conv1.weight"])


@pytest.fixture(scope="module")
def resnet101(tmp_path_factory) -> Path:
    """A torchvision ResNet-101 state_dict file (random weights: the configs' ImageNet file)."""
    import torch
    import torchvision

    path = tmp_path_factory.mktemp("weights") / "resnet101.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet101().state_dict(), path)
    return path


@pytest.mark.parametrize("config", ["ade20k/maskclip_plus", "ade20k/teacher",
                                    "pascal_context/maskclip_plus", "pascal_context/teacher"])
def test_segmentation_configs_one_iteration_each(datasets, tmp_path, resnet101, config):
    """MaskCLIP+'s own student (DeepLabv2-R101 from a torchvision ResNet-101 file) with its
    loss switches (bilinear pseudo-labels at label resolution, padding ignored), on ADE20k
    and PASCAL Context-59; the teacher's own segmentation of each."""
    name = config.split("/")[1]
    cfg = _cfg(f"configs/{config}.yaml", tmp_path, f"output_dir={tmp_path / name}",
               f"seg.backbone_weights={resnet101}", "seg.fpn_channels=32", "seg.short_side=64",
               "seg.crop_size=72", "seg.window=64", "seg.stride=48")
    # the teacher's figures are MaskCLIP's with key smoothing and prompt denoising; MaskCLIP+'s
    # annotation-free configs set neither for the pseudo-labels (docs/reproduce.md section 8)
    assert (cfg.seg.key_smoothing, cfg.seg.prompt_denoising) == (
        (1.0, 0.5) if name == "teacher" else (0.0, 0.0))
    if name == "maskclip_plus":
        assert (cfg.seg.name, cfg.seg.pseudo_label_upsample, cfg.seg.ignore_padding) == (
            "seg_deeplabv2_r101", "bilinear", True)
    if name == "teacher":
        metrics = segmentation.teacher_baseline(cfg, progress=False)
    else:
        metrics = segmentation.train(cfg, progress=False)
        assert (tmp_path / name / "model_final.safetensors").is_file()
    assert 0.0 <= metrics["mIoU"] <= 1.0
    ev = json.loads((tmp_path / name / "eval" / "metrics.json").read_text())
    classes = 150 if config.startswith("ade20k") else 59
    assert len(segmentation.datasets(cfg)[1].classes) == classes
    if config.startswith("pascal_context"):  # the split files' ids, not every image
        assert [Path(p).stem for p, _ in segmentation.datasets(cfg)[0].items] == [
            "2008_000002", "2008_000003"]
    assert ev


def test_missing_dataset_root_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OVD_DATASETS", str(tmp_path / "nowhere"))
    rc = train.main(["--config", str(REPO / "configs/coco_ov/vild_text.yaml"), *TINY])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert str(tmp_path / "nowhere" / "coco") in err and "make_ov_coco" in err
    rc = train_seg.main(["--config", str(REPO / "configs/ade20k/teacher.yaml"), *TINY,
                         "--teacher-baseline"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert str(tmp_path / "nowhere" / "ADEChallengeData2016") in err and "validation" in err
    rc = train_seg.main(["--config", str(REPO / "configs/pascal_context/teacher.yaml"), *TINY,
                         "--teacher-baseline"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert str(tmp_path / "nowhere" / "VOCdevkit/VOC2010") in err
    assert "SegmentationClassContext" in err


@pytest.mark.parametrize("bench, make", [("coco_ov", make_ov_coco), ("lvis", make_ov_lvis)])
def test_benchmark_pipeline_is_one_command(datasets, tmp_path, capsys, bench, make):
    """docs/reproduce.md's one command per benchmark: every stage, the export, the report."""
    assert make.main([]) == 0
    out = tmp_path / "outputs" / bench
    assert pipeline.main(["--config", str(REPO / f"configs/{bench}/pipeline.yaml"), "--no-progress",
                          "--with-teacher", *TINY, *ONE_STEP, *DETECTOR, f"output_dir={out}",
                          f"cache.root={tmp_path / 'cache'}", "pipeline.pictures=1"]) == 0
    text = capsys.readouterr().out
    summary = json.loads((out / "pipeline.json").read_text())
    # the novel classes come from the split tags (OV-COCO) or LVIS's rare frequency
    assert "novel classes (the split tags of " in text
    stage = load_config(Path(summary["students"]["vild"]["run"]) / "config.yaml")
    names = detection.val_set(stage)  # with the data.novel every stage got
    held = {n for n, v in zip(names.names, names.novel, strict=True) if v}
    # the 4-image train split leaves many base classes without a box: held out with the
    # novel ones (novel when val annotates them, else untrained), never trained as background
    assert held == set(summary["data"]["novel"]) | set(summary["data"]["untrained"])
    assert set(summary["data"]["base"]).isdisjoint(held) and summary["data"]["base"]
    tagged = {c["name"].replace("_", " ") for c in detection.val_set(
        load_config(out / "config.yaml")).categories if c.get("split") == "novel"}
    assert tagged <= held
    assert (out / "export" / "model.safetensors").is_file() and (out / "report.md").is_file()
    # ViLD's "CLIP on cropped regions" baseline ran too (--with-teacher), on its own 300
    # proposals per image (the test's students score 20)
    assert {"vild_text", "vild", "teacher"} == set(summary["students"])
    teacher = json.loads((Path(summary["students"]["vild_text"]["run"]) /
                          "teacher_on_300_proposals" / "summary.json").read_text())
    assert {"coco_ov": "AP50_novel", "lvis": "APr"}[bench] in teacher


def test_coco_clipself_refinement_feeds_the_ade20k_teacher(datasets, tmp_path, resnet101):
    """configs/coco_ov/refine_teacher.yaml for one iteration on the fake COCO images (the
    tiny ViT in place of ViT-B/16), then the ADE20k teacher baseline on its refined tower
    (teacher.dense_pretrained)."""
    from safetensors.torch import load_file

    from tools import refine_teacher

    assert make_ov_coco.main([]) == 0
    refined = tmp_path / "refine" / "refined.safetensors"
    assert refine_teacher.main(["--config", str(REPO / "configs/coco_ov/refine_teacher.yaml"),
                                *TINY, *ONE_STEP, "teacher.dense_short_side=64",
                                f"output_dir={tmp_path / 'refine'}", f"refine.output={refined}",
                                "--no-progress"]) == 0
    assert "visual.proj" in load_file(refined)
    cfg = _cfg("configs/ade20k/teacher.yaml", tmp_path, f"output_dir={tmp_path / 'teacher'}",
               f"teacher.dense_pretrained={refined}", f"seg.backbone_weights={resnet101}",
               "seg.short_side=64", "seg.window=64", "seg.stride=48")
    metrics = segmentation.teacher_baseline(cfg, progress=False)
    assert {"mIoU", "mIoU_base", "mIoU_novel"} <= set(metrics)
    saved = load_config(tmp_path / "teacher" / "config.yaml")
    assert saved.teacher.dense_pretrained == str(refined)
