# RepVGG-B1g2-fast: stride 1 in stages 3-4 but dilation only in the last 5 layers (the
# last 4 blocks of stage 3 and the block of stage 4), as in the paper.
_base_ = './pspnet_repvgg_b1g2_cityscapes.py'
model = dict(backbone=dict(num_dilated_blocks=(None, None, 4, 1)))
