"""ReparamHook inside a real mmengine Runner, on a tiny RepVGG-A0 classifier.

The toy model records, for every forward, which mode it ran in and how many of its
blocks were still in training form, so the tests can see which model the runner's
loops actually used (the training model, or the hook's fused copy).
"""
import copy
import glob
import uuid
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from mmengine.evaluator import BaseMetric
from mmengine.model import BaseModel
from mmengine.registry import METRICS, MODELS
from mmengine.runner import Runner
from torch import nn
from torch.utils.data import Dataset

from helpers import A0_BLOCKS, log_text
from mmrepvgg.engine.hooks import ReparamHook  # importing mmrepvgg registers it
from mmrepvgg.models import RepVGG, RepVGGBlock
from mmrepvgg.numerics import output_error
from mmrepvgg.reparam import (count_unfused, format_report, fuse_and_report,
                              fused_weight_errors, reparameterize, rounding_bound)

TOY_MODEL = 'MMRepVGGTestHookToyNet'
TOY_METRIC = 'MMRepVGGTestHookToyAccuracy'
SIZE = 32  # A0 reduces 32x32 to 1x1: the smallest input every stage accepts

EVENTS = []  # (mode, blocks still in training form, id of the model) per forward
NOISE = []  # the augmentation noise each training step drew (its first value)


@MODELS.register_module(name=TOY_MODEL, force=True)
class ToyNet(BaseModel):
    def __init__(self):
        super().__init__()
        self.backbone = RepVGG('A0', out_indices=(3,))
        self.head = nn.Linear(1280, 2)

    def forward(self, inputs, labels=None, mode='tensor'):
        EVENTS.append((mode, count_unfused(self), id(self)))
        if mode == 'loss':
            # An augmentation drawn from the global RNG, as a real pipeline's would be:
            # anything else that draws from it shifts the training that follows.
            noise = torch.randn_like(inputs)
            NOISE.append(noise.flatten()[0].item())
            inputs = inputs + 0.1 * noise
        logits = self.head(self.backbone(inputs)[-1].mean((2, 3)))
        if mode == 'loss':
            return dict(loss=F.cross_entropy(logits, labels))
        if mode == 'predict':
            return [dict(logits=lg, label=lb) for lg, lb in zip(logits, labels)]
        return logits


@METRICS.register_module(name=TOY_METRIC, force=True)
class ToyAccuracy(BaseMetric):
    def process(self, data_batch, data_samples):
        self.results += [(s['logits'].detach().clone(), int(s['label'])) for s in data_samples]

    def compute_metrics(self, results):
        correct = [int(lg.argmax()) == lb for lg, lb in results]
        return dict(accuracy=100.0 * sum(correct) / len(correct))


class ToyData(Dataset):
    def __init__(self, n, seed):
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, SIZE, SIZE, generator=gen)
        self.y = torch.randint(0, 2, (n,), generator=gen)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return dict(inputs=self.x[i], labels=self.y[i])


def _loader(n, seed):
    return dict(dataset=ToyData(n, seed), batch_size=2, num_workers=0,
                sampler=dict(type='DefaultSampler', shuffle=False),
                collate_fn=dict(type='default_collate'))


def _runner(work_dir, hooks=(), load_from=None, max_iters=4, val_interval=2,
            checkpoint=None):
    return Runner(
        model=dict(type=TOY_MODEL), work_dir=str(work_dir),
        experiment_name=f'toy_{uuid.uuid4().hex[:8]}',
        # 4 batches: no epoch turnover in 4 iterations (mmengine sleeps 2 s there)
        train_dataloader=_loader(8, 0),
        train_cfg=dict(by_epoch=False, max_iters=max_iters, val_interval=val_interval),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.05, momentum=0.9)),
        val_dataloader=_loader(2, 1), val_cfg=dict(), val_evaluator=dict(type=TOY_METRIC),
        test_dataloader=_loader(2, 1), test_cfg=dict(), test_evaluator=dict(type=TOY_METRIC),
        default_hooks=dict(checkpoint=checkpoint or dict(
            type='CheckpointHook', interval=val_interval, by_epoch=False)),
        custom_hooks=list(hooks), load_from=load_from,
        randomness=dict(seed=0), log_level='INFO')


