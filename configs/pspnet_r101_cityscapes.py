# Baseline: PSPNet ResNet-101-D8 (ImageNet-pretrained, mmseg's) on the paper's recipe.
_base_ = './_base_/pspnet_r50-d8_paper-recipe_cityscapes.py'
model = dict(pretrained='open-mmlab://resnet101_v1c', backbone=dict(depth=101))
