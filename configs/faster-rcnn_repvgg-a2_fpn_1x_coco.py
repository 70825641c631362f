# Faster R-CNN FPN 1x with RepVGG-A2, the counterpart of ResNet-50 (5.12 vs 4.11 GMACs
# at 224x224, 76.48 vs 76.31 ImageNet top-1; see README). Same schedule and data as
# mmdet's R-50 config; only the backbone and the FPN input channels differ. The backbone
# starts from the ImageNet weights OpenMMLab hosts for mmpretrain (76.49 top-1), downloaded
# and cached on first use, as mmdet's R-50 starts from torchvision://resnet50. The official
# file instead:
#   --cfg-options model.backbone.init_cfg.checkpoint=checkpoints/RepVGG-A2-train.pth
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmrepvgg'], allow_failed_imports=False)
from mmrepvgg.checkpoint import imagenet_checkpoint  # noqa: E402
from mmrepvgg.models import arch_channels  # noqa: E402

arch = 'A2'
model = dict(
    backbone=dict(
        _delete_=True, type='mmrepvgg.RepVGG', arch=arch, out_indices=(0, 1, 2, 3),
        frozen_stages=1, norm_eval=True, norm_cfg=dict(type='BN', requires_grad=True),
        init_cfg=dict(type='Pretrained', checkpoint=imagenet_checkpoint(arch))),
    neck=dict(in_channels=list(arch_channels(arch))))
