# Faster R-CNN FPN 1x with RepVGG-B1g4, the counterpart of ResNet-101 (7.30 vs 7.83 GMACs
# at 224x224, 77.58 vs 77.21 ImageNet top-1).
_base_ = './faster-rcnn_repvgg-a2_fpn_1x_coco.py'
from mmrepvgg.checkpoint import imagenet_checkpoint  # noqa: E402
from mmrepvgg.models import arch_channels  # noqa: E402

arch = 'B1g4'
model = dict(
    backbone=dict(arch=arch, init_cfg=dict(checkpoint=imagenet_checkpoint(arch))),
    neck=dict(in_channels=list(arch_channels(arch))))
