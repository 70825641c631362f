# RetinaNet FPN 1x with RepVGG-A2, the counterpart of ResNet-50 (see the Faster R-CNN
# config and README for the pairing). Only the backbone and FPN input channels differ
# (./_base_/repvgg-a2_fpn.py, which also says which ImageNet weights it starts from).
_base_ = ['mmdet::retinanet/retinanet_r50_fpn_1x_coco.py', './_base_/repvgg-a2_fpn.py']
model = _base_.repvgg_fpn
