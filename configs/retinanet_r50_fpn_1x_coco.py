# Baseline: mmdet's retinanet r50 FPN 1x, unchanged (ImageNet-pretrained torchvision weights).
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'
