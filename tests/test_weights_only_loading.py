"""Runner checkpoints load under torch's default ``weights_only=True``.

One real mmengine Runner trains a toy model for 2 iterations on CPU, validating
after each with a metric that returns numpy float32 (as mmseg's IoUMetric does)
and CheckpointHook(save_best=...), so the last checkpoint carries everything a
real one does: message hub (HistoryBuffers, numpy scalars, 'best_score'),
optimizer and scheduler states. Every test reuses a copy of that file.

The tests after it train the same toy Runner with what else mmengine writes into
a checkpoint: an empty HistoryBuffer, every kind of param-scheduler state, the
EMA variants, AmpOptimWrapper's loss-scaler state and numpy values in meta; each
file loads weights-only and resumes.
"""
import argparse
import contextlib
import functools
import io
import pickle
import pickletools
import zipfile

import numpy as np
import pytest
import torch
import torch.nn as nn
from mmdet.models.layers import ExpMomentumEMA
from mmengine.evaluator import BaseMetric, Evaluator
from mmengine.logging import HistoryBuffer, MessageHub
from mmengine.model import BaseModel
from mmengine.optim import OneCycleParamScheduler
from mmengine.registry import MODELS
from mmengine.runner import Runner, load_checkpoint

from mmrepvgg import load_file
from mmrepvgg.checkpoint import loading
from mmrepvgg.checkpoint.loading import allow_mmengine_checkpoint_types


@MODELS.register_module(name='WeightsOnlyToyModel', force=True)
class WeightsOnlyToyModel(BaseModel):

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)
        self.bn = nn.BatchNorm1d(1)

    def forward(self, inputs, labels=None, mode='tensor'):
        out = self.bn(self.linear(inputs))
        if mode == 'loss':
            return dict(loss=(out - labels).pow(2).mean())
        if mode == 'predict':
            return [dict(err=float((o - t).abs().item())) for o, t in zip(out, labels)]
        return out


class ToyDataset(torch.utils.data.Dataset):

    def __len__(self):
        return 4

    def __getitem__(self, idx):
        gen = torch.Generator().manual_seed(idx)
        return dict(inputs=torch.randn(2, generator=gen), labels=torch.randn(1, generator=gen))


class ToyMetric(BaseMetric):
    """Returns np.float32 like mmseg's mIoU, so 'best_score' is a numpy scalar."""

    def process(self, data_batch, data_samples):
        self.results.extend(d['err'] for d in data_samples)

    def compute_metrics(self, results):
        return dict(acc=np.float32(1.0 / (1.0 + np.mean(results))))


def _loader():
    return dict(dataset=ToyDataset(), sampler=dict(type='DefaultSampler', shuffle=False),
                batch_size=2, collate_fn=dict(type='default_collate'))


def make_runner(work_dir, name, max_iters=2, **kwargs):
    """The toy Runner; keyword arguments replace its settings (optim_wrapper, ...)."""
    settings = dict(
        model=dict(type='WeightsOnlyToyModel'),
        work_dir=str(work_dir),
        experiment_name=name,
        train_dataloader=_loader(),
        val_dataloader=_loader(),
        val_evaluator=Evaluator(ToyMetric()),
        val_cfg=dict(),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01, momentum=0.9)),
        param_scheduler=dict(type='LinearLR', start_factor=0.5, by_epoch=False,
                             begin=0, end=max_iters),
        train_cfg=dict(by_epoch=False, max_iters=max_iters, val_interval=1),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1, by_epoch=False,
                                           save_best='acc', rule='greater')),
        default_scope=None,
        randomness=dict(seed=0))
    settings.update(kwargs)
    return Runner(**settings)


