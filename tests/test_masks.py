"""The class-agnostic Mask R-CNN branch of ViLD students (``model.mask_head``): shapes,
targets and loss against hand computations and torchvision's maskrcnn_loss, learning a
mask, mask AP, the exported predictor, the demo and ONNX."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.models.detection.roi_heads import maskrcnn_loss
from torchvision.models.detection.transform import resize_boxes

from detectors import build_detector, load_student
from detectors.augment import hflip_target
from detectors.criterion import DetectionCriterion
from detectors.inference import evaluate_detector
from detectors.predictor import DetectorStudent
from distill.config import DetectorConfig, LossConfig
from distill.data.coco import CocoDetection
from distill.export import Vocabulary, write_student
from distill.losses import MissingOutputError, mask_loss
from ovdistill import report
from tests.parity import assert_same_detections
from tools import demo

SIZE = 96
MODEL = {"name": "vild_r18_fpn", "hidden": 32, "box_batch_size_per_image": 32,
         "image_size": SIZE, "box_detections_per_img": 20}


def _model(**kw):
    torch.manual_seed(0)
    return build_detector(**{**MODEL, **kw}, embed_dim=16)


def _vocabulary(n: int = 2) -> Vocabulary:
    torch.manual_seed(1)
    return Vocabulary([[f"class{k}"] for k in range(n)], F.normalize(torch.randn(n, 16), dim=-1),
                      [k == n - 1 for k in range(n)])


def _triangle(x0: int, y0: int, side: int, flip: bool = False) -> np.ndarray:
    """(SIZE, SIZE) uint8: a right triangle filling half of its side x side box."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    inside = (xx >= x0) & (xx < x0 + side) & (yy >= y0) & (yy < y0 + side)
    dx = (x0 + side - 1 - xx) if flip else (xx - x0)
    return (inside & (dx <= y0 + side - 1 - yy)).astype(np.uint8)


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a & b).sum() / (a | b).sum()).item()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two 96 x 96 COCO images on disk, one triangle each (RLE masks): 'wedge' (base) in
    image 1, 'ramp' (novel) in image 2."""
    root = tmp_path_factory.mktemp("mask_world")
    (root / "images").mkdir()
    images, anns = [], []
    for k, (tri, colour) in enumerate([(_triangle(20, 20, 56), (220, 60, 40)),
                                       (_triangle(10, 30, 50, flip=True), (40, 200, 60))]):
        pixels = np.full((SIZE, SIZE, 3), 90, np.uint8)
        pixels[tri.astype(bool)] = colour
        Image.fromarray(pixels).save(root / "images" / f"{k}.png")
        images.append({"id": k + 1, "file_name": f"{k}.png", "height": SIZE, "width": SIZE})
        rle = mask_utils.encode(np.asfortranarray(tri))
        x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
        anns.append({"id": k + 1, "image_id": k + 1, "category_id": k + 1, "bbox": [x, y, w, h],
                     "area": float(tri.sum()), "iscrowd": 0,
                     "segmentation": {"size": [SIZE, SIZE], "counts": rle["counts"].decode()}})
    categories = [{"id": 1, "name": "wedge", "split": "base"},
                  {"id": 2, "name": "ramp", "split": "novel"}]
    (root / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": anns, "categories": categories}))
    return CocoDetection(root / "instances.json", root / "images", with_masks=True)


def _target(sample: dict) -> dict:
    return {k: sample[k] for k in ("boxes", "labels", "masks")}


# --------------------------------------------------------------------------- model


def test_config_and_builder_switch_the_head_on():
    assert DetectorConfig().mask_head is False and LossConfig().mask == 1.0
    plain, masked = _model(), _model(mask_head=True)
    assert not plain.roi_heads.has_mask() and masked.roi_heads.has_mask()
    assert masked.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 1  # class-agnostic
    assert masked.roi_heads.mask_roi_pool.output_size == (14, 14)
    assert not any(k.startswith("roi_heads.mask") for k in plain.state_dict())


def test_mask_head_shapes_in_train_and_eval(world):
    m = _model(mask_head=True).train()
    m.set_vocabulary(_vocabulary().embeddings)
    samples = [world[0], world[1]]
    images = [s["image"] for s in samples]
    out = m(images, [_target(s) for s in samples])
    positives = int((out["labels"] > 0).sum())
    assert positives >= 2  # at least the ground-truth boxes themselves
    assert out["mask_logits"].shape == (positives, 1, 28, 28)
    assert out["mask_targets"].shape == (positives, 28, 28)
    assert 0 <= out["mask_targets"].min() and out["mask_targets"].max() <= 1
    assert out["mask_targets"].amax(dim=(1, 2)).min() > 0.5  # each holds its object
    # with cached distillation boxes as well
    out = m(images, [_target(s) for s in samples], [torch.tensor([[0.0, 0, 30, 30]])] * 2)
    assert "distill_embeddings" in out and out["mask_logits"].shape[1:] == (1, 28, 28)
    with pytest.raises(ValueError, match="masks"):
        m(images, [{k: s[k] for k in ("boxes", "labels")} for s in samples])
    # inference: probabilities at each picture's own resolution, one mask per box
    m.eval()
    picture = torch.randint(0, 256, (3, 80, 120), dtype=torch.uint8)
    with torch.no_grad():
        det = m([picture, images[0]])
    for d, (h, w) in zip(det, [(80, 120), (SIZE, SIZE)], strict=True):
        assert d["masks"].shape == (len(d["boxes"]), 1, h, w) and len(d["boxes"]) > 0
        assert d["masks"].dtype == torch.float32
        assert 0 <= d["masks"].min() and d["masks"].max() <= 1 and d["masks"].max() > 0
    # a student without the head trains and predicts as before
    plain = _model().train()
    plain.set_vocabulary(_vocabulary().embeddings)
    assert not {"mask_logits", "mask_targets"} & set(plain(images, [_target(s) for s in samples]))
    with torch.no_grad():
        assert "masks" not in plain.eval()([picture])[0]


def test_mask_targets_are_the_matched_masks_and_the_loss_is_torchvisions(world):
    """Two objects of different classes share the single mask channel; with no RPN
    proposal the positive RoIs are exactly the ground-truth boxes."""
    m = _model(mask_head=True).train()
    m.set_vocabulary(_vocabulary().embeddings)
    masks = torch.zeros(2, SIZE, SIZE, dtype=torch.uint8)
    masks[0, 8:40, 8:24] = 1  # left half of box 0
    masks[1, 50:70, 50:90] = 1  # top half of box 1
    boxes = torch.tensor([[8.0, 8, 40, 40], [50, 50, 90, 90]])
    target = {"boxes": boxes, "labels": torch.tensor([1, 2]), "masks": masks}
    image = (world[0]["image"].float() / 255)[None]
    features = m.backbone(image)
    out = m.roi_heads(features, [torch.zeros(0, 4)], [(SIZE, SIZE)], [target])
    gt = out["labels"][out["labels"] > 0] - 1  # matched ground truth of each positive RoI
    assert sorted(gt.tolist()) == [0, 1]
    for t, g in zip(out["mask_targets"], gt.tolist(), strict=True):  # (28, 28) in the box
        # (the outermost samples of roi_align reach past the mask's edge at the box's edge)
        if g == 0:  # left half
            assert t[1:-1, 1:13].min() > 0.99 and t[:, 15:].max() < 0.01
        else:  # top half
            assert t[1:13, 1:-1].min() > 0.99 and t[15:].max() < 0.01
    ours = DetectionCriterion({"vild_image": 0.0, "objectness": 0.0, "rpn_box_reg": 0.0})(out)["loss_mask"]
    channel0 = torch.zeros(2, dtype=torch.long)  # torchvision's labels: one class, index 0
    theirs = maskrcnn_loss(out["mask_logits"], [boxes[gt]], [masks], [channel0], [gt])
    torch.testing.assert_close(ours, theirs)
    assert ours.item() > 0


def test_mask_loss_by_hand_and_in_the_criterion():
    # RoI 0: logits [[0, 2], [-1, 0]] vs [[1, 0], [0, 1]]; RoI 1: [[3, 3], [3, 3]] vs all 1
    logits = torch.tensor([[[[0.0, 2.0], [-1.0, 0.0]]], [[[3.0, 3.0], [3.0, 3.0]]]],
                          requires_grad=True)
    targets = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]])

    def softplus(x):
        return math.log1p(math.exp(x))

    # BCE(x, y) = softplus(x) - x * y
    by_hand = (softplus(0) + softplus(2) + softplus(-1) + softplus(0)
               + 4 * (softplus(3) - 3)) / 8
    assert mask_loss(logits, targets).item() == pytest.approx(by_hand, rel=1e-6)
    empty = torch.zeros(0, 1, 2, 2, requires_grad=True)
    loss = mask_loss(empty, torch.zeros(0, 2, 2))
    assert loss.item() == 0.0
    loss.backward()  # stays in the graph

    base = {"rpn_losses": {"loss_objectness": torch.tensor(0.5),
                           "loss_rpn_box_reg": torch.tensor(0.25)}}
    only_rpn = {"vild_text": 0.0, "box_reg": 0.0, "vild_image": 0.0}
    # weight 2 but no mask head outputs: no mask loss, no error
    assert set(DetectionCriterion({**only_rpn, "mask": 2.0})(base)) == {"loss_objectness",
                                                                "loss_rpn_box_reg"}
    with_masks = {**base, "mask_logits": logits, "mask_targets": targets}
    losses = DetectionCriterion({**only_rpn, "mask": 2.0})(with_masks)
    assert losses["loss_mask"].item() == pytest.approx(2 * by_hand, rel=1e-6)
    assert "loss_mask" not in DetectionCriterion({**only_rpn, "mask": 0.0})(with_masks)
    with pytest.raises(MissingOutputError, match="mask_targets"):
        DetectionCriterion(only_rpn)({**base, "mask_logits": logits})
    assert DetectionCriterion.from_config(LossConfig(mask=0.5)).weights["mask"] == 0.5


def test_hflip_target_mirrors_boxes_and_masks(world):
    s = world[0]
    flipped = hflip_target({**_target(s), "extra": torch.ones(1)}, SIZE)
    torch.testing.assert_close(flipped["masks"], s["masks"].flip(-1))
    ys, xs = torch.where(flipped["masks"][0].bool())
    bbox = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=torch.float32)
    torch.testing.assert_close(flipped["boxes"], bbox)  # the box of the mirrored mask
    assert flipped["labels"] is s["labels"] and flipped["extra"].tolist() == [1.0]
    # the object's pixels in the mirrored image are the mirrored mask's
    image = s["image"].flip(-1)
    assert (image[:, flipped["masks"][0].bool()] != 90).all()
    distill = hflip_target({"boxes": torch.tensor([[0.0, 1, 10, 20]]),
                            "embeddings": torch.ones(1, 2)}, SIZE)
    assert distill["boxes"].tolist() == [[86.0, 1, 96, 20]] and "masks" not in distill


def _predict_mask(m, image, box) -> torch.Tensor:
    """The student's (H, W) bool mask for ``box`` (1, 4) in ``image``'s pixels."""
    was = m.training
    m.eval()
    with torch.no_grad():
        image_list, _, original = m._prepare([image])
        features = m.backbone(image_list.tensors)
        det = [{"boxes": resize_boxes(box, original[0], image_list.image_sizes[0]),
                "labels": torch.ones(1, dtype=torch.long)}]
        m.roi_heads.predict_masks(features, det, image_list.image_sizes)
        probs = m.transform.postprocess(det, image_list.image_sizes, original)[0]["masks"]
    m.train(was)
    return probs[0, 0] > 0.5


def test_a_tiny_model_learns_the_mask_of_one_object(world):
    """30 steps on one image: the mask of its triangle, which fills half of its box, goes
    from chance to a close fit."""
    m = _model(mask_head=True).train()
    m.set_vocabulary(_vocabulary().embeddings)
    s = world[0]
    gt = s["masks"][0].bool()
    x0, y0, x1, y1 = (int(v) for v in s["boxes"][0])
    box_mask = torch.zeros_like(gt)
    box_mask[y0:y1, x0:x1] = True
    box_fill = _iou(gt, box_mask)  # a mask that fills the box: about 0.5
    before = _iou(_predict_mask(m, s["image"], s["boxes"]), gt)
    criterion = DetectionCriterion({"vild_image": 0.0})
    optimizer = torch.optim.Adam(m.parameters(), lr=1e-3)
    for _ in range(30):
        losses = criterion(m([s["image"]], [_target(s)]))
        assert "loss_mask" in losses
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    after = _iou(_predict_mask(m, s["image"], s["boxes"]), gt)
    assert box_fill < 0.6 and before < 0.6
    assert after > 0.75 and after > box_fill + 0.2, (before, box_fill, after)


# --------------------------------------------------------------------------- evaluation


def _perfect(world, mask_prob: float | None):
    """``forward`` for evaluate_detector: each image's ground-truth box and label (score 0.9),
    with its ground-truth mask at probability ``mask_prob`` (None: no masks)."""
    by_pixels = {world[i]["image"].float().sum().item(): world[i] for i in range(len(world))}

    def forward(images):
        out = []
        for im in images:
            s = by_pixels[im.float().sum().item()]
            det = {"boxes": s["boxes"], "scores": torch.full((len(s["boxes"]),), 0.9),
                   "labels": s["labels"]}
            if mask_prob is not None:
                det["masks"] = s["masks"][:, None].float() * mask_prob
            out.append(det)
        return out

    return forward


def test_evaluation_reports_mask_ap(world):
    text = _vocabulary().embeddings
    box_keys = {"AP", "AP50", "AP50_novel", "AP50_base", "AP50_all", "images_per_s"}
    m = _model(mask_head=True)
    m.forward = _perfect(world, 0.9)
    metrics = evaluate_detector(m, world, text, world.novel, progress=False)
    assert set(metrics) == box_keys | {f"mask_{k}" for k in box_keys - {"images_per_s"}}
    for k in ("AP50_novel", "AP50_base", "AP50_all"):
        assert metrics[k] == pytest.approx(1.0) and metrics[f"mask_{k}"] == pytest.approx(1.0)
    # masks below 0.5 are empty: mask AP drops to 0, box AP is untouched
    m.forward = _perfect(world, 0.4)
    metrics = evaluate_detector(m, world, text, world.novel, progress=False)
    assert metrics["AP50_all"] == pytest.approx(1.0) and metrics["mask_AP50_all"] == 0.0
    # a student without a mask head reports box AP only
    plain = _model()
    plain.forward = _perfect(world, None)
    assert set(evaluate_detector(plain, world, text, world.novel, progress=False)) == box_keys


# --------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    """An exported (untrained) mask student, as tools/export.py writes it."""
    path = tmp_path_factory.mktemp("mask_student") / "student"
    model = _model(mask_head=True)
    config = {"task": "detection", "embed_dim": 16, "model": {**MODEL, "mask_head": True},
              "thresholds": {"score": 0.3}}
    write_student(path, model.state_dict(), config, _vocabulary())
    return path


def test_predictor_returns_masks(student_dir):
    student = load_student(student_dir)
    picture = np.random.default_rng(0).integers(0, 256, (80, 120, 3), dtype=np.uint8)
    found = student.predict(picture, score_threshold=0.0)
    n = len(found["scores"])
    assert n > 0 and found["masks"].shape == (n, 80, 120) and found["masks"].dtype == bool
    with torch.no_grad():
        ref = student.model([torch.from_numpy(picture).permute(2, 0, 1)])[0]
    np.testing.assert_array_equal(found["masks"], (ref["masks"][:, 0] > 0.5).numpy())
    assert found["masks"].any()
    # the score threshold drops masks with their boxes
    assert student.predict(picture, score_threshold=1.01)["masks"].shape == (0, 80, 120)
    plain = DetectorStudent(_model(), _vocabulary(), {})
    assert "masks" not in plain.predict(picture, score_threshold=0.0)


def test_demo_draws_masks_and_writes_rle(student_dir, tmp_path):
    picture = Image.new("RGB", (80, 60), (128, 128, 128))
    mask = np.zeros((1, 60, 80), bool)
    mask[0, 20:35, 25:45] = True
    found = {"boxes": np.array([[10.0, 10, 70, 50]]), "scores": np.array([0.9]),
             "names": ["thing"], "novel": [False], "masks": mask}
    drawn = np.asarray(demo.draw(picture, found)).astype(float)
    inside = (1 - report.MASK_ALPHA) * 128 + report.MASK_ALPHA * np.array(report.BASE)
    np.testing.assert_allclose(drawn[27, 35], inside, atol=1)
    assert drawn[mask[0]].std(axis=0).max() < 1  # the whole mask, evenly
    assert drawn[45, 60].tolist() == [128, 128, 128]  # inside the box, outside the mask
    novel = np.asarray(demo.draw(picture, {**found, "novel": [True]})).astype(float)
    assert not np.allclose(novel[27, 35], drawn[27, 35])  # in the detection's colour
    # the CLI: masks in predictions.json as RLE, the same as predict's
    image_path = tmp_path / "picture.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (SIZE, SIZE, 3),
                                                      dtype=np.uint8)).save(image_path)
    assert demo.main(["--student", str(student_dir), "--output", str(tmp_path / "out"),
                      "--score-threshold", "0", "--no-progress", str(image_path)]) == 0
    found = load_student(student_dir).predict(image_path, score_threshold=0.0)
    detections = json.loads((tmp_path / "out/predictions.json").read_text())[0]["detections"]
    assert len(detections) == len(found["masks"]) > 0
    decoded = np.stack([mask_utils.decode({**d["mask"], "counts": d["mask"]["counts"].encode()})
                        for d in detections]).astype(bool)
    np.testing.assert_array_equal(decoded, found["masks"])
    drawn = np.asarray(Image.open(tmp_path / "out/picture.png").convert("RGB"))
    original = np.asarray(Image.open(image_path).convert("RGB"))
    assert not np.array_equal(drawn[found["masks"].any(0)], original[found["masks"].any(0)])


def test_onnx_exports_the_mask_branch(student_dir, tmp_path, threads):
    import shutil

    from detectors.onnx import OnnxDetector, export_onnx

    copy = tmp_path / "student"
    shutil.copytree(student_dir, copy)
    student = load_student(copy)
    export_onnx(student, copy / "model.onnx")
    onnx = OnnxDetector(copy, threads=threads)
    rng = np.random.default_rng(2)
    for picture in [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8),
                    np.full((SIZE, SIZE, 3), 100, np.uint8)]:
        got = onnx.predict(picture, score_threshold=0.0)
        ref = student.predict(picture, score_threshold=0.0)
        assert got["masks"].shape[1:] == ref["masks"].shape[1:] == (SIZE, SIZE)
        with torch.no_grad():  # the same detections, in the same order, before p > 0.5
            prob = student.model([torch.from_numpy(picture).permute(2, 0, 1)])[0]["masks"][:, 0]
        assert len(prob) == len(ref["masks"])
        # detections on a threshold, the top-k cut or an NMS boundary may fall either way
        # (tests/parity.py); each matched one has the same mask but where p is 0.5 +- 1e-4
        for i, j in assert_same_detections(got, ref, student, [0.0]):
            differ = got["masks"][i] != ref["masks"][j]
            assert (np.abs(prob[j].numpy()[differ] - 0.5) < 1e-4).all()
        assert ref["masks"].any()
