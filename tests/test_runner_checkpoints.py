"""Every checkpoint tools/train.py's Runner writes loads with ``weights_only=True``.

A mini PSPNet (RepVGG-A0, 16-channel heads) trains on the mini Cityscapes data through
tools/train.py and leaves checkpoints from each point of a run: iteration 0 (saved
before the first iteration, with numpy values in its meta), mid-training, after
validation (CheckpointHook's save_best file), and one trained with EMAHook and --amp
(bfloat16 autocast on CPU). Each is loaded by plain ``torch.load`` (torch's default,
weights-only) after ``import mmrepvgg``, by tools/test.py, and by
``tools/train.py --resume CKPT``. The other things mmengine can put into a checkpoint
(every scheduler state, EMA variants, the AMP loss scaler) are covered on a toy Runner
in test_weights_only_loading.py.
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer
from mmengine.registry import HOOKS

from helpers import (DET_CONFIG, SEG_CONFIG, SEG_MODEL, TEST, TRAIN, fingerprint, log_text,
                     run_entry, working_dir)
from mmrepvgg import apis  # importing mmrepvgg first, as tools/test.py and train.py do
from mmrepvgg.apis.config import apply_amp, apply_mini
from mmrepvgg.engine.optim_wrapper import CPUAmpOptimWrapper
from mmrepvgg.errors import MMRepVGGError
# the mini PSPNet settings and the in-process runner of the tools' own tests

# Heads of 16 channels instead of 512: the checkpoint's contents are what matters here.
MODEL = SEG_MODEL + ['model.decode_head.channels=16', 'model.auxiliary_head.channels=16']
# Two iterations, a checkpoint after each, validation (and the best checkpoint) after 2.
TRAIN_VAL = ['train_cfg.max_iters=2', 'train_cfg.val_interval=2',
             'train_dataloader.batch_size=2', 'randomness.seed=0',
             'default_hooks.checkpoint.interval=1',
             'default_hooks.checkpoint.max_keep_ckpts=-1',
             'default_hooks.checkpoint.save_best=mIoU']

# What the iteration-0 hook puts into meta: numpy scalars and arrays (an empty one too,
# which protocol 2 writes with builtins.bytes).
NUMPY_META = dict(init_scale=np.float64(0.5), seen=np.int64(0), flag=np.bool_(True),
                  palette=np.arange(6, dtype=np.uint8).reshape(2, 3),
                  empty=np.zeros(0, np.float32))


@HOOKS.register_module(force=True)
class SaveInitialCheckpointHook(Hook):
    """Saves the weights training starts from, before the first iteration (and so
    before the first log line), with numpy values in the meta."""

    priority = 'LOWEST'  # after the CheckpointHook and EMAHook have set up

    def before_train(self, runner):
        runner.save_checkpoint(runner.work_dir, 'iter_0.pth', by_epoch=False,
                               meta=dict(epoch=0, iter=0, **NUMPY_META))


def _config(tmp_path, name, hooks):
    """SEG_CONFIG plus custom hooks, as a config file of its own."""
    path = tmp_path / f'{name}.py'
    path.write_text(f'_base_ = {SEG_CONFIG!r}\ncustom_hooks = {hooks!r}\n')
    return path


@pytest.fixture(scope='module')
def runs(mini_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp('runner_ckpts')
    # fp32, validated after iteration 2 with save_best
    plain = _config(folder, 'plain', [dict(type='SaveInitialCheckpointHook')])
    run_entry(apis.train, mini_root, plain, mini=True, work_dir=folder / 'plain',
              options=MODEL + TRAIN_VAL)
    # EMAHook and --amp: one iteration, no validation
    ema = _config(folder, 'ema_amp', [dict(type='EMAHook')])
    run_entry(apis.train, mini_root, ema, mini=True, amp=True, work_dir=folder / 'ema_amp',
              options=TRAIN + MODEL)
    return SimpleNamespace(root=mini_root, ema=ema, work=folder)


# name: (run, file, iteration it holds, further apis.train arguments for resuming)
CHECKPOINTS = {
    'iteration_0': ('plain', 'iter_0.pth', 0, {}),
    'mid_training': ('plain', 'iter_1.pth', 1, {}),
    'after_validation': ('plain', 'best_mIoU_iter_2.pth', 2, {}),
    'ema_amp': ('ema_amp', 'iter_1.pth', 1, dict(amp=True)),
}


def _checkpoint(runs, name):
    """The file, the config to test and resume it with, its iteration, resume arguments.
    The first run's checkpoints go on without the hook that saved iter_0.pth."""
    run, filename, iteration, resume_args = CHECKPOINTS[name]
    config = runs.ema if run == 'ema_amp' else SEG_CONFIG
    return runs.work / run / filename, config, iteration, resume_args