@pytest.fixture(scope='module')
def runner_ckpt(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp('loading_runner')
    make_runner(work_dir, 'loading_train').train()
    last = work_dir / 'iter_2.pth'
    assert last.is_file(), sorted(p.name for p in work_dir.iterdir())
    # A copy: resuming lets CheckpointHook delete the 'best_ckpt' it recorded.
    kept = work_dir.parent / 'runner_iter_2.pth'
    kept.write_bytes(last.read_bytes())
    return kept


def test_allowance_is_idempotent_and_narrow():
    allow_mmengine_checkpoint_types()
    before = set(torch.serialization.get_safe_globals())
    allow_mmengine_checkpoint_types()
    after = set(torch.serialization.get_safe_globals())
    assert before == after
    ours = loading.mmengine_checkpoint_safe_globals()
    assert set(ours) <= after
    names = {g[1] for g in ours if isinstance(g, tuple)}
    assert {'numpy.core.multiarray.scalar', 'numpy._core.multiarray.scalar',
            'numpy.core.multiarray._reconstruct', 'numpy._core.multiarray._reconstruct',
            'builtins.getattr'} == names
    # the real getattr is never allowlisted, only the restricted stand-in
    assert getattr not in after and all(not (isinstance(g, tuple) and g[0] is getattr)
                                        for g in after)
    # every other entry is a class, and the only builtin one is bytes (data only)
    classes = [g for g in ours if not isinstance(g, tuple)]
    assert all(isinstance(g, type) for g in classes)
    assert {g for g in classes if g.__module__ == 'builtins'} == {bytes}


def globals_in(path):
    """The GLOBAL names in a torch zip checkpoint's pickle, without loading it."""
    with zipfile.ZipFile(path) as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith('data.pkl')))
    return {arg.replace(' ', '.').replace('__builtin__.', 'builtins.')
            for op, arg, _ in pickletools.genops(data) if op.name == 'GLOBAL'}


def test_runner_checkpoint_needs_the_allowance(runner_ckpt):
    # Guards the test itself: the file really holds globals weights_only refuses.
    found = globals_in(runner_ckpt)
    assert {'mmengine.logging.history_buffer.HistoryBuffer', 'numpy.dtype',
            'numpy.ndarray', 'builtins.getattr'} <= found
    assert {'scalar', '_reconstruct'} <= {n.rsplit('.', 1)[1] for n in found
                                          if '.multiarray.' in n}


def test_plain_torch_load_after_allowance(runner_ckpt):
    allow_mmengine_checkpoint_types()
    ckpt = torch.load(str(runner_ckpt))  # torch's default: weights_only=True
    assert {'meta', 'state_dict', 'message_hub', 'optimizer', 'param_schedulers'} <= set(ckpt)
    hub = ckpt['message_hub']
    loss = hub['log_scalars']['train/loss']
    assert isinstance(loss, HistoryBuffer) and np.isfinite(loss.mean())
    assert loss.statistics('current') == loss.current()
    best = hub['runtime_info']['best_score']
    assert isinstance(best, np.float32)
    assert isinstance(hub['runtime_info']['eta'], np.floating)
    assert load_file(runner_ckpt)['meta']['iter'] == 2


def test_mmengine_load_checkpoint(runner_ckpt):
    allow_mmengine_checkpoint_types()  # what `import mmrepvgg` does
    ckpt = load_file(runner_ckpt)
    model = WeightsOnlyToyModel()
    load_checkpoint(model, str(runner_ckpt), map_location='cpu', strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, ckpt['state_dict'][key])


def test_runner_resumes_from_it(runner_ckpt, tmp_path):
    allow_mmengine_checkpoint_types()  # what `import mmrepvgg` does
    runner = make_runner(tmp_path, 'loading_resume', max_iters=3,
                         load_from=str(runner_ckpt), resume=True)
    runner.train()
    assert runner.iter == 3
    # resumed, not restarted: the message hub (best score) came back
    assert isinstance(runner.message_hub.get_info('best_score'), np.floating)
    # only iteration 3 ran here: a restart from 0 would also have saved iter_1/2
    assert sorted(p.name for p in tmp_path.glob('iter_*.pth')) == ['iter_3.pth']
    assert load_file(tmp_path / 'iter_3.pth')['meta']['iter'] == 3


