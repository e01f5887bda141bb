"""Detectors on the teacher's own image tower (detectors.vild_clip_rn_fpn) and F-VLM's fusion
(detectors/vild.py RegionVLM): weights copied exactly, the frozen trunk untouched by
training, the fused scores by hand, export and ONNX parity, and the refusals."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import roi_align

from detectors import build_detector
from detectors import recipe as detection
from distill.config import ConfigError, load_config
from distill.engine import load_weights
from distill.teacher import Teacher
from tests.parity import assert_same_detections, without_open_clip

REPO = Path(__file__).resolve().parents[1]
TINY = ["world.num_train=6", "world.num_val=3", "world.image_size=96", "world.max_objects=3",
        f"teacher.model_config={REPO / 'configs/shapes/teacher/tiny_rn.json'}",
        "teacher.model=tiny_rn", "teacher.pretrained=null", "teacher.dense_short_side=0",
        "train.max_iters=2", "train.batch_size=2", "model.image_size=96", "model.hidden=32",
        "model.box_batch_size_per_image=16"]


def _random_statistics(module: torch.nn.Module) -> None:
    """Non-trivial batch-norm statistics and affine terms (a fresh tower's are 0 / 1)."""
    g = torch.Generator().manual_seed(0)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)


@pytest.fixture(scope="module")
def fvlm(tmp_path_factory):
    """F-VLM (configs/shapes/fvlm.yaml) trained 2 iterations on a tiny world with a random
    tiny ResNet teacher, exported with its ONNX graph."""
    from tools import export

    root = tmp_path_factory.mktemp("tower")
    run = root / "run"
    cfg = load_config(REPO / "configs/shapes/fvlm.yaml",
                      [f"world.root={root / 'world'}", *TINY, f"output_dir={run}"])
    detection.train(cfg, progress=False)
    assert export.main(["--run", str(run), "--output", str(root / "student"), "--onnx"]) == 0
    images = sorted((root / "world").glob("*/images/val/*.png"))
    return cfg, run, root / "student", images


def test_attention_pool_and_region_scores_are_the_towers():
    """AttentionPool computes open_clip's AttentionPool2d with its weights; RegionVLM is that
    pool on each box's RoIAlign of the tower's last stage."""
    from open_clip.modified_resnet import ModifiedResNet
    from torchvision.ops import FrozenBatchNorm2d

    from detectors.vild import RegionVLM
    from distill.clip_trunk import AttentionPool, ClipResNetTrunk, load_tower, tower_shape

    torch.manual_seed(0)
    tower = ModifiedResNet(layers=[1, 1, 2, 1], output_dim=8, heads=4, image_size=96,
                           width=16).eval()
    _random_statistics(tower)
    shape = tower_shape(tower, pool=True)
    assert shape == {"trunk_layers": [1, 1, 2, 1], "trunk_width": 16, "pool_grid": 3,
                     "pool_heads": 4}
    trunk = ClipResNetTrunk(shape["trunk_layers"], 16, FrozenBatchNorm2d)
    pool = AttentionPool(3, trunk.channels[-1], 4, 8)
    load_tower(trunk, tower, pool)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(pool(trunk(x)), tower(x), rtol=1e-5, atol=1e-6)
        stage = tower.layer4(tower.layer3(tower.layer2(tower.layer1(tower.stem(x)))))
        boxes = [torch.tensor([[0.0, 0.0, 96.0, 96.0], [10.0, 20.0, 50.0, 90.0]]),
                 torch.tensor([[30.0, 5.0, 70.0, 40.0]])]
        want = F.normalize(tower.attnpool(roi_align(stage, boxes, 3, 1 / 32, 2, aligned=True)),
                           dim=-1)
        torch.testing.assert_close(RegionVLM(pool)(trunk(x), boxes), want, rtol=1e-5,
                                   atol=1e-6)
    assert not any(p.requires_grad for p in RegionVLM(pool).parameters())
    with pytest.raises(ValueError, match="3 x 3 map expected, got \\(2, 2\\)"):
        pool(torch.zeros(1, trunk.channels[-1], 2, 2))


