# RetinaNet FPN 1x with RepVGG-A2, the counterpart of ResNet-50 (see the Faster R-CNN
# config and README for the pairing and the ImageNet weights it starts from). Only the
# backbone and FPN input channels differ.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
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
