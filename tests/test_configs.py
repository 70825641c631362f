"""Every bundled config builds, trains one iteration and tests with --deploy on the
mini data (mmrepvgg.testing) at small resolution, as tools/train.py and tools/test.py
run them (mmrepvgg.apis); every RepVGG one is then exported to ONNX (checked against
torch in ONNX Runtime) and scores the same in OpenVINO."""
import glob
import os.path as osp

import pytest
from mmengine.config import Config

from helpers import parse_options as _options
from mmrepvgg import apis
from mmrepvgg.apis.config import load_config, resolve_config
from mmrepvgg.apis.deploy import export
from mmrepvgg.errors import InputError

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIGS = sorted(glob.glob(osp.join(ROOT, 'configs', '*.py')))
SEG = [c for c in CONFIGS if osp.basename(c).startswith('pspnet')]
DET = [c for c in CONFIGS if c not in SEG]
# Small enough for 2 CI cores: 64x64 crops and 128x64 test images, one of each.
SMALL = {
    'seg': ['train_dataloader.batch_size=2', 'crop_size=(64,64)',
            'train_dataloader.dataset.pipeline.3.crop_size=(64,64)',
            'model.data_preprocessor.size=(64,64)',
            'test_dataloader.dataset.pipeline.1.scale=(128,64)'],
    'det': ['train_dataloader.batch_size=1',
            'train_dataloader.dataset.pipeline.2.scale=(128,96)',
            'test_dataloader.dataset.pipeline.1.scale=(128,96)'],
}


def test_expected_configs_are_bundled():
    names = {osp.basename(c) for c in CONFIGS}
    assert 'pspnet_repvgg_b1g2_cityscapes.py' in names
    assert len(SEG) == 5 and len(DET) == 8, names


def test_configs_are_named_by_package_as_mmengine_names_them():
    """``mmrepvgg::repvgg/<name>.py`` is a bundled config (from the checkout here: the
    installed wheel is tests/test_packaging.py's), ``mmdet::``/``mmseg::`` theirs; the
    tools take either, and say what is wrong with a name they cannot serve."""
    name = 'pspnet_repvgg_b1g2_cityscapes.py'
    assert osp.realpath(resolve_config(f'mmrepvgg::repvgg/{name}')) == \
        osp.join(ROOT, 'configs', name)
    base = '_base_/pspnet_r50-d8_paper-recipe_cityscapes.py'
    assert osp.realpath(resolve_config(f'mmrepvgg::repvgg/{base}')) == \
        osp.join(ROOT, 'configs', base)
    cfg = load_config(f'mmrepvgg::repvgg/{name}')
    assert cfg.model.backbone.arch == 'B1g2'
    assert cfg.work_dir == osp.join('./work_dirs', 'pspnet_repvgg_b1g2_cityscapes')
    mmdet = resolve_config('mmdet::retinanet/retinanet_r50_fpn_1x_coco.py')
    assert mmdet.endswith(osp.join('mmdet', '.mim', 'configs', 'retinanet',
                                   'retinanet_r50_fpn_1x_coco.py'))
    assert resolve_config(SEG[0]) == SEG[0]  # a file is itself
    with pytest.raises(InputError, match=r'mmrepvgg::configs/x\.py: the configs of mmrepvgg '
                       r'are named mmrepvgg::repvgg/<name>\.py, e\.g\. mmrepvgg::repvgg/'):
        resolve_config('mmrepvgg::configs/x.py')
    with pytest.raises(InputError, match=r'config file not found: mmrepvgg::repvgg/nope\.py '
                       r'\(.*nope\.py\)'):
        resolve_config('mmrepvgg::repvgg/nope.py')
    with pytest.raises(InputError, match=r"mmengine serves pkg:: configs of .*mmdet.*, not "
                       r"'mmfoo'"):
        resolve_config('mmfoo::x/y.py')