@pytest.mark.parametrize('name', sorted(CHECKPOINTS))
def test_plain_torch_load(runs, name):
    path, _, iteration, _ = _checkpoint(runs, name)
    ckpt = torch.load(str(path))  # torch's default: weights_only=True
    meta, hub = ckpt['meta'], ckpt['message_hub']
    assert meta['iter'] == iteration
    # mmseg's CityscapesDataset metainfo, as the Runner saves it
    assert meta['dataset_meta']['classes'][:2] == ('road', 'sidewalk')
    assert hub['runtime_info']['dataset_meta'] == meta['dataset_meta']
    scalars = hub['log_scalars']
    if name == 'iteration_0':
        assert not scalars  # nothing logged yet
        for key, value in NUMPY_META.items():
            assert type(meta[key]) is type(value) and np.array_equal(meta[key], value)
    else:
        loss = scalars['train/loss']
        assert isinstance(loss, HistoryBuffer) and len(loss.data[0]) == iteration
        assert np.isfinite(loss.mean())
    if name == 'after_validation':
        assert {'val/mIoU', 'val/aAcc'} <= set(scalars)
        assert isinstance(hub['runtime_info']['best_score'], np.floating)
    else:
        assert {'optimizer', 'param_schedulers'} <= set(ckpt)
    if name == 'ema_amp':
        assert int(ckpt['ema_state_dict']['steps']) == 1
        assert "type='mmrepvgg.CPUAmpOptimWrapper'" in meta['cfg']


@pytest.mark.parametrize('name', sorted(CHECKPOINTS))
def test_tools_test_loads_it(runs, name, tmp_path):
    path, config, _, _ = _checkpoint(runs, name)
    work = tmp_path / 'test'
    metrics = run_entry(apis.test, runs.root, config, path, mini=True, work_dir=work,
                        options=TEST + MODEL)
    assert {'aAcc', 'mIoU', 'mAcc'} <= set(metrics)
    assert f'Load checkpoint from {path}' in log_text(work)


@pytest.mark.parametrize('name', sorted(CHECKPOINTS))
def test_tools_train_resumes_from_it(runs, name, tmp_path):
    path, config, iteration, resume_args = _checkpoint(runs, name)
    before = fingerprint(path)
    work = tmp_path / 'resume'
    run_entry(apis.train, runs.root, config, mini=True, work_dir=work, resume=path,
              **resume_args, options=TRAIN + MODEL + [f'train_cfg.max_iters={iteration + 1}'])
    log = log_text(work)
    assert f'resumed epoch: 0, iter: {iteration}' in log
    # only the one remaining iteration ran, and its checkpoint loads too
    assert sorted(p.name for p in work.glob('iter_*.pth')) == [f'iter_{iteration + 1}.pth']
    ckpt = torch.load(str(work / f'iter_{iteration + 1}.pth'))
    assert ckpt['meta']['iter'] == iteration + 1
    if name == 'ema_amp':  # the average went on from the checkpoint's
        assert int(ckpt['ema_state_dict']['steps']) == iteration + 1
    assert fingerprint(path) == before  # the source is never touched


# ------------------------------------------------------------------- dataset_meta of mmdet
def test_mmdet_dataset_meta_loads(mini_root, tmp_path):
    """meta['dataset_meta'] of the mini COCO dataset as built for training, and the class
    metainfo of every dataset mmdet and mmseg register."""
    from mmdet.registry import DATASETS as DET_DATASETS
    from mmseg.registry import DATASETS as SEG_DATASETS
    cfg = Config.fromfile(DET_CONFIG)
    apply_mini(cfg)
    with working_dir(mini_root):  # the metainfo is all that is used: no pipeline
        coco = DET_DATASETS.build(dict(cfg.train_dataloader.dataset, pipeline=[]))
    metas = {'mini_coco': coco.metainfo}
    for registry in (DET_DATASETS, SEG_DATASETS):
        registry.import_from_location()  # every dataset module, not just those used so far
        for key, cls in registry.module_dict.items():
            if isinstance(getattr(cls, 'METAINFO', None), dict):
                metas[f'{registry.scope}.{key}'] = cls.METAINFO
    assert {'mmdet.CocoDataset', 'mmdet.VOCDataset', 'mmdet.LVISV1Dataset',
            'mmseg.CityscapesDataset', 'mmseg.ADE20KDataset'} <= set(metas)
    path = tmp_path / 'dataset_meta.pth'
    torch.save({name: dict(dataset_meta=meta) for name, meta in metas.items()}, path)
    loaded = torch.load(str(path))
    assert loaded.keys() == metas.keys()
    for name, meta in metas.items():
        assert loaded[name]['dataset_meta'] == meta, name
    assert loaded['mini_coco']['dataset_meta']['classes'][0] == 'person'


