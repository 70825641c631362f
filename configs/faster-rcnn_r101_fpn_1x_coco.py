# Baseline: mmdet's faster-rcnn r101 FPN 1x, unchanged (ImageNet-pretrained torchvision weights).
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r101_fpn_1x_coco.py'
