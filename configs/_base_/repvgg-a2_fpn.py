# RepVGG-A2 in place of mmdet's ResNet-50 under an FPN: the backbone and the FPN input
# channels, for the Faster R-CNN and RetinaNet configs alike. A detector config lists it
# beside mmdet's R-50 config and takes the override as its model:
#   _base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py', './_base_/repvgg-a2_fpn.py']
#   model = _base_.repvgg_fpn
# (mmengine refuses two bases that set the same key, so this one sets `repvgg_fpn`, not
# `model`.) The backbone starts from the ImageNet weights OpenMMLab hosts for mmpretrain
# (76.49 top-1), downloaded and cached on first use, as mmdet's R-50 starts from
# torchvision://resnet50. The official file instead:
#   --cfg-options model.backbone.init_cfg.checkpoint=checkpoints/RepVGG-A2-train.pth
# No base of its own; `_base_` named first all the same: mmengine reads a file that imports
# a package as a plain (not lazy-import) config only when it names `_base_` before that.
_base_ = []
custom_imports = dict(imports=['mmrepvgg'], allow_failed_imports=False)
from mmrepvgg.checkpoint import imagenet_checkpoint  # noqa: E402
from mmrepvgg.models import arch_channels  # noqa: E402

arch = 'A2'
repvgg_fpn = dict(
    backbone=dict(
        _delete_=True, type='mmrepvgg.RepVGG', arch=arch, out_indices=(0, 1, 2, 3),
        frozen_stages=1, norm_eval=True, norm_cfg=dict(type='BN', requires_grad=True),
        init_cfg=dict(type='Pretrained', checkpoint=imagenet_checkpoint(arch))),
    neck=dict(in_channels=list(arch_channels(arch))))