@pytest.mark.parametrize('config', CONFIGS, ids=osp.basename)
def test_config_inherits_mmlab_and_reads_channel_table(config):
    cfg = Config.fromfile(config)
    backbone = cfg.model.backbone
    if backbone.type != 'mmrepvgg.RepVGG':
        return
    from mmrepvgg.models import arch_channels
    channels = arch_channels(backbone.arch)
    if osp.basename(config).startswith('pspnet'):
        assert cfg.model.decode_head.in_channels == channels[3]
        assert cfg.model.auxiliary_head.in_channels == channels[2]
        assert backbone.strides == (2, 2, 1, 1) and backbone.dilations == (1, 1, 2, 4)
    else:
        assert list(cfg.model.neck.in_channels) == list(channels)
    # the ImageNet weights OpenMMLab hosts for that arch (downloaded on first use)
    from mmrepvgg.checkpoint import imagenet_checkpoint
    assert backbone.init_cfg.checkpoint == imagenet_checkpoint(backbone.arch)
    assert backbone.init_cfg.checkpoint.startswith('https://download.openmmlab.com/')


@pytest.mark.parametrize('config', CONFIGS, ids=osp.basename)
def test_config_trains_a_step_and_tests_deployed(config, mini_root, tmp_path, monkeypatch):
    monkeypatch.chdir(mini_root)
    work = str(tmp_path / 'work')
    small = SMALL['seg' if config in SEG else 'det']
    if config in DET:  # a 1-step detector scores below the default threshold: keep all
        rcnn = '' if 'retinanet' in osp.basename(config) else 'rcnn.'
        small = small + [f'model.test_cfg.{rcnn}score_thr=0.0',
                         f'model.test_cfg.{rcnn}max_per_img=20']
    options = ['train_cfg.max_iters=1', 'default_hooks.checkpoint.interval=1',
               'train_cfg.val_interval=100', 'test_dataloader.dataset.indices=1'] + small
    apis.train(config, work_dir=work, cfg_options=_options(options), mini=True)
    checkpoint = osp.join(work, 'iter_1.pth')
    assert osp.isfile(checkpoint)
    metrics = apis.test(config, checkpoint, deploy=True, work_dir=work,
                        cfg_options=_options(options), mini=True)
    expected = 'mIoU' if config in SEG else 'coco/bbox_mAP'
    assert expected in metrics, metrics
    if Config.fromfile(config).model.backbone.type == 'mmrepvgg.RepVGG':
        assert_backends_score_as_deploy(config, checkpoint, metrics, work, options)


# The scores agree in practice (tests/test_deploy.py compares the label maps and boxes
# themselves, which is where exactness is checked). The slack is for a pixel or box whose
# two best scores tie within fp32 rounding (outputs agree to ~1e-6 relative, checked by
# the export) and flip: one pixel of this 64x128 image is 0.012 points of aAcc; COCO
# metrics are printed to 0.001.
METRIC_TOLERANCE = {'seg': 0.05, 'det': 0.001}


def assert_backends_score_as_deploy(config, checkpoint, reference, work, options):
    """The exported network (its shape from the test pipeline, dynamic for detectors)
    matches the fused torch model in ONNX Runtime (the export's own parity check, on a
    probe) and scores as it in OpenVINO. (tests/test_deploy.py scores both backends on
    a segmentor and both detector kinds.)"""
    onnx_file = osp.join(work, 'model.onnx')
    report = export(config, checkpoint, onnx_file, dynamic=config not in SEG,
                    cfg_options=_options(options), mini=True)
    assert report['parity']['within'], report['parity']
    tolerance = METRIC_TOLERANCE['seg' if config in SEG else 'det']
    for backend in ('openvino',):
        metrics = apis.test(config, onnx_file, backend=backend, work_dir=work,
                            cfg_options=_options(options), mini=True)
        print(f'\n{osp.basename(config)}: torch --deploy {reference}; {backend} {metrics}')
        assert metrics.keys() == reference.keys()
        for key, value in reference.items():
            assert abs(float(metrics[key]) - float(value)) <= tolerance, (backend, key)