def test_tower_student_starts_from_the_teacher_and_the_frozen_trunk_stays_it(fvlm):
    cfg, run, _, _ = fvlm
    teacher = Teacher.from_config(cfg.teacher)
    tower = teacher.model.visual.state_dict()
    start = detection.build_student(cfg, teacher)
    body = start.backbone.body.state_dict()
    assert body and all(torch.equal(v, tower[k].to(v.dtype)) for k, v in body.items())
    pool = start.roi_heads.vlm.pool.state_dict()
    assert pool and all(torch.equal(v, tower[f"attnpool.{k}"]) for k, v in pool.items())
    assert start.transform.image_mean == list(teacher.mean)
    # the frozen trunk gets no gradient; the FPN and the heads do
    start.train()
    image = torch.rand(3, 96, 96)
    target = {"boxes": torch.tensor([[10.0, 10.0, 60.0, 50.0]]), "labels": torch.tensor([1])}
    start.set_training_vocabulary(F.normalize(torch.randn(3, teacher.embed_dim), dim=-1))
    out = start([image], [target])
    loss = sum(out["rpn_losses"].values()) + out["region_embeddings"].sum()
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in start.backbone.body.parameters())
    assert all(p.grad is not None for p in start.backbone.fpn.parameters())
    # two iterations of AdamW later the trained student's trunk and pool are still the tower
    trained = detection.build_student(cfg, teacher)
    load_weights(trained, run / "model_final.safetensors")
    for k, v in trained.backbone.body.state_dict().items():
        assert torch.equal(v, tower[k].to(v.dtype)), k
    fpn_before = start.backbone.fpn.state_dict()
    assert any(not torch.equal(v, fpn_before[k])
               for k, v in trained.backbone.fpn.state_dict().items())


def test_fvlm_fusion_by_hand(fvlm):
    """Each box's score is the detector's fused with the tower's own region score: base
    s_det^0.65 s_vlm^0.35, novel s_det^0.35 s_vlm^0.65; s_vlm by reference scoring without
    the background (a training name: softmax over the training names; a novel name: against
    the training names and itself), computed here from open_clip's tower directly."""
    cfg, run, _, images = fvlm
    teacher = Teacher.from_config(cfg.teacher)
    model = detection.build_student(cfg, teacher).eval()
    load_weights(model, run / "model_final.safetensors")
    heads = model.roi_heads
    assert heads.ensemble_lambda == pytest.approx(0.65)
    training = heads.reference_embeddings
    novel = F.normalize(torch.randn(2, teacher.embed_dim, generator=torch.Generator()
                                    .manual_seed(1)), dim=-1)
    vocab = torch.cat([training[[2, 0]], novel])  # two training names, two novel ones
    model.set_vocabulary(vocab)
    seen = {}

    def record(probs, boxes, counts, shapes):
        seen["probs"] = probs
        return []

    heads.postprocess = record
    image = torch.from_numpy(np.asarray(Image.open(images[0]).convert("RGB")).copy())
    image = image.permute(2, 0, 1)
    with torch.no_grad():
        x = model.transform([image.float() / 255])[0].tensors
        proposals, _ = model.rpn(model.transform([image.float() / 255])[0],
                                 model.backbone(x))
        model([image])
        visual = teacher.model.visual
        stage = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(x)))))
        region = F.normalize(visual.attnpool(roi_align(stage, proposals, 2, 1 / 32, 2,
                                                       aligned=True)), dim=-1)
        text = heads.class_probs(heads.text_head(heads.box_roi_pool(
            model.backbone(x), proposals, [(96, 96)]))[0])[:, 1:]
    logits = region.double() @ vocab.double().T / heads.temperature
    fixed = torch.logsumexp(region.double() @ training.double().T / heads.temperature, -1,
                            keepdim=True)
    vlm = torch.cat([torch.exp(logits[:, :2] - fixed), torch.sigmoid(logits[:, 2:] - fixed)], 1)
    weight = torch.tensor([0.35, 0.35, 0.65, 0.65], dtype=torch.float64)  # the tower's share
    want = text.double() ** (1 - weight) * vlm ** weight
    torch.testing.assert_close(seen["probs"][:, 1:].double(), want, rtol=1e-4, atol=1e-6)
    assert seen["probs"].shape == (len(proposals[0]), 5)


