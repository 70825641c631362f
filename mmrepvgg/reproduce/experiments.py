"""The bundled experiments: which configs each suite runs, which RepVGG row is compared
with which ResNet row, and the published numbers a reproduction is held against."""
import os.path as osp
from typing import Dict, List, NamedTuple, Optional, Sequence

from ..apis.config import bundled_folder
from ..errors import UsageError


CITYSCAPES = ('pspnet_r50_cityscapes', 'pspnet_r101_cityscapes',
              'pspnet_repvgg_b1g2_cityscapes', 'pspnet_repvgg_b1g2-fast_cityscapes',
              'pspnet_repvgg_b2_cityscapes')
COCO = ('faster-rcnn_r50_fpn_1x_coco', 'faster-rcnn_repvgg-a2_fpn_1x_coco',
        'faster-rcnn_r101_fpn_1x_coco', 'faster-rcnn_repvgg-b1g4_fpn_1x_coco',
        'retinanet_r50_fpn_1x_coco', 'retinanet_repvgg-a2_fpn_1x_coco',
        'retinanet_r101_fpn_1x_coco', 'retinanet_repvgg-b1g4_fpn_1x_coco')
#: Config stems per suite. ``smoke``: one RepVGG config of each task, run for a few
#: iterations (:data:`SMOKE_OPTIONS`), to check a new machine end to end.
SUITES: Dict[str, Sequence[str]] = {
    'cityscapes': CITYSCAPES, 'coco': COCO, 'paper': CITYSCAPES + COCO,
    'smoke': ('pspnet_repvgg_b1g2_cityscapes', 'retinanet_repvgg-a2_fpn_1x_coco')}
#: What ``--suite smoke`` adds to every experiment's options: two training iterations
#: with a checkpoint after each (so an interrupted run has something to resume from),
#: no validation during training.
SMOKE_ITERS = 2
SMOKE_OPTIONS = (f'train_cfg.max_iters={SMOKE_ITERS}', f'train_cfg.val_interval={SMOKE_ITERS}',
                 'default_hooks.checkpoint.interval=1', 'default_hooks.checkpoint.max_keep_ckpts=3',
                 'default_hooks.logger.interval=1')


class Reference(NamedTuple):
    """A published number for one config: ``metric`` as the config's evaluator names it,
    ``value`` in the unit it was published in (``scale`` times the evaluator's value)."""
    metric: str
    value: Optional[float]
    scale: float
    source: str


_PAPER = 'RepVGG paper, PSPNet on Cityscapes val'
_ZOO = "mmdet model zoo, 1x schedule"
_NO_PAPER = 'none published (the paper gives B1g2-fast)'
_NO_DET = 'none published: the paper reports no COCO result'
#: The numbers each bundled experiment should reproduce. Cityscapes: the paper's mIoU
#: (its ResNets trained with its own recipe, which the bundled configs follow). COCO:
#: mmdet's model-zoo box AP for the ResNet detectors (the config's own recipe).
REFERENCES: Dict[str, Reference] = {
    'pspnet_r50_cityscapes': Reference('mIoU', 77.17, 1, _PAPER),
    'pspnet_r101_cityscapes': Reference('mIoU', 78.51, 1, _PAPER),
    'pspnet_repvgg_b1g2_cityscapes': Reference('mIoU', None, 1, _NO_PAPER),
    'pspnet_repvgg_b1g2-fast_cityscapes': Reference('mIoU', 78.88, 1, _PAPER),
    'pspnet_repvgg_b2_cityscapes': Reference('mIoU', 80.57, 1, _PAPER),
    'faster-rcnn_r50_fpn_1x_coco': Reference('coco/bbox_mAP', 37.4, 100, _ZOO),
    'faster-rcnn_r101_fpn_1x_coco': Reference('coco/bbox_mAP', 39.4, 100, _ZOO),
    'retinanet_r50_fpn_1x_coco': Reference('coco/bbox_mAP', 36.5, 100, _ZOO),
    'retinanet_r101_fpn_1x_coco': Reference('coco/bbox_mAP', 38.5, 100, _ZOO),
    'faster-rcnn_repvgg-a2_fpn_1x_coco': Reference('coco/bbox_mAP', None, 100, _NO_DET),
    'faster-rcnn_repvgg-b1g4_fpn_1x_coco': Reference('coco/bbox_mAP', None, 100, _NO_DET),
    'retinanet_repvgg-a2_fpn_1x_coco': Reference('coco/bbox_mAP', None, 100, _NO_DET),
    'retinanet_repvgg-b1g4_fpn_1x_coco': Reference('coco/bbox_mAP', None, 100, _NO_DET),
}
#: Each RepVGG experiment's ResNet counterpart: the ResNet it matches or beats in
#: ImageNet top-1 at similar cost (the paper sets B1g2-fast and B2 against ResNet-101).
PAIRS: Dict[str, str] = {
    'pspnet_repvgg_b1g2_cityscapes': 'pspnet_r101_cityscapes',
    'pspnet_repvgg_b1g2-fast_cityscapes': 'pspnet_r101_cityscapes',
    'pspnet_repvgg_b2_cityscapes': 'pspnet_r101_cityscapes',
    'faster-rcnn_repvgg-a2_fpn_1x_coco': 'faster-rcnn_r50_fpn_1x_coco',
    'faster-rcnn_repvgg-b1g4_fpn_1x_coco': 'faster-rcnn_r101_fpn_1x_coco',
    'retinanet_repvgg-a2_fpn_1x_coco': 'retinanet_r50_fpn_1x_coco',
    'retinanet_repvgg-b1g4_fpn_1x_coco': 'retinanet_r101_fpn_1x_coco',
}
#: The metric each task's table shows when no reference names one, and its scale.
TASK_METRICS = {'mmseg': ('mIoU', 1), 'mmdet': ('coco/bbox_mAP', 100)}
#: OpenMMLab's own benchmark lists accept this difference from the expected metric.
DEFAULT_TOLERANCE = 0.5


def config_stem(config: str) -> str:
    return osp.splitext(osp.basename(config))[0]


def suite_configs(suite: str) -> List[str]:
    """The config files of ``suite``, those the package carries (``.mim/configs`` of an
    installed package, the repository's ``configs/`` in a checkout); an unknown suite
    lists the known ones."""
    if suite not in SUITES:
        raise UsageError(f'unknown suite {suite!r}; valid: {", ".join(SUITES)}')
    folder = bundled_folder('configs')
    return [osp.join(folder, stem + '.py') for stem in SUITES[suite]]


def reference_for(stem: str, scope: str) -> Reference:
    """The published number for a config (by file stem); a config of the user's own has
    none, and is shown with its task's metric."""
    if stem in REFERENCES:
        return REFERENCES[stem]
    metric, scale = TASK_METRICS.get(scope, ('', 1))
    return Reference(metric, None, scale, 'none: not a bundled experiment')