def _blocks(model):
    return [m for m in model.modules() if isinstance(m, RepVGGBlock)]


def _val_inputs(model):
    """The validation images, on the device the runner put the model on."""
    return _loader(2, 1)['dataset'].x.to(next(model.parameters()).device)


def _logits(model, x):
    return model(x, mode='tensor')


@torch.no_grad()
def assert_fused_form_of(logits, model, inputs):
    """``logits`` came from the fused form of ``model`` (training form, put in eval).

    Fusing ``model`` here must keep its weights within fp32 rounding of a float64 copy
    (``fused_weight_errors``), and ``logits`` must sit within twice the fused model's own
    fp32 rounding (measured against its float64 copy, on this device) of what those
    fused weights compute exactly: other weights (e.g. raw instead of EMA) are far off.
    """
    model.eval()
    fused = reparameterize(model)
    errors = fused_weight_errors(model, fused, inputs, _logits)
    assert errors['within'], errors
    exact = _logits(copy.deepcopy(fused).double(), inputs.double())
    own, scale = output_error(_logits(fused, inputs), exact)
    error, _ = output_error(logits, exact)
    assert error <= rounding_bound(own, scale, factor=2), (error, own, scale)


def _backbone_state(path):
    state = torch.load(path, map_location='cpu', weights_only=True)['state_dict']
    return {k: v for k, v in state.items() if k.startswith('backbone.')}