def test_tower_student_exports_and_runs_without_open_clip_and_in_onnx(fvlm, threads):
    from detectors import load_student
    from detectors.onnx import OnnxDetector

    cfg, run, student_dir, images = fvlm
    config = json.loads((student_dir / "config.json").read_text())["model"]
    assert (config["name"], config["trunk_layers"], config["trunk_width"], config["pool_grid"],
            config["freeze_trunk"], config["vlm_fusion"]) == (
        "vild_clip_rn_fpn", [1, 1, 1, 1], 16, 2, True, True)
    teacher = Teacher.from_config(cfg.teacher)
    model = detection.build_student(cfg, teacher).eval()
    load_weights(model, run / "model_final.safetensors")
    student = load_student(student_dir)
    model.set_vocabulary(student.vocabulary.embeddings, torch.tensor(student.vocabulary.novel))
    image = np.asarray(Image.open(images[0]).convert("RGB"))
    with torch.no_grad():
        ref = model([torch.from_numpy(image.copy()).permute(2, 0, 1)])[0]
    found = student.predict(images[0], score_threshold=0.0)
    assert len(found["scores"]) == len(ref["scores"]) > 0
    np.testing.assert_allclose(found["scores"], ref["scores"].numpy(), rtol=1e-5, atol=1e-6)
    onnx = OnnxDetector(student_dir, threads=threads)
    for picture in [np.asarray(Image.open(p).convert("RGB")) for p in images]:
        assert_same_detections(onnx.predict(picture, score_threshold=0.0),
                               student.predict(picture, score_threshold=0.0), student, [0.0])
    count = without_open_clip(f"from detectors import load_student\n"
                              f"r = load_student({str(student_dir)!r}).predict("
                              f"{str(images[0])!r}, score_threshold=0.0)\n"
                              f"print(len(r['scores']))")
    assert int(count) == len(found["scores"])


def test_vild_ensemble_exports_to_onnx_with_the_same_scores(tmp_path):
    """ViLD-ensemble's second branch runs in the ONNX graph too (novel = not a training name,
    as in PyTorch); its image head untrained here (no cache), which parity does not need."""
    from detectors import load_student
    from detectors.onnx import OnnxDetector
    from tools import export

    run = tmp_path / "run"
    cfg = load_config(REPO / "configs/shapes/vild_ensemble.yaml",
                      [f"world.root={tmp_path / 'world'}", *TINY, "loss.vild_image=0",
                       f"output_dir={run}"])
    detection.train(cfg, progress=False)
    assert export.main(["--run", str(run), "--output", str(tmp_path / "student"), "--onnx"]) == 0
    student = load_student(tmp_path / "student")
    assert student.model.roi_heads.image_head is not None
    onnx = OnnxDetector(tmp_path / "student", threads=1)
    for path in sorted((tmp_path / "world").glob("*/images/val/*.png")):
        picture = np.asarray(Image.open(path).convert("RGB"))
        assert_same_detections(onnx.predict(picture, score_threshold=0.0),
                               student.predict(picture, score_threshold=0.0), student, [0.0])


def test_tower_settings_refused_in_one_line(tmp_path):
    tower = {"trunk_layers": [1, 1, 1, 1], "trunk_width": 16, "image_mean": [0.5] * 3,
             "image_std": [0.25] * 3, "pool_grid": 2, "pool_heads": 2, "embed_dim": 8}
    with pytest.raises(ValueError, match="model.norm: vild_clip_rn_fpn keeps the CLIP tower's"):
        build_detector("vild_clip_rn_fpn", norm="gn", **tower)
    with pytest.raises(ValueError, match="model.norm: a frozen trunk .* set model.norm=frozen_bn"):
        build_detector("vild_clip_rn_fpn", norm="bn", freeze_trunk=True, **tower)
    with pytest.raises(ValueError, match="model.vlm_fusion .* set model.freeze_trunk=true"):
        build_detector("vild_clip_rn_fpn", vlm_fusion=True, **tower)
    with pytest.raises(ValueError, match="model.ensemble and model.vlm_fusion"):
        build_detector("vild_clip_rn_fpn", vlm_fusion=True, freeze_trunk=True, ensemble=True,
                       **tower)
    with pytest.raises(ValueError, match="model.anchor_sizes: one size per feature map \\(4"):
        build_detector("vild_clip_rn_fpn", anchor_sizes=[32, 64], **tower)
    with pytest.raises(ValueError, match="model.vlm_fusion: .* model.name=vild_clip_rn_fpn"):
        build_detector("vild_r10_fpn", embed_dim=8, vlm_fusion=True)
    with pytest.raises(ValueError, match="model.freeze_trunk: a frozen ResNet needs"):
        build_detector("vild_r10_fpn", embed_dim=8, freeze_trunk=True)
    vit = load_config(REPO / "configs/shapes/vild_tower.yaml",
                      [*TINY, "teacher.model=tiny_vit", f"world.root={tmp_path}",
                       f"teacher.model_config={REPO / 'configs/shapes/teacher/tiny_vit.json'}"])
    with pytest.raises(ConfigError, match=r"model.name=vild_clip_rn_fpn starts from a ResNet "
                                          r"teacher's tower .*not VisionTransformer"):
        detection.build_student(vit, Teacher.from_config(vit.teacher))
