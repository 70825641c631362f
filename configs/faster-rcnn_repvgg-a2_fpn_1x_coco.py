# Faster R-CNN FPN 1x with RepVGG-A2, the counterpart of ResNet-50 (5.12 vs 4.11 GMACs
# at 224x224, 76.48 vs 76.31 ImageNet top-1; see README). Same schedule and data as
# mmdet's R-50 config; only the backbone and the FPN input channels differ
# (./_base_/repvgg-a2_fpn.py, which also says which ImageNet weights it starts from).
_base_ = ['mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', './_base_/repvgg-a2_fpn.py']
model = _base_.repvgg_fpn