@pytest.fixture
def events():
    EVENTS.clear()
    NOISE.clear()
    yield EVENTS
    EVENTS.clear()
    NOISE.clear()


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A toy checkpoint after 2 training iterations (no hook involved)."""
    work_dir = tmp_path_factory.mktemp('toy_trained')
    _runner(work_dir, max_iters=2, val_interval=100).train()
    return work_dir / 'iter_2.pth'


@pytest.fixture
def val_logits(monkeypatch):
    """The logits the validation metric received, in order."""
    seen = []
    real_process = ToyAccuracy.process

    def spy(self, data_batch, data_samples):
        seen.extend(s['logits'].detach().clone() for s in data_samples)
        real_process(self, data_batch, data_samples)

    monkeypatch.setattr(ToyAccuracy, 'process', spy)
    return seen


@pytest.mark.parametrize('fuse_val', [False, True])
def test_validation_during_training_never_fuses_the_training_model(
        tmp_path, events, val_logits, fuse_val):
    hook = dict(type='mmrepvgg.ReparamHook', probe_size=SIZE)
    if fuse_val:
        hook['fuse_val'] = True
    # save_best saves runner.model from inside the validation (after_val_epoch).
    checkpoint = dict(type='CheckpointHook', interval=2, by_epoch=False,
                      save_best='accuracy', rule='greater')
    runner = _runner(tmp_path, hooks=[hook], checkpoint=checkpoint)
    model = runner.model
    runner.train()

    # Training ran to the end, through two validations, on the same model object.
    assert runner.iter == 4
    assert runner.model is model
    modes = [e[0] for e in events]
    assert modes.count('loss') == 4 and modes.count('predict') == 2
    first_val = modes.index('predict')
    assert 'loss' in modes[first_val:], 'training must continue after a validation'

    # Every training step ran on the unfused 3-branch model...
    train_steps = [e for e in events if e[0] == 'loss']
    assert all(unfused == A0_BLOCKS and mid == id(model) for _, unfused, mid in train_steps)
    # ...which is still in training form now.
    assert count_unfused(model) == A0_BLOCKS
    assert not model.backbone.deploy
    assert not any(b.deploy for b in _blocks(model))
    assert all(b.dense is not None and b.fused is None for b in _blocks(model))

    val_steps = [e for e in events if e[0] == 'predict']
    log = log_text(tmp_path)
    if fuse_val:
        # Validation ran on a fused copy, not on the training model.
        assert all(unfused == 0 and mid != id(model) for _, unfused, mid in val_steps)
        assert log.count(f'ReparamHook: validating a fused copy: fused {A0_BLOCKS} blocks') == 2
        assert 'max output difference on a probe input' in log
    else:
        assert all(unfused == A0_BLOCKS and mid == id(model) for _, unfused, mid in val_steps)
        assert 'ReparamHook:' not in log

    # The last validation (at the last iteration) scored the current weights: the fused
    # copy's logits equal the training model's own eval-mode logits.
    assert_fused_form_of(torch.stack(val_logits[-2:]), model, _val_inputs(model))

    # Checkpoints, the best one included (saved while validating), hold the training
    # form, and the weights kept changing between them (training went on after val).
    best = glob.glob(str(tmp_path / 'best_accuracy_iter_*.pth'))
    assert len(best) == 1
    for path in [best[0], tmp_path / 'iter_2.pth', tmp_path / 'iter_4.pth']:
        state = _backbone_state(path)
        assert 'backbone.stage1.0.dense.conv.weight' in state, path
        assert not any('.fused.' in k for k in state), f'{path} holds the fused copy'
    first, last = _backbone_state(tmp_path / 'iter_2.pth'), _backbone_state(tmp_path / 'iter_4.pth')
    assert not torch.equal(first['backbone.stage1.0.dense.conv.weight'],
                           last['backbone.stage1.0.dense.conv.weight'])


def test_before_test_fuses_after_the_checkpoint_is_loaded(tmp_path, trained, events):
    # Reference: the same checkpoint tested without the hook.
    plain = _runner(tmp_path / 'plain', load_from=str(trained))
    plain_metrics = plain.test()
    reference = [e for e in events if e[0] == 'predict']
    assert reference and all(u == A0_BLOCKS for _, u, _ in reference)
    assert count_unfused(plain.model) == A0_BLOCKS

    events.clear()
    runner = _runner(tmp_path / 'hook', load_from=str(trained),
                     hooks=[dict(type='mmrepvgg.ReparamHook', probe_size=SIZE)])
    metrics = runner.test()
    assert metrics == plain_metrics
    fused_steps = [e for e in events if e[0] == 'predict']
    assert fused_steps and all(u == 0 for _, u, _ in fused_steps)
    model = runner.model
    assert count_unfused(model) == 0 and model.backbone.deploy
    assert all(b.deploy for b in _blocks(model))
    # Fused after loading: the fused model reproduces the loaded weights' outputs (had it
    # been fused before loading, the training-form keys could not have been loaded).
    inputs = _val_inputs(model)
    with torch.no_grad():
        assert fused_weight_errors(plain.model.eval(), model, inputs, _logits)['within']
    log = log_text(tmp_path / 'hook')
    params_before = sum(p.numel() for p in plain.model.parameters())
    params_after = sum(p.numel() for p in model.parameters())
    assert params_after < params_before
    assert (f'ReparamHook: fused {A0_BLOCKS} blocks; parameters {params_before:,} -> '
            f'{params_after:,}; max output difference on a probe input') in log


class _Logger:
    def __init__(self):
        self.infos, self.warnings = [], []

    def info(self, msg):
        self.infos.append(msg)

    def warning(self, msg):
        self.warnings.append(msg)


def test_before_test_unwraps_model_wrappers_and_probe_off():
    net = ToyNet()
    wrapped = nn.DataParallel(net)  # a registered mmengine model wrapper
    runner = SimpleNamespace(model=wrapped, logger=_Logger())
    ReparamHook(probe=False).before_test(runner)
    assert runner.model is wrapped
    assert count_unfused(net) == 0 and net.backbone.deploy
    assert len(runner.logger.infos) == 1 and not runner.logger.warnings
    assert runner.logger.infos[0].startswith(f'ReparamHook: fused {A0_BLOCKS} blocks')
    assert 'max output difference' not in runner.logger.infos[0]


def test_fuse_and_report_probe_on_and_off():
    torch.manual_seed(0)
    report = fuse_and_report(ToyNet(), probe=False)
    assert report['blocks'] == A0_BLOCKS and 'max_diff' not in report
    assert report['params_after'] < report['params_before']
    report = fuse_and_report(ToyNet(), probe=True, probe_size=SIZE)
    assert report['blocks'] == A0_BLOCKS
    assert report['within_rounding'], report
    assert report['max_diff'] >= 0 and report['fused_weights_error'] >= 0
    assert 'within fp32 rounding' in format_report(report)


def test_probe_catches_a_wrong_fusion(monkeypatch):
    real = RepVGGBlock.switch_to_deploy

    def off_by_1e3(block):  # a fusion that gets one bias wrong by 1e-3
        real(block)
        if block.out_channels == 96:
            block.fused.bias.data[0] += 1e-3

    monkeypatch.setattr(RepVGGBlock, 'switch_to_deploy', off_by_1e3)
    runner = SimpleNamespace(model=ToyNet(), logger=_Logger())
    ReparamHook(probe_size=SIZE).before_test(runner)
    assert not runner.logger.infos and len(runner.logger.warnings) == 1
    assert 'MORE than fp32 rounding explains' in runner.logger.warnings[0]


def test_probing_leaves_the_global_random_stream_alone(tmp_path, events):
    """A run with fuse_val=True draws the same training randomness as one without."""
    noise = {}
    for fuse_val in (False, True):
        NOISE.clear()
        hooks = [dict(type='mmrepvgg.ReparamHook', probe_size=SIZE, fuse_val=fuse_val)]
        _runner(tmp_path / str(fuse_val), hooks=hooks).train()
        noise[fuse_val] = list(NOISE)
    # 4 steps, validations after steps 2 and 4: steps 3-4 follow a fused validation.
    assert len(noise[True]) == 4 and noise[True] == noise[False]


def _ema_hook(runner):
    return next(h for h in runner.hooks if type(h).__name__ == 'EMAHook')


@pytest.fixture(scope='module')
def ema_trained(tmp_path_factory):
    """A toy checkpoint trained 4 iterations with mmengine's EMAHook (a fast average, so
    the EMA weights clearly differ from the raw ones)."""
    work_dir = tmp_path_factory.mktemp('toy_ema')
    _runner(work_dir, hooks=[dict(type='EMAHook', momentum=0.5)], val_interval=100).train()
    return work_dir / 'iter_4.pth'


@pytest.mark.parametrize('ema_priority', ['HIGHEST', 'NORMAL', 'LOW'])
def test_deploy_test_scores_the_fused_ema_weights(tmp_path, ema_trained, val_logits,
                                                  ema_priority):
    ema = dict(type='EMAHook', momentum=0.5, priority=ema_priority)
    plain = _runner(tmp_path / 'plain', load_from=str(ema_trained), hooks=[ema])
    plain_metrics = plain.test()
    plain_logits = torch.stack(val_logits)
    val_logits.clear()
    fused = _runner(tmp_path / 'fused', load_from=str(ema_trained),
                    hooks=[ema, dict(type='mmrepvgg.ReparamHook', probe_size=SIZE)])
    assert fused.test() == plain_metrics
    assert count_unfused(fused.model) == 0
    assert count_unfused(_ema_hook(fused).ema_model.module) == 0
    inputs = _val_inputs(plain.model)
    # plain.model holds the EMA weights (mmengine saves them as the state dict)...
    with torch.no_grad():
        torch.testing.assert_close(plain.model.eval()(inputs), plain_logits)
    assert_fused_form_of(torch.stack(val_logits), plain.model, inputs)
    # ...which are not the raw weights: scoring those would have been caught above.
    raw = ToyNet().to(inputs.device).eval()
    state = torch.load(ema_trained, map_location=inputs.device, weights_only=True)
    raw.load_state_dict({k[len('module.'):]: v for k, v in state['ema_state_dict'].items()
                         if k.startswith('module.')})
    with torch.no_grad():
        assert (raw(inputs) - plain_logits).abs().max() > 1e-3


@pytest.mark.parametrize('ema_priority', ['HIGHEST', 'NORMAL', 'LOW'])
def test_fuse_val_validates_the_fused_ema_weights(tmp_path, events, val_logits,
                                                  ema_priority):
    ema = dict(type='EMAHook', momentum=0.5, priority=ema_priority)
    checkpoint = dict(type='CheckpointHook', interval=2, by_epoch=False,
                      save_best='accuracy', rule='greater')
    plain = _runner(tmp_path / 'plain', hooks=[ema], checkpoint=checkpoint)
    plain.train()
    plain_logits = torch.stack(val_logits[-2:])
    val_logits.clear()
    fused = _runner(tmp_path / 'fused', checkpoint=checkpoint,
                    hooks=[ema, dict(type='mmrepvgg.ReparamHook', probe_size=SIZE,
                                     fuse_val=True)])
    fused.train()
    assert 'validating a fused copy of the EMA weights' in log_text(tmp_path / 'fused')
    # The last validation scored the fused EMA weights: within rounding of the same
    # weights unfused, which is what the run without ReparamHook validated.
    averaged = _ema_hook(fused).ema_model.module
    inputs = _val_inputs(averaged)
    assert_fused_form_of(torch.stack(val_logits[-2:]), averaged, inputs)
    with torch.no_grad():
        unfused = _logits(_ema_hook(plain).ema_model.module.eval(), inputs)
    torch.testing.assert_close(plain_logits, unfused)  # the same computation
    # The best checkpoint holds the training form and the EMA state.
    best = glob.glob(str(tmp_path / 'fused' / 'best_accuracy_iter_*.pth'))
    assert len(best) == 1
    state = torch.load(best[0], map_location='cpu', weights_only=True)
    assert 'backbone.stage1.0.dense.conv.weight' in state['state_dict']
    assert not any('.fused.' in k for k in state['state_dict'])
    assert 'module.backbone.stage1.0.dense.conv.weight' in state['ema_state_dict']


def test_before_test_warns_when_nothing_to_fuse():
    net = ToyNet()
    fuse_and_report(net, probe=False)  # already fused
    runner = SimpleNamespace(model=net, logger=_Logger())
    ReparamHook().before_test(runner)
    assert not runner.logger.infos
    assert len(runner.logger.warnings) == 1
    assert 'nothing to fuse' in runner.logger.warnings[0]


def test_val_hooks_leave_the_model_alone_without_fuse_val():
    """fuse_val=False: before_val/after_val neither swap nor fuse runner.model."""
    model = ToyNet()
    runner = SimpleNamespace(model=model, logger=_Logger())
    hook = ReparamHook()
    hook.before_val(runner)
    assert runner.model is model
    hook.after_val(runner)
    assert runner.model is model and count_unfused(model) == A0_BLOCKS
    assert not runner.logger.infos and not runner.logger.warnings


@pytest.mark.parametrize('entry,expected', [
    (dict(type='mmrepvgg.ReparamHook'), True),
    (dict(type='ReparamHook', fuse_val=True), True),
    (dict(type=ReparamHook), True),
    (dict(type=type('MyReparamHook', (ReparamHook,), {})), True),
    (ReparamHook(), True),
    (dict(type='EMAHook'), False),
    (dict(type='mmengine.EMAHook'), False),
])
def test_reparam_hook_is_recognised_in_custom_hooks(entry, expected):
    """--deploy adds a ReparamHook only when custom_hooks has none, however it is given."""
    from mmrepvgg.apis.config import is_reparam_hook
    assert is_reparam_hook(entry) is expected


def test_probe_reads_the_input_channels_of_an_se_backbone(randomize):
    """A fused SE block registers its conv after SE's: the probe is drawn before fusing,
    from the training form, so it has the image's 3 channels (a small D2se-like net)."""
    arch = dict(num_blocks=(1, 1, 1, 1), width_factors=(0.5, 0.5, 0.5, 0.5), se_ratio=4)
    model = randomize(RepVGG(arch, out_indices=(3,)))
    report = fuse_and_report(model, probe=True, probe_size=SIZE)
    assert report['blocks'] == 5 and report['within_rounding'], report
