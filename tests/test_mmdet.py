"""The mmdetection plugin (detectors/mmdet): skipped where mmdet is not installed.

`make test-mmdet` installs mmdet (tools/install_mmdet.sh) and runs this file.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("mmdet", reason="mmdetection is not installed: `make test-mmdet` "
                                    "installs it (tools/install_mmdet.sh) and runs these tests")
pytest.importorskip("mmcv.ops", reason="mmcv without its compiled ops (mmcv-lite): run "
                                       "tools/install_mmdet.sh")

from distill.losses import box_regression_loss, vild_image_loss, vild_text_loss  # noqa: E402
from tools import pipeline, train_mmdet  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/mmdet/vild_r10_fpn_shapes.py"
TINY = ["world.num_train=8", "world.num_val=4", "world.image_size=96", "world.max_objects=3",
        "teacher.model=tiny_vit", "teacher.model_config=configs/shapes/teacher/tiny_vit.json",
        "teacher.pretrained=null", "teacher.dense_short_side=0", "train.max_iters=2",
        "train.batch_size=2", "model.image_size=96", "model.hidden=32",
        "model.box_batch_size_per_image=16", "model.rpn_post_nms_top_n_test=20",
        "seg.name=seg_r10_fpn", "seg.norm=gn"]  # seg_clip_rn_fpn needs a ResNet teacher


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """A tiny native pipeline run: world, teacher, RPN proposals, cache, ViLD student."""
    root = tmp_path_factory.mktemp("mmdet")
    assert pipeline.main(["--no-progress", f"output_dir={root / 'out'}",
                          f"world.root={root / 'world'}", f"cache.root={root / 'cache'}",
                          *TINY]) == 0
    return root, next((root / "out").glob("vild-*/config.yaml"))


def test_embedding_head_scores_and_losses_are_the_native_ones(native):
    from mmdet.registry import MODELS

    import detectors.mmdet as plugin

    _, ovd_config = native
    head = MODELS.build(dict(type="EmbeddingBBoxHead", ovd_config=str(ovd_config), embed_dim=128,
                             hidden=16, temperature=0.05, in_channels=8, roi_feat_size=7))
    train_text = plugin.text_embeddings(str(ovd_config), "train")
    assert head.num_classes == len(train_text) == 12  # base classes only
    assert len(plugin.class_names(str(ovd_config), "val")) == 16
    x = torch.randn(5, 8, 7, 7)
    head.train()
    logits, deltas = head(x)
    emb = head.last_embeddings
    bg = F.normalize(head.background, dim=0)
    torch.testing.assert_close(logits, emb @ torch.cat([train_text, bg[None]]).T / 0.05)
    assert deltas.shape == (5, 4)
    # mmdet labels: 0..C-1 classes, C background -> native 1..C, 0
    labels = torch.tensor([0, 11, 12, 3, 12])
    targets = torch.randn(5, 4)
    losses = head.loss(logits, deltas, None, labels, torch.ones(5), targets, torch.ones(5, 4))
    native_labels = torch.tensor([1, 12, 0, 4, 0])
    torch.testing.assert_close(losses["loss_cls"],
                               vild_text_loss(emb, native_labels, train_text, bg, 0.05))
    torch.testing.assert_close(losses["loss_bbox"],
                               box_regression_loss(deltas, targets, native_labels))
    # by hand: the cross-entropy of the logits with background moved first
    moved = torch.cat([logits[:, -1:], logits[:, :-1]], dim=1)
    torch.testing.assert_close(losses["loss_cls"], F.cross_entropy(moved, native_labels))
    head.eval()  # the test vocabulary: every class name
    assert head(x)[0].shape == (5, 17)


def test_distill_targets_follow_resize_and_flip(native):
    from detectors.mmdet import LoadDistillTargets

    _, ovd_config = native
    t = LoadDistillTargets(str(ovd_config))
    image_id = next(iter(t.cache._where))
    rec = t.cache.get(image_id)
    out = t.transform({"img_id": image_id, "scale_factor": (0.5, 2.0), "img_shape": (192, 48),
                       "flip": True, "flip_direction": "horizontal"})
    x0, y0, x1, y1 = rec["boxes"].T
    want = np.stack([48 - 0.5 * x1, 2 * y0, 48 - 0.5 * x0, 2 * y1], axis=1)
    np.testing.assert_allclose(out["distill_boxes"], want, rtol=1e-6)
    np.testing.assert_array_equal(out["distill_embeddings"], rec["embeddings"])
    t2 = LoadDistillTargets(str(ovd_config), per_image=1)
    assert len(t2.transform({"img_id": image_id})["distill_boxes"]) == 1
    cut = float(np.median(rec["scores"]))
    t3 = LoadDistillTargets(str(ovd_config), min_objectness=cut)
    np.testing.assert_array_equal(t3.transform({"img_id": image_id})["distill_boxes"],
                                  rec["boxes"][rec["scores"] >= cut])
    with pytest.raises(ValueError, match="horizontal flips only"):
        t.transform({"img_id": image_id, "flip": True, "flip_direction": "vertical",
                     "img_shape": (10, 10)})


def test_vild_image_loss_on_cached_proposals(native):
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample
    from mmengine.config import ConfigDict
    from mmengine.structures import InstanceData

    _, ovd_config = native
    roi_head = MODELS.build(dict(
        type="ViLDRoIHead", vild_image_weight=0.5,
        bbox_roi_extractor=dict(type="SingleRoIExtractor",
                                roi_layer=dict(type="RoIAlign", output_size=7, sampling_ratio=1),
                                out_channels=8, featmap_strides=[8]),
        bbox_head=dict(type="EmbeddingBBoxHead", ovd_config=str(ovd_config), embed_dim=128,
                       hidden=16, temperature=0.05, in_channels=8),
        train_cfg=ConfigDict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5,
                                           neg_iou_thr=0.5, min_pos_iou=0.5),
                             sampler=dict(type="RandomSampler", num=8, pos_fraction=0.25),
                             pos_weight=-1)))
    feats = (torch.randn(1, 8, 12, 12),)
    sample = DetDataSample(metainfo={"img_shape": (96, 96),
                                     "distill_boxes": np.array([[8, 8, 40, 40]], np.float32),
                                     "distill_embeddings": np.eye(128, dtype=np.float32)[:1]})
    sample.gt_instances = InstanceData(bboxes=torch.tensor([[10.0, 10, 50, 50]]),
                                       labels=torch.tensor([2]))
    proposals = InstanceData(bboxes=torch.tensor([[10.0, 10, 50, 50], [0, 0, 20, 20]]),
                             scores=torch.tensor([0.9, 0.5]))
    losses = roi_head.loss(feats, [proposals], [sample])
    assert set(losses) == {"loss_cls", "loss_bbox", "loss_vild_image"}
    from mmdet.structures.bbox import bbox2roi

    pooled = roi_head.bbox_roi_extractor(feats, bbox2roi([torch.tensor([[8.0, 8, 40, 40]])]))
    student, _ = roi_head.bbox_head.embed(pooled)
    want = 0.5 * vild_image_loss(student, torch.eye(128)[:1])
    torch.testing.assert_close(losses["loss_vild_image"], want)


def test_train_and_test_one_config(native, tmp_path, capsys):
    _, ovd_config = native
    work = tmp_path / "work"
    args = [str(CONFIG), "--ovd-config", str(ovd_config), "--work-dir", str(work),
            "--cfg-options", "train_cfg.max_iters=2", "train_cfg.val_interval=2",
            "train_dataloader.batch_size=2", "model.roi_head.bbox_head.embed_dim=128",
            "model.roi_head.bbox_head.hidden=16"]
    assert train_mmdet.main(args) == 0
    metrics = json.loads((work / "metrics.json").read_text())
    assert {"ov/AP50_novel", "ov/AP50_base", "ov/AP50_all"} <= set(metrics)
    assert all(-1 <= metrics[k] <= 1 for k in ("ov/AP50_novel", "ov/AP50_base"))
    assert "metrics written to" in capsys.readouterr().out
    # --test-only scores the saved safetensors weights: the same metrics
    (work / "metrics.json").unlink()
    assert train_mmdet.main([*args[:5], "--test-only", *args[5:]]) == 0
    assert json.loads((work / "metrics.json").read_text()) == metrics
    assert train_mmdet.main([*args[:4], str(tmp_path / "empty"), "--test-only"]) == 2
    assert "model_final.safetensors not found: train first" in capsys.readouterr().err


def test_train_mmdet_errors_are_one_line(tmp_path, capsys):
    assert train_mmdet.main([str(CONFIG), "--ovd-config", str(tmp_path / "none.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --ovd-config") and err.endswith("(outputs/shapes/vild-*/config.yaml)")
    assert "\n" not in err
    assert train_mmdet.main([str(tmp_path / "x.py"), "--ovd-config", str(CONFIG)]) == 2
    assert capsys.readouterr().err.strip() == f"error: mmdet config {tmp_path / 'x.py'} not found"


def test_coco_ov_config_builds_an_r50_fpn_student_that_predicts(native, tmp_path):
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample
    from mmdet.utils import register_all_modules

    import detectors.mmdet  # noqa: F401 - registers the parts

    _, ovd_config = native  # the tiny world's teacher (128-d) stands in for ViT-B/32's
    cfg = train_mmdet.build_config(str(REPO / "configs/mmdet/vild_r50_fpn_coco_ov.py"),
                                   str(ovd_config), str(tmp_path),
                                   ["model.roi_head.bbox_head.embed_dim=128"])
    assert cfg.train_dataloader.dataset.ovd_config == str(ovd_config)
    register_all_modules()
    model = MODELS.build(cfg.model).eval()
    assert type(model.backbone).__name__ == "ResNet" and model.backbone.depth == 50
    head = model.roi_head.bbox_head
    assert head.temperature == 0.01 and head.head.trunk[1].out_features == 1024
    image = torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8)
    meta = dict(img_shape=(64, 96), ori_shape=(64, 96), scale_factor=(1.0, 1.0))
    data = model.data_preprocessor({"inputs": [image],
                                    "data_samples": [DetDataSample(metainfo=meta)]}, False)
    with torch.no_grad():
        found = model(**data, mode="predict")[0].pred_instances
    assert found.bboxes.shape[1] == 4 and len(found.scores) <= 100
    assert found.labels.numel() == 0 or int(found.labels.max()) < 16  # every class at test time
