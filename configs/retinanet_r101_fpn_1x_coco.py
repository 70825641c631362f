# Baseline: mmdet's retinanet r101 FPN 1x, unchanged (ImageNet-pretrained torchvision weights).
_base_ = 'mmdet::retinanet/retinanet_r101_fpn_1x_coco.py'