def _rewrite_pickle(src, dst, old, new):
    """Copy a torch zip checkpoint, replacing bytes inside its data.pkl."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, 'w', zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith('data.pkl'):
                assert old in data
                data = data.replace(old, new)
            zout.writestr(item, data)


def test_checkpoint_from_the_other_numpy_major(runner_ckpt, tmp_path):
    # A file written under numpy 1.x names numpy.core.multiarray, one written
    # under numpy 2.x numpy._core.multiarray; both must load with either numpy.
    here = b'cnumpy._core.multiarray\n' if int(np.__version__[0]) >= 2 else \
        b'cnumpy.core.multiarray\n'
    other = b'cnumpy.core.multiarray\n' if here.startswith(b'cnumpy._') else \
        b'cnumpy._core.multiarray\n'
    moved = tmp_path / 'other_numpy.pth'
    _rewrite_pickle(runner_ckpt, moved, here, other)
    prefix = other[1:-1].decode()
    assert {prefix + '.scalar', prefix + '._reconstruct'} <= globals_in(moved)
    allow_mmengine_checkpoint_types()
    ckpt = torch.load(str(moved))
    assert isinstance(ckpt['message_hub']['runtime_info']['best_score'], np.float32)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        load_file(tmp_path / 'missing.pth')


@pytest.mark.parametrize('kind', ['truncated', 'garbage', 'empty', 'text'])
def test_corrupt_file_is_a_clear_error(runner_ckpt, tmp_path, kind):
    path = tmp_path / f'{kind}.pth'
    payload = {
        'truncated': runner_ckpt.read_bytes()[:2000],
        'garbage': bytes(range(256)) * 8,
        'empty': b'',
        'text': b'this is not a checkpoint\n' * 4,
    }[kind]
    path.write_bytes(payload)
    with pytest.raises(ValueError) as err:
        load_file(path)
    msg = str(err.value)
    assert str(path) in msg and 'not a valid PyTorch checkpoint' in msg
    assert 'weights_only=False' not in msg


def test_unlisted_global_is_refused_and_named(tmp_path):
    path = tmp_path / 'foreign.pth'
    torch.save({'args': argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(ValueError) as err:
        load_file(path)
    msg = str(err.value)
    assert 'argparse.Namespace' in msg and 'untrusted' in msg and str(path) in msg


class _SneakyGetattr:
    """Pickles as getattr(HistoryBuffer, '__init__'): not a statistics method."""

    def __reduce__(self):
        return getattr, (HistoryBuffer, '__init__')


def test_getattr_is_restricted_to_listed_class_functions(tmp_path):
    path = tmp_path / 'sneaky.pth'
    torch.save({'x': _SneakyGetattr()}, path)
    with pytest.raises(ValueError, match='untrusted'):
        load_file(path)
    for obj, name in [(HistoryBuffer, '__init__'), (torch, 'load'),
                      (OneCycleParamScheduler, 'step'), (HistoryBuffer(), 'mean'),
                      ([HistoryBuffer], 'mean')]:
        with pytest.raises(pickle.UnpicklingError, match='refusing getattr'):
            loading._restricted_getattr(obj, name)
    assert loading._restricted_getattr(HistoryBuffer, 'mean') is HistoryBuffer.mean
    assert (loading._restricted_getattr(OneCycleParamScheduler, '_annealing_cos')
            is OneCycleParamScheduler._annealing_cos)


# ------------------------------------------------- what else a Runner checkpoint may hold
def _pickle_ops(obj):
    """(opcode, argument) pairs of ``obj`` pickled the way torch.save does, without
    the memo bookkeeping (BINPUT, ...)."""
    buf = io.BytesIO()
    pickle.Pickler(buf, protocol=torch.serialization.DEFAULT_PROTOCOL).dump(obj)
    return [(op.name, arg) for op, arg, _ in pickletools.genops(buf.getvalue())
            if not op.name.endswith('PUT')]


@contextlib.contextmanager
def _allowlist_without(entry):
    """The allowance minus ``entry``; the full allowlist comes back afterwards."""
    before = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    torch.serialization.add_safe_globals(
        [g for g in loading.mmengine_checkpoint_safe_globals() if g is not entry])
    try:
        yield
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)
        allow_mmengine_checkpoint_types()


def test_empty_history_buffer_needs_bytes(tmp_path):
    # A buffer with no values yet holds empty arrays, whose raw data protocol 2
    # writes as bytes() (GLOBAL __builtin__ bytes, EMPTY_TUPLE, REDUCE).
    hub = MessageHub('loading_empty_buffer', log_scalars={'train/loss': HistoryBuffer()},
                     resumed_keys={'train/loss': True})
    ops = _pickle_ops(hub.state_dict())
    at = ops.index(('GLOBAL', '__builtin__ bytes'))
    assert [name for name, _ in ops[at + 1:at + 3]] == ['EMPTY_TUPLE', 'REDUCE']
    path = tmp_path / 'empty_buffer.pth'
    torch.save({'message_hub': hub.state_dict()}, path)
    with _allowlist_without(bytes), pytest.raises(pickle.UnpicklingError,
                                                  match='GLOBAL bytes was not an allowed'):
        torch.load(str(path))
    buf = torch.load(str(path))['message_hub']['log_scalars']['train/loss']
    assert isinstance(buf, HistoryBuffer) and buf.data[0].size == 0
    buf.update(2.0)  # a working buffer, not just a look-alike
    assert buf.current() == 2.0


# one schedule per kind of state: a Counter (milestones), a function (OneCycle's
# anneal_func), lists of periods, and ReduceOnPlateau's bookkeeping
SCHEDULERS = {
    'MultiStepLR': dict(type='MultiStepLR', milestones=[1, 2], by_epoch=False),
    'OneCycleLR': dict(type='OneCycleLR', eta_max=0.1, total_steps=4, by_epoch=False),
    'CosineRestartLR': dict(type='CosineRestartLR', periods=[2, 2],
                            restart_weights=[1, 0.5], eta_min=0.0, by_epoch=False),
    'ReduceOnPlateauLR': dict(type='ReduceOnPlateauLR', monitor='acc', rule='greater',
                              patience=0, by_epoch=True),
}


@pytest.mark.parametrize('name', sorted(SCHEDULERS))
def test_param_scheduler_states_load_and_resume(tmp_path, name):
    allow_mmengine_checkpoint_types()
    straight = make_runner(tmp_path / 'train', f'sched_{name}', max_iters=3,
                           param_scheduler=SCHEDULERS[name])
    straight.train()
    ckpt = tmp_path / 'train' / 'iter_2.pth'
    saved = torch.load(str(ckpt))['param_schedulers'][0]
    if name == 'OneCycleLR':
        assert saved['anneal_func'] is OneCycleParamScheduler._annealing_cos
        with _allowlist_without(OneCycleParamScheduler), pytest.raises(
                pickle.UnpicklingError, match='OneCycleParamScheduler was not an allowed'):
            torch.load(str(ckpt))
    resumed = make_runner(tmp_path / 'resume', f'sched_{name}_resume', max_iters=3,
                          param_scheduler=SCHEDULERS[name], load_from=str(ckpt), resume=True)
    resumed.train()
    # the schedule went on from the file: the same state as the run that never stopped
    assert (resumed.param_schedulers[0].state_dict()
            == straight.param_schedulers[0].state_dict())
    assert load_file(tmp_path / 'resume' / 'iter_3.pth')['meta']['iter'] == 3


EMA_TYPES = ['ExponentialMovingAverage', 'MomentumAnnealingEMA', 'StochasticWeightAverage',
             ExpMomentumEMA]


@pytest.mark.parametrize('ema_type', EMA_TYPES, ids=lambda t: getattr(t, '__name__', t))
def test_ema_state_loads_and_resumes(tmp_path, ema_type):
    allow_mmengine_checkpoint_types()
    hooks = [dict(type='EMAHook', ema_type=ema_type)]
    make_runner(tmp_path / 'train', 'ema', custom_hooks=hooks).train()
    ckpt = torch.load(str(tmp_path / 'train' / 'iter_2.pth'))
    ema = ckpt['ema_state_dict']
    assert int(ema['steps']) == 2 and 'module.linear.weight' in ema
    runner = make_runner(tmp_path / 'resume', 'ema_resume', max_iters=3, custom_hooks=hooks,
                         load_from=str(tmp_path / 'train' / 'iter_2.pth'), resume=True)
    runner.train()
    ema_hook = next(h for h in runner.hooks if type(h).__name__ == 'EMAHook')
    assert int(ema_hook.ema_model.steps) == 3  # continued from the checkpoint's 2


def test_amp_loss_scaler_state_loads_and_resumes(tmp_path, monkeypatch):
    """AmpOptimWrapper's checkpoint adds its GradScaler's state_dict. Its __init__ asserts
    an accelerator and builds torch.cuda.amp.GradScaler; torch's device-generic
    GradScaler on CPU (same class, same state_dict) lets the real wrapper run here."""
    from mmengine.optim.optimizer import amp_optimizer_wrapper as amp
    monkeypatch.setattr(amp, 'is_cuda_available', lambda: True)
    monkeypatch.setattr(amp, 'GradScaler', functools.partial(torch.amp.GradScaler, 'cpu'))
    allow_mmengine_checkpoint_types()
    optim = dict(type='AmpOptimWrapper', dtype='bfloat16', loss_scale='dynamic',
                 optimizer=dict(type='SGD', lr=0.01, momentum=0.9))
    make_runner(tmp_path / 'train', 'amp', optim_wrapper=optim).train()
    ckpt = torch.load(str(tmp_path / 'train' / 'iter_2.pth'))
    scaler = ckpt['optimizer']['loss_scaler']
    assert {'scale', 'growth_factor', 'backoff_factor', 'growth_interval',
            '_growth_tracker'} <= set(scaler)
    assert scaler['_growth_tracker'] == 2  # two finite steps since the last growth
    runner = make_runner(tmp_path / 'resume', 'amp_resume', max_iters=3, optim_wrapper=optim,
                         load_from=str(tmp_path / 'train' / 'iter_2.pth'), resume=True)
    runner.train()
    assert runner.optim_wrapper.loss_scaler.get_scale() == scaler['scale']
    assert runner.optim_wrapper.loss_scaler._get_growth_tracker() == 3


def test_numpy_values_in_meta(tmp_path):
    """Meta a hook or a dataset adds may hold numpy scalars and arrays of any fixed-size
    numeric or bool dtype (a uint8 palette, a np.bool_ flag, an empty array)."""
    allow_mmengine_checkpoint_types()
    dtypes = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
              np.uint32, np.uint64, np.float16, np.float32, np.float64]
    values = {np.dtype(t).name: t(1) for t in dtypes}
    values.update(palette=np.arange(12, dtype=np.uint8).reshape(4, 3),
                  mask=np.array([True, False]), empty=np.zeros((0, 3), np.float32))
    runner = make_runner(tmp_path, 'numpy_meta')
    runner.train()
    runner.save_checkpoint(str(tmp_path), 'numpy_meta.pth', meta=dict(values=values),
                           by_epoch=False)
    path = str(tmp_path / 'numpy_meta.pth')
    with _allowlist_without(type(np.dtype(np.bool_))), pytest.raises(
            pickle.UnpicklingError, match='Can only build.*BoolDType'):
        torch.load(path)
    loaded = torch.load(path)['meta']['values']
    assert loaded.keys() == values.keys()
    for key, value in values.items():
        assert type(loaded[key]) is type(value) and loaded[key].dtype == value.dtype, key
        assert np.array_equal(loaded[key], value), key


def test_loaders_are_importable_from_the_checkpoint_package():
    """The loaders live in mmrepvgg.checkpoint.fetch (not in mmrepvgg.checkpoint.loading,
    which this file tests); user code imports them from the mmrepvgg.checkpoint package,
    and load_file from mmrepvgg."""
    import mmrepvgg
    from mmrepvgg import checkpoint
    from mmrepvgg.checkpoint import fetch
    for name in ('load_file', 'fetch_checkpoint', 'is_remote_checkpoint',
                 'CheckpointDownloadError'):
        assert getattr(checkpoint, name) is getattr(fetch, name)
    assert mmrepvgg.load_file is fetch.load_file
    with pytest.raises(AttributeError, match='no_such_name'):
        checkpoint.no_such_name
