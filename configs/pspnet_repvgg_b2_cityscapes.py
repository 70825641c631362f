# PSPNet with RepVGG-B2 at output stride 8, from the ImageNet weights OpenMMLab hosts
# (78.58 top-1; the paper's file: 78.78), as in the B1g2 config.
_base_ = './pspnet_repvgg_b1g2_cityscapes.py'
from mmrepvgg.checkpoint import imagenet_checkpoint  # noqa: E402
from mmrepvgg.models import arch_channels  # noqa: E402

arch = 'B2'
channels = arch_channels(arch)
model = dict(
    backbone=dict(arch=arch, init_cfg=dict(checkpoint=imagenet_checkpoint(arch))),
    decode_head=dict(in_channels=channels[3]),
    auxiliary_head=dict(in_channels=channels[2]))
