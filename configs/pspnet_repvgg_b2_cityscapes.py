# PSPNet with RepVGG-B2 at output stride 8, from the official ImageNet release file.
_base_ = './pspnet_repvgg_b1g2_cityscapes.py'
from mmrepvgg.models import arch_channels  # noqa: E402

arch = 'B2'
channels = arch_channels(arch)
model = dict(
    backbone=dict(arch=arch, init_cfg=dict(checkpoint=f'checkpoints/RepVGG-{arch}-train.pth')),
    decode_head=dict(in_channels=channels[3]),
    auxiliary_head=dict(in_channels=channels[2]))
