# Baseline: PSPNet ResNet-50-D8 (ImageNet-pretrained, mmseg's) on the paper's recipe.
_base_ = './_base_/pspnet_r50-d8_paper-recipe_cityscapes.py'
