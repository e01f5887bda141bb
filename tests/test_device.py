"""The GPU path, proved on this CPU: fake CUDA tensors (FakeTensorMode).

torch here is a CUDA build without a GPU. Under ``FakeTensorMode`` a module moved to
``cuda`` holds fake CUDA tensors, and an op that meets a CPU tensor raises torch's
device-mismatch error, as on a real GPU. A whole ViLD forward cannot run there
(torchvision's transform calls ``.item()``, NMS has no fake kernel), so these tests run
the parts: the engine's transfer of real collated batches, then the backbone, the RPN
head, the RoI heads on given boxes and the criterion; a segmenter training step with the
teacher's targets; the teacher's crop and dense paths; evaluation and ``predict``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torchvision.ops import roi_align

from detectors import build_detector
from detectors.criterion import DetectionCriterion
from detectors.recipe import DistillationSet
from distill import engine
from distill.config import TrainConfig, load_config
from distill.data.coco import CocoDetection, collate, dataset_paths
from distill.data.semantic import collate_semantic, synthetic_semantic
from distill.data.synthetic import generate_world
from distill.engine import train
from distill.teacher import Teacher
from segmentors import build_segmenter
from segmentors.recipe import TrainView, training_targets

REPO = Path(__file__).resolve().parents[1]
TINY = ["world.num_train=4", "world.num_val=2", "world.image_size=96", "world.max_objects=3",
        f"teacher.model_config={REPO / 'configs/shapes/teacher/tiny_rn.json'}",
        "teacher.model=tiny_rn", "teacher.pretrained=null", "teacher.dense_short_side=96",
        "model.image_size=96", "model.hidden=32", "seg.crop_size=64", "seg.short_side=0"]
CUDA = torch.device("cuda", 0)


class Reached(Exception):
    """The step got through every part on the device (the fake tensors stop there: the
    engine's next move, reading the loss values, needs real data)."""


def tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors(v)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    cfg = load_config(REPO / "configs/shapes/vild.yaml", [f"world.root={root / 'world'}", *TINY])
    generate_world(cfg.world, progress=False)
    return cfg


@pytest.fixture(scope="module")
def teacher(cfg):
    return Teacher.from_config(cfg.teacher)


@pytest.fixture(autouse=True)
def real_data_loading(monkeypatch):
    """Data loading is CPU work that yields real CPU tensors (the DataLoader's seed and the
    augmentation draws need real values): it runs outside the fake mode, as it does outside
    the GPU; the engine's transfer to the device is what is tested."""
    build = engine.build_loader

    def real_loader(*args, **kwargs):
        with unset_fake_temporarily():
            loader = iter(build(*args, **kwargs))

        def batches():
            while True:
                with unset_fake_temporarily():
                    batch = next(loader)
                yield batch

        return batches()

    monkeypatch.setattr(engine, "build_loader", real_loader)


def _train_cfg(**kw) -> TrainConfig:
    return TrainConfig(max_iters=1, batch_size=2, device="cuda", log_period=1, **kw)


class FakeCache:
    """The cache's interface with real arrays: 5 boxes per image, D-d unit embeddings."""

    def __init__(self, dim):
        self.dim = dim

    def get(self, image_id):
        g = torch.Generator().manual_seed(int(image_id))
        xy = torch.rand(5, 2, generator=g) * 60
        boxes = torch.cat([xy, xy + 8 + torch.rand(5, 2, generator=g) * 20], 1)
        emb = torch.nn.functional.normalize(torch.randn(5, self.dim, generator=g), dim=-1)
        return {"boxes": boxes.numpy(), "scores": torch.ones(5).numpy(),
                "embeddings": emb.numpy()}


def test_engine_moves_detection_batches_and_the_student_runs_on_the_device(cfg, tmp_path):
    data = CocoDetection(*dataset_paths(cfg, "train"), category_ids="base")
    samples = DistillationSet(data, FakeCache(16))
    student = build_detector(**dataclasses.asdict(cfg.model), embed_dim=16)
    student.set_vocabulary(torch.nn.functional.normalize(torch.randn(12, 16), dim=-1))
    criterion = DetectionCriterion({"vild_text": 0.0, "box_reg": 0.0, "vild_image": 0.05,
                           "objectness": 0.0, "rpn_box_reg": 0.0})

    def loss_fn(model, batch):
        images = [b["image"] for b in batch]
        x = (torch.stack(images).float() / 255 - model.roi_heads.background.new_tensor(
            model.transform.image_mean)[:, None, None]) / model.roi_heads.background.new_tensor(
            model.transform.image_std)[:, None, None]
        features = model.backbone(x)  # the backbone
        assert all(t.device == CUDA for t in tensors(batch))  # images, targets, distill
        objectness, deltas = model.rpn.head(list(features.values()))  # the RPN head
        assert objectness[0].device == deltas[0].device == CUDA
        # the RoI heads on the cached boxes (one level: the multi-level pooler's level
        # choice is data-dependent, which fake tensors cannot follow)
        level = features["0"]
        pooled = roi_align(level, [b["distill"]["boxes"] for b in batch], 7,
                           level.shape[-1] / images[0].shape[-1], 2)
        embeddings, _ = model.roi_heads.text_head(pooled)
        targets = torch.cat([b["distill"]["embeddings"] for b in batch])
        losses = criterion({"distill_embeddings": embeddings, "distill_targets": targets})
        assert losses["loss_vild_image"].device == CUDA
        raise Reached

    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(Reached):
        train(student, loss_fn, samples, _train_cfg(), tmp_path, collate_fn=collate,
              tensorboard=False, progress=False)


def test_engine_moves_and_checkpoints_the_criterion(cfg, tmp_path):
    from distill.baron import PseudoWords

    criterion = DetectionCriterion({"bag": 1.0}, bag_queue=4, words=PseudoWords(8, 6))
    model = torch.nn.Linear(3, 1)

    def loss_fn(model, batch):
        assert criterion.student_bags.buffer.device == CUDA
        assert criterion.words.project.weight.device == CUDA
        raise Reached

    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(Reached):
        train(model, loss_fn, [torch.zeros(3)] * 4, _train_cfg(), tmp_path, criterion=criterion,
              tensorboard=False, progress=False)


def test_a_segmenter_training_step_runs_on_the_device(cfg, tmp_path):
    """The student on the GPU, the teacher where ``teacher.device`` puts it (the CPU here):
    its targets come over to the training device."""
    world = generate_world(cfg.world, progress=False)
    data = synthetic_semantic(world, "train")
    teacher = Teacher.from_config(cfg.teacher)
    student = build_segmenter("seg_r10_fpn", embed_dim=teacher.embed_dim, norm="gn")
    text = teacher.text(data.classes)
    student.set_vocabulary(text)
    seg = dataclasses.replace(cfg.seg, key_smoothing=0.0, prompt_denoising=0.5)
    assert teacher.temperature > 0  # read once from the real weights (a fake read has no value)

    def loss_fn(model, batch):
        outputs = model(batch["images"])
        assert all(t.device == CUDA for t in tensors(batch))
        targets = training_targets(batch, teacher, text, seg, [12, 13])
        # what the criterion reads is all on the device (the pixel losses themselves test
        # for empty masks, a data-dependent branch that fake tensors cannot take)
        assert {t.device for t in tensors([outputs, targets])} == {CUDA}
        assert targets["teacher_pixel_logits"].shape[1] == len(data.classes)
        raise Reached

    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(Reached):
        train(student, loss_fn, TrainView(data, seg), _train_cfg(), tmp_path,
              collate_fn=collate_semantic, tensorboard=False, progress=False)


def test_the_teachers_crop_and_dense_paths_run_on_its_device(cfg):
    """A CPU image (as loaded) handed to a teacher on the GPU."""
    teacher = Teacher.from_config(cfg.teacher)  # its own: it ends up holding fake tensors
    boxes = torch.tensor([[4.0, 4, 40, 50], [10, 20, 70, 90]])
    with FakeTensorMode(allow_non_fake_inputs=True):
        teacher.model.to(CUDA)
        # an image as a loader hands it over (fake tensors: a real one going to a fake GPU
        # starts CUDA itself, which this machine has not)
        image = torch.zeros(3, 96, 80, dtype=torch.uint8)
        # the crop path: normalised on the teacher's device, then the crops are cut (whose
        # grouping by size, torch.unique, has no fake kernel: the tower runs on them below)
        x = teacher.normalize(image)
        crops = teacher.model.encode_image(torch.nn.functional.interpolate(
            x, size=teacher.image_size, mode="bilinear"))
        (pooled,) = teacher.regions([image], [boxes], mode="dense")
        dense = teacher.dense(image)
    assert x.device == crops.device == pooled.device == dense.device == CUDA
    assert pooled.shape == (2, teacher.embed_dim) and dense.shape[-3] == teacher.embed_dim


def _on_device_forward(model):
    """``model``'s eval forward cut after its backbone, which runs on the images it is handed
    (a device mismatch raises there). What follows needs real values: NMS has no fake kernel,
    and the evaluator reads numpy."""
    def forward(images, targets=None, distill_boxes=None):
        x = torch.stack([im.float() / 255 for im in images])
        assert model.backbone(x)["0"].device == CUDA
        raise Reached
    return forward


def test_evaluation_and_predict_run_on_the_models_device(cfg, teacher, tmp_path):
    from detectors import load_student
    from detectors.inference import evaluate_detector
    from distill.export import Vocabulary, write_student

    val = CocoDetection(*dataset_paths(cfg, "val"))
    text = teacher.text(val.names)
    model = build_detector(**dataclasses.asdict(cfg.model), embed_dim=teacher.embed_dim)
    vocab = Vocabulary([[n] for n in val.names], text, val.novel)
    config = {"task": "detection", "embed_dim": teacher.embed_dim,
              "model": dataclasses.asdict(cfg.model), "thresholds": {"score": 0.3}}
    write_student(tmp_path / "student", model.state_dict(), config, vocab)
    student = load_student(tmp_path / "student")
    picture = torch.randint(0, 256, (96, 96, 3), dtype=torch.uint8).numpy()
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to(CUDA)
        model.forward = _on_device_forward(model)
        with pytest.raises(Reached):
            evaluate_detector(model, val, text, val.novel, progress=False)
        student.model.to(CUDA)
        student.model.forward = _on_device_forward(student.model)
        with pytest.raises(Reached):
            student.predict(picture, score_threshold=0.5)


class Loaded(list):
    """Samples read before the fake mode (reading checks label values: a data-dependent
    branch), with the dataset's class names."""

    def __init__(self, samples, classes, novel):
        super().__init__(samples)
        self.classes, self.novel = classes, novel


def test_segmenter_evaluation_and_predict_run_on_the_models_device(cfg, teacher, tmp_path):
    from distill.export import Vocabulary, write_student
    from segmentors import load_student
    from segmentors.recipe import evaluate

    world = generate_world(cfg.world, progress=False)
    val = synthetic_semantic(world, "val")
    model = build_segmenter("seg_r10_fpn", embed_dim=teacher.embed_dim, norm="gn")
    text = teacher.text(val.classes)
    vocab = Vocabulary([[n] for n in val.classes], text, val.novel)
    config = {"task": "segmentation", "embed_dim": teacher.embed_dim,
              "model": {"name": "seg_r10_fpn", "norm": "gn"}}
    write_student(tmp_path / "segmenter", model.state_dict(), config, vocab)
    student = load_student(tmp_path / "segmenter")
    picture = torch.randint(0, 256, (64, 80, 3), dtype=torch.uint8).numpy()
    loaded = Loaded([val[i] for i in range(2)], val.classes, val.novel)

    def logits_on_device(images):  # the student runs on the images it is handed
        assert model(images)["pixel_logits"].device == CUDA
        raise Reached

    def predict_on_device(images, threshold=0.0):
        assert student.model(images)["pixel_logits"].device == CUDA
        raise Reached

    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to(CUDA)
        model.set_vocabulary(text)
        with pytest.raises(Reached):
            evaluate(logits_on_device, teacher, loaded, model, None, cfg.seg, progress=False)
        student.model.to(CUDA)
        student.model.predict = predict_on_device
        with pytest.raises(Reached):
            student.predict(picture)


def test_gpu_smoke_bench_runs_every_real_config_at_toy_sizes(tmp_path):
    """bench/gpu_smoke.py --tiny: the GPU script's own code on the CPU, each real config."""
    import json
    import subprocess
    import sys

    out = tmp_path / "smoke.json"
    done = subprocess.run([sys.executable, "bench/gpu_smoke.py", "--tiny", "--steps", "2",
                           "--images", "1", "--output", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["config"] for r in rows] == ["configs/coco_ov/vild.yaml", "configs/lvis/vild.yaml",
                                           "configs/ade20k/maskclip_plus.yaml",
                                           "configs/pascal_context/maskclip_plus.yaml"]
    for r in rows:
        assert r["ddp"] and r["device"] == "cpu" and r["batch"] == 2
        assert r["s_per_iter"] > 0 and r["images_per_s"] > 0 and r["peak_memory_gib"] > 0
        assert f"| {r['config']} | cpu | {r['input']} | 2 |" in done.stdout
    for r in rows[:2]:  # the detectors: sharded evaluation and the teacher's precision
        assert r["eval_images"] == 1 and r["eval_images_per_s_total"] > 0
        # on the CPU the teacher runs float32 whatever amp_dtype says: the same embeddings
        assert r["teacher_amp_dtype"] is None and r["regions_amp_min_cosine"] == 1.0