# -------------------------------------------------------------------------- --amp on CPU
def test_cpu_amp_wrapper_runs_forward_in_bfloat16():
    conv = torch.nn.Conv2d(3, 4, 3)
    wrapper = CPUAmpOptimWrapper(optimizer=torch.optim.SGD(conv.parameters(), lr=0.1))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with wrapper.optim_context(conv):
        assert torch.is_autocast_enabled('cpu')
        out = conv(x)
    assert out.dtype == torch.bfloat16  # the conv ran in bfloat16
    assert not torch.is_autocast_enabled('cpu')  # and only inside the context
    wrapper.backward(out.float().square().mean())
    # weights and their gradients stay float32 (autocast casts copies)
    assert all(p.dtype == p.grad.dtype == torch.float32 for p in conv.parameters())
    assert 'loss_scaler' not in wrapper.state_dict()  # bfloat16 needs no loss scale


def test_amp_config_preparation_on_cpu_and_cuda(monkeypatch):
    import mmengine.device
    from mmengine.optim import AmpOptimWrapper

    def prepared(device, optim):
        monkeypatch.setattr(mmengine.device, 'get_device', lambda: device)
        return apply_amp(Config(dict(optim_wrapper=optim))).optim_wrapper

    sgd = dict(type='SGD', lr=0.01)
    # CUDA: mmengine's AmpOptimWrapper, float16 with a dynamic loss scale
    cuda = prepared('cuda', dict(optimizer=sgd, clip_grad=dict(max_norm=1)))
    assert cuda.type == 'AmpOptimWrapper' and cuda.loss_scale == 'dynamic'
    assert cuda.clip_grad == dict(max_norm=1) and cuda.optimizer == sgd
    kept = dict(type='AmpOptimWrapper', loss_scale=512.0, optimizer=sgd)
    assert prepared('cuda', dict(kept)).to_dict() == kept
    assert prepared('cuda', dict(kept, type=AmpOptimWrapper)).type is AmpOptimWrapper
    assert prepared('cuda', dict(type='mmengine.OptimWrapper', optimizer=sgd)).type == \
        'AmpOptimWrapper'
    # CPU: bfloat16 autocast in CPUAmpOptimWrapper, no loss scale
    cpu = prepared('cpu', dict(type='OptimWrapper', optimizer=sgd))
    assert cpu.to_dict() == dict(type='mmrepvgg.CPUAmpOptimWrapper', optimizer=sgd)
    assert (prepared('cpu', dict(kept)).to_dict()
            == dict(type='mmrepvgg.CPUAmpOptimWrapper', optimizer=sgd))
    own = dict(type='mmrepvgg.CPUAmpOptimWrapper', optimizer=sgd)
    assert prepared('cpu', dict(own)).to_dict() == own
    # anything else is refused with the type named and what is allowed
    for device, optim, expected in [
            ('cuda', dict(type='ApexOptimWrapper', optimizer=sgd), "not 'ApexOptimWrapper'"),
            ('cuda', dict(own), "not 'mmrepvgg.CPUAmpOptimWrapper'"),
            ('cpu', dict(type='ApexOptimWrapper', optimizer=sgd), 'OptimWrapper or '
             'AmpOptimWrapper'),
            ('cpu', dict(kept, dtype='float16'), "dtype='float16'"),
            ('cpu', dict(type='NoSuchWrapper', optimizer=sgd), "not 'NoSuchWrapper'")]:
        with pytest.raises(MMRepVGGError, match=expected):
            prepared(device, optim)
    with pytest.raises(MMRepVGGError, match='this machine runs on mps'):
        prepared('mps', dict(optimizer=sgd))
