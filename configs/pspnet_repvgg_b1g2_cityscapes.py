# PSPNet with RepVGG-B1g2 at output stride 8 (dilation 2 in stage 3, 4 in stage 4),
# initialised from the ImageNet weights OpenMMLab hosts for mmpretrain (77.87 top-1; the
# paper's file: 77.78), downloaded and cached on first use. The official release file
# instead: --cfg-options model.backbone.init_cfg.checkpoint=checkpoints/RepVGG-B1g2-train.pth
_base_ = './_base_/pspnet_r50-d8_paper-recipe_cityscapes.py'
from mmrepvgg.checkpoint import imagenet_checkpoint  # noqa: E402
from mmrepvgg.models import arch_channels  # noqa: E402

arch = 'B1g2'
channels = arch_channels(arch)
model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True, type='mmrepvgg.RepVGG', arch=arch, out_indices=(0, 1, 2, 3),
        strides=(2, 2, 1, 1), dilations=(1, 1, 2, 4),
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        init_cfg=dict(type='Pretrained', checkpoint=imagenet_checkpoint(arch))),
    decode_head=dict(in_channels=channels[3]),
    auxiliary_head=dict(in_channels=channels[2]))
