# ViLD (text + image distillation) in mmdetection 3.x on OV-COCO (48 base / 17 novel):
# the embedded world's config with the settings of configs/coco_ov/: mmdet's ResNet-50 +
# FPN (ImageNet weights from a local file: set model.backbone.init_cfg), 1024 px, RoI head
# width 1024, temperature 0.01, ViLD-image weight 0.5 on the cached ViT-B/32 embeddings of
# the RPN's top 300 proposals, SGD at lr 0.02 for a total batch of 16 (ViLD's 180k x 256
# scaled linearly, as configs/coco_ov/base.yaml).
#
#   python -m tools.train_mmdet configs/mmdet/vild_r50_fpn_coco_ov.py \
#       --ovd-config configs/coco_ov/vild.yaml
#
# ovd_config names the data ($OVD_DATASETS), the teacher and the cache
# (tools/extract.py --config configs/coco_ov/extract.yaml writes it).
_base_ = ["./vild_r10_fpn_shapes.py"]
ovd_config = "configs/coco_ov/vild.yaml"
image_size = 1024
max_iters = 2880000

model = dict(
    backbone=dict(_delete_=True, type="ResNet", depth=50, num_stages=4, out_indices=(0, 1, 2, 3),
                  frozen_stages=1, norm_cfg=dict(type="BN", requires_grad=False), norm_eval=True,
                  style="pytorch", init_cfg=None),  # init_cfg=dict(type="Pretrained", checkpoint=...)
    neck=dict(_delete_=True, type="FPN", in_channels=[256, 512, 1024, 2048], out_channels=256,
              num_outs=5),
    rpn_head=dict(in_channels=256, feat_channels=256,
                  anchor_generator=dict(scales=[8], strides=[4, 8, 16, 32, 64])),
    roi_head=dict(
        bbox_roi_extractor=dict(roi_layer=dict(sampling_ratio=0), out_channels=256,
                                featmap_strides=[4, 8, 16, 32]),
        bbox_head=dict(ovd_config=ovd_config, embed_dim=512, hidden=1024, temperature=0.01,
                       in_channels=256)),
    train_cfg=dict(rcnn=dict(sampler=dict(num=512))))

# the pipelines are restated: mmengine fills in ovd_config and image_size when it reads
# the base file, and a child's list replaces the base's whole
meta_keys = ("img_id", "img_path", "ori_shape", "img_shape", "scale_factor", "flip",
             "flip_direction")
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="Resize", scale=(image_size, image_size), keep_ratio=True),
    dict(type="RandomFlip", prob=0.5),
    dict(type="LoadDistillTargets", ovd_config=ovd_config, per_image=0),
    dict(type="PackDetInputs", meta_keys=meta_keys + ("distill_boxes", "distill_embeddings")),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="Resize", scale=(image_size, image_size), keep_ratio=True),
    dict(type="PackDetInputs", meta_keys=meta_keys[:5]),
]
train_dataloader = dict(batch_size=2, num_workers=2, persistent_workers=True,
                        dataset=dict(ovd_config=ovd_config, pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(ovd_config=ovd_config, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ovd_config=ovd_config)
test_evaluator = val_evaluator

train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
optim_wrapper = dict(optimizer=dict(_delete_=True, type="SGD", lr=0.02, momentum=0.9,
                                    weight_decay=0.00004), clip_grad=None)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.01, by_epoch=False, begin=0, end=1000),
    dict(type="MultiStepLR", by_epoch=False, begin=0, end=max_iters,
         milestones=[2592000, 2736000], gamma=0.1),  # ViLD's 90 % and 95 %, lr x 0.1 each
]
default_hooks = dict(logger=dict(interval=100),
                     checkpoint=dict(interval=10000, max_keep_ckpts=2))
env_cfg = dict(dist_cfg=dict(backend="nccl"))
log_processor = dict(window_size=100)
