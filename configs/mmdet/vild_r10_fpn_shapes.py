# ViLD (text + image distillation) in mmdetection 3.x on the embedded world, with the
# parts of detectors/mmdet and the settings of configs/shapes/base.yaml + vild.yaml:
# ResNet-10/FPN-64 (GroupNorm, from scratch) at 128 px, RoI head width 512, temperature
# 0.05, AdamW, 800 iterations of batch 4, ViLD-image weight 0.5 on the cached proposals.
#
#   python -m tools.train_mmdet configs/mmdet/vild_r10_fpn_shapes.py \
#       --ovd-config outputs/shapes/vild-<hash>/config.yaml
#
# ovd_config: the config.yaml of a native ViLD run (`make demo` writes one); its world,
# teacher and embedding cache are the ones this student uses. --ovd-config sets it.
ovd_config = "outputs/shapes/vild/config.yaml"
custom_imports = dict(imports=["detectors.mmdet"], allow_failed_imports=False)
default_scope = "mmdet"
image_size = 128
max_iters = 800

model = dict(
    type="FasterRCNN",
    data_preprocessor=dict(type="DetDataPreprocessor", mean=[123.675, 116.28, 103.53],
                           std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_size_divisor=32),
    backbone=dict(type="OVDResNetFPN", depth=10, returned_layers=(2, 3, 4), fpn_channels=64,
                  norm="gn"),
    neck=None,
    rpn_head=dict(
        type="RPNHead", in_channels=64, feat_channels=64,
        # the native students' anchors: 16, 32, 64, 128 px on strides 8, 16, 32, 64
        anchor_generator=dict(type="AnchorGenerator", scales=[2], ratios=[0.5, 1.0, 2.0],
                              strides=[8, 16, 32, 64]),
        bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
        loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
        loss_bbox=dict(type="L1Loss", loss_weight=1.0)),
    roi_head=dict(
        type="ViLDRoIHead",
        vild_image_weight=0.5,
        bbox_roi_extractor=dict(type="SingleRoIExtractor",
                                roi_layer=dict(type="RoIAlign", output_size=7, sampling_ratio=1),
                                out_channels=64, featmap_strides=[8, 16, 32]),
        bbox_head=dict(type="EmbeddingBBoxHead", ovd_config=ovd_config, embed_dim=128,
                       hidden=512, temperature=0.05, in_channels=64, roi_feat_size=7,
                       reg_class_agnostic=True,
                       bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4,
                                       target_stds=[0.1, 0.1, 0.2, 0.2]))),
    train_cfg=dict(
        rpn=dict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.7, neg_iou_thr=0.3,
                               min_pos_iou=0.3, match_low_quality=True, ignore_iof_thr=-1),
                 sampler=dict(type="RandomSampler", num=256, pos_fraction=0.5, neg_pos_ub=-1,
                              add_gt_as_proposals=False),
                 allowed_border=-1, pos_weight=-1, debug=False),
        rpn_proposal=dict(nms_pre=2000, max_per_img=1000, nms=dict(type="nms", iou_threshold=0.7),
                          min_bbox_size=0),
        rcnn=dict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.5, neg_iou_thr=0.5,
                                min_pos_iou=0.5, match_low_quality=False, ignore_iof_thr=-1),
                  sampler=dict(type="RandomSampler", num=128, pos_fraction=0.25, neg_pos_ub=-1,
                               add_gt_as_proposals=True),
                  pos_weight=-1, debug=False)),
    test_cfg=dict(
        rpn=dict(nms_pre=1000, max_per_img=300, nms=dict(type="nms", iou_threshold=0.7),
                 min_bbox_size=0),
        rcnn=dict(score_thr=0.001, nms=dict(type="nms", iou_threshold=0.5), max_per_img=100)))

meta_keys = ("img_id", "img_path", "ori_shape", "img_shape", "scale_factor", "flip",
             "flip_direction")
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="Resize", scale=(image_size, image_size), keep_ratio=True),
    dict(type="RandomFlip", prob=0.5),
    # every cached proposal, as the native students had when docs/results.md's native-vs-mmdet
    # table was made; configs/shapes/base.yaml has since distilled only objectness >= 0.3
    dict(type="LoadDistillTargets", ovd_config=ovd_config, per_image=64, min_objectness=0.0),
    dict(type="PackDetInputs", meta_keys=meta_keys + ("distill_boxes", "distill_embeddings")),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=(image_size, image_size), keep_ratio=True),
    dict(type="PackDetInputs", meta_keys=meta_keys[:5]),
]
train_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False,
    sampler=dict(type="InfiniteSampler", shuffle=True),
    dataset=dict(type="OVDCocoDataset", ovd_config=ovd_config, split="train",
                 filter_cfg=dict(filter_empty_gt=True, min_size=0), pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False, drop_last=False,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(type="OVDCocoDataset", ovd_config=ovd_config, split="val", test_mode=True,
                 pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(type="OVDCocoMetric", ovd_config=ovd_config)
test_evaluator = val_evaluator

train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
optim_wrapper = dict(type="OptimWrapper",
                     optimizer=dict(type="AdamW", lr=0.0005, weight_decay=0.05),
                     clip_grad=dict(max_norm=5.0))
param_scheduler = [
    dict(type="LinearLR", start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type="CosineAnnealingLR", by_epoch=False, begin=0, end=max_iters, T_max=max_iters),
]
default_hooks = dict(
    timer=dict(type="IterTimerHook"),
    logger=dict(type="LoggerHook", interval=25),
    param_scheduler=dict(type="ParamSchedulerHook"),
    checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=max_iters, max_keep_ckpts=1),
    sampler_seed=dict(type="DistSamplerSeedHook"))
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
               dist_cfg=dict(backend="gloo"))
log_processor = dict(type="LogProcessor", window_size=25, by_epoch=False)
log_level = "INFO"
randomness = dict(seed=0)
load_from = None
resume = False
