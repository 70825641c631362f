import copy
import re

import pytest
import torch
from mmengine.model import revert_sync_batchnorm
from torch import nn

from helpers import TINY
from mmrepvgg import QARepVGGBlock, RepVGG, RepVGGBlock, reparameterize
from mmrepvgg.models import ARCH_SETTINGS, arch_channels
from mmrepvgg.reparam import (FUSION_MARGIN, assert_fusion_exact, count_parameters,
                              count_unfused, fusion_errors, max_output_difference)

ALL_ARCHS = list(ARCH_SETTINGS)
BLOCK_TYPES = ('repvgg', 'qa')


def assert_exact(model, probe, **kwargs):
    """The error fusion adds (fused fp32 weights, fp64 arithmetic) within FUSION_MARGIN x
    the training form's own fp32 error, both against an fp64 copy; fusion done in fp64
    exact to 1e-10 (``fusion_errors``); and every block fused."""
    errors = fusion_errors(model, probe, **kwargs)
    assert_fusion_exact(errors)
    assert count_unfused(reparameterize(model)) == 0 and count_unfused(model) > 0
    return errors


@pytest.mark.parametrize('block', BLOCK_TYPES)
@pytest.mark.parametrize('arch', ALL_ARCHS)
def test_every_variant_fuses_exactly(arch, block, randomize):
    torch.manual_seed(0)
    model = randomize(RepVGG(arch, block=block))
    assert_exact(model, torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize('strides,dilations,num_dilated', [
    ((2, 2, 1, 1), (1, 1, 2, 4), (None, None, None, None)),   # output stride 8
    ((2, 2, 1, 1), (1, 1, 2, 4), (None, None, 4, 1)),         # B1g2-fast
    ((2, 2, 2, 1), (1, 1, 1, 2), (None, None, None, None)),   # output stride 16
])
@pytest.mark.parametrize('block', BLOCK_TYPES)
def test_strided_and_dilated_fusion_is_exact(strides, dilations, num_dilated, block,
                                             randomize):
    torch.manual_seed(1)
    model = randomize(RepVGG('B1g2', strides=strides, dilations=dilations,
                             num_dilated_blocks=num_dilated, block=block))
    assert_exact(model, torch.randn(1, 3, 32, 48))


@pytest.mark.parametrize('block_cls', [RepVGGBlock, QARepVGGBlock])
def test_block_grouped_identity_and_se(block_cls, randomize):
    torch.manual_seed(2)
    block = randomize(block_cls(8, 8, groups=4, dilation=3, se_ratio=4)).eval()
    assert block.identity is not None and block.se is not None
    fused = copy.deepcopy(block)
    fused.switch_to_deploy()
    assert fused.fused is not None and fused.dense is None and fused.se is not None
    x = torch.randn(2, 8, 11, 13)
    assert_exact(block, x)
    assert max_output_difference(fused, reparameterize(block), x) == 0  # same weights

    # The fused block runs SE after the conv: dropping it changes the output.
    def fuse_without_se(module):
        module = reparameterize(module)
        module.se = None
        return module

    with pytest.raises(AssertionError, match='fused fp32 weights move'):
        assert_exact(block, x, fuse=fuse_without_se)


def _perturb_middle_block(fused, delta=1e-3):
    blocks = [m for m in fused.modules() if isinstance(m, RepVGGBlock)]
    with torch.no_grad():
        blocks[len(blocks) // 2].fused.bias.add_(delta)


@pytest.mark.parametrize('perturbed', [(), (torch.float32,),
                                       (torch.float32, torch.float64)])
def test_check_fails_a_fusion_off_by_1e_3_in_one_bias(perturbed, randomize):
    """A fusion that is wrong by 1e-3 in one block's bias fails the fp32 check, also
    when the fp64 fusion is right; the correct fusion passes."""
    torch.manual_seed(0)
    model = randomize(RepVGG('A0')).eval()

    def fuse(m):
        fused = reparameterize(m)
        if fused.stem.fused.bias.dtype in perturbed:
            _perturb_middle_block(fused)
        return fused

    errors = fusion_errors(model, torch.randn(1, 3, 32, 32), fuse=fuse)
    if not perturbed:
        assert_fusion_exact(errors)
        return
    assert not errors['exact']
    # far beyond the allowed margin, not a near miss
    assert errors['margin'] > 10 * FUSION_MARGIN, errors
    with pytest.raises(AssertionError, match='fp32 weights move .* more than') as failure:
        assert_fusion_exact(errors)
    assert ('not exact algebra' in str(failure.value)) == (torch.float64 in perturbed)


# Params in millions of the deploy model with a 1000-class head (paper, Table 4/5).
PAPER_PARAMS = dict(A0=8.30, A1=12.78, A2=25.49, B0=14.33, B1g4=36.12, B1g2=41.36,
                    B1=51.82, B2g4=55.77, B2=80.31, B3g4=75.62, B3=110.96)


@pytest.mark.parametrize('arch', list(PAPER_PARAMS))
def test_deploy_params_match_paper(arch):
    backbone = RepVGG(arch, deploy=True)
    head = nn.Linear(backbone.stage_channels[-1], 1000)
    total = (count_parameters(backbone) + count_parameters(head)) / 1e6
    assert abs(total - PAPER_PARAMS[arch]) <= 0.01, total


@pytest.mark.parametrize('strides,dilations,stride', [
    ((2, 2, 2, 2), (1, 1, 1, 1), 32),
    ((2, 2, 2, 1), (1, 1, 1, 2), 16),
    ((2, 2, 1, 1), (1, 1, 2, 4), 8),
])
def test_feature_shapes_per_output_stride(strides, dilations, stride):
    model = RepVGG('A0', strides=strides, dilations=dilations).eval()
    outs = model(torch.randn(1, 3, 64, 96))
    assert len(outs) == 4
    expected_strides = [4, 8] + [min(stride, 16), stride]
    for out, channels, s in zip(outs, model.out_channels, expected_strides):
        assert out.shape == (1, channels, 64 // s, 96 // s)
    assert model.out_channels == (48, 96, 192, 1280)


def test_out_indices_and_channel_table():
    model = RepVGG('B2', out_indices=(1, 3)).eval()
    outs = model(torch.randn(1, 3, 32, 32))
    assert [o.shape[1] for o in outs] == [320, 2560] == list(model.out_channels)
    assert arch_channels('B2') == (160, 320, 640, 2560) == model.stage_channels
    assert arch_channels('A2') == (96, 192, 384, 1408)
    assert arch_channels('B3g4') == (192, 384, 768, 2560)


OUT_INDICES = [(0,), (0, 1), (0, 1, 2), (3,), (1, 3), (0, 1, 2, 3)]


@pytest.mark.parametrize('out_indices', OUT_INDICES)
def test_out_indices_build_only_stages_that_get_gradients(out_indices):
    """Stages after the last output are not built, so every trainable parameter gets a
    gradient (DDP with find_unused_parameters=False needs that)."""
    torch.manual_seed(0)
    model = RepVGG(TINY, out_indices=out_indices)
    last = max(out_indices)
    assert model.stage_names == [f'stage{i + 1}' for i in range(last + 1)]
    assert model.unbuilt_stages == tuple(f'stage{i + 1}' for i in range(last + 1, 4))
    assert not any(hasattr(model, name) for name in model.unbuilt_stages)
    assert model.stage_channels == arch_channels(TINY) == (16, 32, 64, 128)
    full = RepVGG(TINY)
    # the unbuilt stages' parameters, exactly, are gone
    assert count_parameters(full) - count_parameters(model) == sum(
        count_parameters(getattr(full, name)) for name in model.unbuilt_stages)

    outs = model(torch.randn(2, 3, 32, 32))
    assert [o.shape[1] for o in outs] == list(model.out_channels) == [
        model.stage_channels[i] for i in sorted(out_indices)]
    assert [o.shape[-1] for o in outs] == [32 // 2 ** (i + 2) for i in sorted(out_indices)]
    sum(o.square().mean() for o in outs).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad


def test_truncated_backbone_freezes_and_fuses(randomize):
    model = RepVGG(TINY, out_indices=(0, 1), frozen_stages=1)
    model.train()
    assert not any(p.requires_grad for p in model.stem.parameters())
    assert not any(p.requires_grad for p in model.stage1.parameters())
    assert all(p.requires_grad for p in model.stage2.parameters())
    # freezing every built stage and more is allowed (a fixed feature extractor)
    frozen = RepVGG(TINY, out_indices=(0, 1), frozen_stages=4)
    assert not any(p.requires_grad for p in frozen.parameters())

    torch.manual_seed(4)
    model = randomize(RepVGG(TINY, out_indices=(0, 1)))
    assert_exact(model, torch.randn(1, 3, 32, 32))  # reparameterize: fused and exact
    model.eval().switch_to_deploy()
    direct = RepVGG(TINY, out_indices=(0, 1), deploy=True).eval()
    direct.load_state_dict(model.state_dict())  # same keys: no stage3, stage4
    assert count_unfused(model) == 0
    probe = torch.randn(1, 3, 32, 32)
    assert max_output_difference(model, direct, probe) == 0


def test_full_release_loads_into_a_truncated_backbone(randomize, tmp_path, monkeypatch):
    """A release file holds all stages: the weights of the unbuilt ones are left unused
    (and counted in the log), the built ones load; a file of another arch still fails."""
    source = randomize(RepVGG(TINY), seed=7)
    # the official release's names, written out by hand
    release = {}
    for key, value in source.state_dict().items():
        key = re.sub(r'^stem\.', 'stage0.', key)
        for ours, theirs in (('.dense.', '.rbr_dense.'), ('.pointwise.', '.rbr_1x1.'),
                             ('.identity.', '.rbr_identity.')):
            key = key.replace(ours, theirs)
        release[key] = value.clone()
    assert 'stage0.rbr_dense.bn.running_var' in release
    release['linear.weight'] = torch.randn(1000, 128)
    assert any(k.startswith('stage4.') for k in release)
    path = str(tmp_path / 'RepVGG-tiny-train.pth')
    torch.save(release, path)

    import mmengine.logging
    logged = []
    monkeypatch.setattr(mmengine.logging, 'print_log', lambda msg, **_: logged.append(msg))
    model = RepVGG(TINY, out_indices=(0, 1, 2), init_cfg=dict(type='Pretrained',
                                                              checkpoint=path))
    model.init_weights()
    expected = source.state_dict()
    state = model.state_dict()
    assert state and all(torch.equal(v, expected[k]) for k, v in state.items())
    unused = len([k for k in expected if k.startswith('stage4.')])
    assert any(f'{unused} tensors of stage4 left unused' in m for m in logged), logged

    wider = randomize(RepVGG(dict(TINY, width_factors=(0.5,) * 4)))
    torch.save(wider.state_dict(), tmp_path / 'wider.pth')
    model = RepVGG(TINY, out_indices=(0,), init_cfg=dict(
        type='Pretrained', checkpoint=str(tmp_path / 'wider.pth')))
    with pytest.raises(ValueError, match=r'stem\.dense\.conv\.weight: file \(32'):
        model.init_weights()


def test_grouped_layer_numbering():
    model = RepVGG('B1g4')
    layers = [b for n in model.stage_names for b in getattr(model, n)]
    assert len(layers) == 27
    for number, block in enumerate(layers, start=1):
        assert block.groups == (4 if number % 2 == 0 else 1), number
    assert model.stem.groups == 1


def test_fast_variant_dilates_only_last_blocks():
    model = RepVGG('B1g2', strides=(2, 2, 1, 1), dilations=(1, 1, 2, 4),
                   num_dilated_blocks=(None, None, 4, 1))
    assert [b.dilation for b in model.stage3] == [1] * 12 + [2] * 4
    assert [b.dilation for b in model.stage4] == [4]
    assert model.stage3[0].stride == 1 and model.stage3[12].dense.conv.padding == (2, 2)


def test_custom_arch_dict_and_se():
    arch = dict(num_blocks=(1, 2, 1, 1), width_factors=(0.5, 0.5, 0.5, 1),
                groups={2: 2}, se_ratio=8)
    model = RepVGG(arch)
    assert model.stage_channels == (32, 64, 128, 512)
    assert model.stage2[0].groups == 2 and model.stage2[1].groups == 1
    assert all(b.se is not None for b in model.modules() if isinstance(b, RepVGGBlock))


def test_unknown_block_lists_the_valid_ones():
    with pytest.raises(KeyError, match="unknown RepVGG block 'qarepvgg'; valid names: "
                                       'repvgg, qa'):
        RepVGG('A0', block='qarepvgg')


def test_bad_arguments_say_what_is_allowed():
    with pytest.raises(KeyError, match='valid names: A0, A1'):
        RepVGG('B9')
    with pytest.raises(KeyError, match='unknown keys'):
        RepVGG(dict(num_blocks=(1, 1, 1, 1), width_factors=(1, 1, 1, 1), depth=3))
    with pytest.raises(ValueError, match='out_indices'):
        RepVGG('A0', out_indices=(4,))
    with pytest.raises(ValueError, match='dilations'):
        RepVGG('A0', dilations=(1, 2))


def test_non_batch_norm_cannot_fuse():
    model = RepVGG('A0', norm_cfg=dict(type='GN', num_groups=8)).eval()
    with pytest.raises(TypeError, match='GroupNorm'):
        reparameterize(model)


def test_train_mode_fusion_is_refused():
    with pytest.raises(RuntimeError, match='eval'):
        reparameterize(RepVGG('A0'))


@pytest.mark.parametrize('block', BLOCK_TYPES)
def test_syncbn_config_reverted_to_batchnormxd_fuses(block, randomize):
    model = RepVGG('A0', norm_cfg=dict(type='SyncBN', requires_grad=True), block=block)
    model = randomize(revert_sync_batchnorm(model)).eval()
    assert 'BatchNormXd' in type(model.stem.dense.bn).__name__
    assert_exact(model, torch.randn(1, 3, 32, 32))


def test_qa_block_has_norms_only_on_the_3x3_branch_and_after_the_sum():
    block = QARepVGGBlock(8, 8)
    assert isinstance(block.dense.bn, nn.BatchNorm2d) and isinstance(block.bn, nn.BatchNorm2d)
    assert isinstance(block.pointwise, nn.Conv2d) and block.pointwise.bias is None
    assert isinstance(block.identity, nn.Identity)
    norms = [n for n, m in block.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms == ['dense.bn', 'bn']
    assert QARepVGGBlock(8, 16).identity is None and QARepVGGBlock(8, 8, 2).identity is None
    # The norm after the sum normalises all three branches: with the 3x3 and 1x1 kernels
    # zeroed the block still computes relu(bn(x)), the identity through the shared norm.
    with torch.no_grad():
        block.dense.conv.weight.zero_()
        block.pointwise.weight.zero_()
        block.bn.running_mean.fill_(0.5)
    x = torch.randn(1, 8, 5, 5)
    expected = torch.relu(block.dense.bn.eval()(torch.zeros_like(x)) + x - 0.5)
    torch.testing.assert_close(block.eval()(x), expected / (1 + block.bn.eps) ** 0.5)


def test_qa_backbone_fuses_to_the_same_deploy_form_as_repvgg(randomize):
    qa = reparameterize(randomize(RepVGG('A0', block='qa')).eval())
    plain = RepVGG('A0', deploy=True)
    assert qa.state_dict().keys() == plain.state_dict().keys()
    assert all(v.shape == plain.state_dict()[k].shape for k, v in qa.state_dict().items())
    plain.load_state_dict(qa.state_dict())  # a deploy-form model loads either
    probe = torch.randn(1, 3, 32, 32)
    assert max_output_difference(qa, plain.eval(), probe) == 0


def test_reparameterize_nested_copy_and_idempotent(randomize):
    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = RepVGG('A0', out_indices=(3,))
            self.head = nn.Conv2d(1280, 4, 1)

        def forward(self, x):
            return self.head(self.backbone(x)[0])

    model = randomize(Detector()).eval()
    fused = reparameterize(model)
    assert count_unfused(model) == 22 and count_unfused(fused) == 0
    assert fused.backbone.deploy and not model.backbone.deploy
    again = reparameterize(fused, inplace=True)
    assert again is fused
    probe = torch.randn(1, 3, 32, 32)
    assert_exact(model, probe)
    # fusing is deterministic: the checked fusion is the one made above
    assert max_output_difference(fused, reparameterize(model), probe) == 0


def test_deploy_built_model_loads_fused_weights(randomize):
    model = randomize(RepVGG('B0')).eval()
    fused = reparameterize(model)
    direct = RepVGG('B0', deploy=True).eval()
    direct.load_state_dict(fused.state_dict())
    probe = torch.randn(1, 3, 32, 32)
    assert max_output_difference(fused, direct, probe) == 0


def test_frozen_stages_and_norm_eval():
    model = RepVGG('A0', frozen_stages=2, norm_eval=True)
    model.train()
    assert not any(p.requires_grad for p in model.stem.parameters())
    assert not any(p.requires_grad for p in model.stage2.parameters())
    assert all(p.requires_grad for p in model.stage3.parameters())
    assert not model.stage1.training
    assert model.stage3.training and not model.stage3[0].dense.bn.training


def _count_block_calls(model):
    """Calls of every block's forward, recomputations included."""
    calls = {}
    for name, module in model.named_modules():
        if isinstance(module, RepVGGBlock):
            calls[name] = 0
            module.register_forward_pre_hook(
                lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    return calls


def _bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.rsplit('.', 1)[-1] in ('running_mean', 'running_var', 'num_batches_tracked')}


@pytest.mark.parametrize('norm_cfg', [dict(type='BN'), dict(type='BN', momentum=None),
                                      dict(type='SyncBN')])
@pytest.mark.parametrize('block', BLOCK_TYPES)
def test_checkpointing_keeps_bn_statistics_and_gradients(block, norm_cfg):
    """One step with with_cp recomputes every block in backward (each runs twice), yet its
    batch norms update their running statistics once, to the very values of a step
    without it: fusion folds them into the deployed model. Gradients match too.
    (SyncBN without a process group normalizes per process; momentum=None is the
    cumulative average, which num_batches_tracked drives.)"""
    torch.manual_seed(3)
    plain = RepVGG(TINY, block=block, norm_cfg=norm_cfg)
    ckpt = copy.deepcopy(plain)
    ckpt.with_cp = True
    before = _bn_state(plain)
    x = torch.randn(2, 3, 32, 32)
    calls = {}
    for name, model in (('plain', plain), ('ckpt', ckpt)):
        calls[name] = _count_block_calls(model)
        model.train()
        sum(out.square().mean() for out in model(x)).backward()
    assert set(calls['plain'].values()) == {1} and set(calls['ckpt'].values()) == {2}

    stats, stats_cp = _bn_state(plain), _bn_state(ckpt)
    assert stats.keys() == stats_cp.keys() and len(stats) == 3 * len(
        [m for m in plain.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)])
    for key, value in stats.items():
        if key.endswith('num_batches_tracked'):
            assert value.item() == stats_cp[key].item() == 1, key
        else:
            assert not torch.equal(value, before[key]), key  # the step moved them
            # the same computation (the forward) produced both: equal, not merely close
            assert torch.equal(value, stats_cp[key]), key
    # The recomputation repeats the same fp32 operations on the same values: at most
    # fp32 rounding apart (torch's fp32 tolerance, ~10 ulp).
    for (name, p), p_cp in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p_cp.grad, p.grad, msg=name)


@pytest.mark.parametrize('frozen_stages', [-1, 1])
def test_checkpointing_covers_every_trainable_block(frozen_stages, monkeypatch):
    """The stem and the first trainable block after frozen stages take an input that
    needs no grad; they are checkpointed all the same, frozen blocks never."""
    import torch.utils.checkpoint as cp
    checkpointed = []
    real = cp.checkpoint

    def spy(block, *args, **kwargs):
        checkpointed.append(block)
        return real(block, *args, **kwargs)

    monkeypatch.setattr(cp, 'checkpoint', spy)
    model = RepVGG('A0', out_indices=(3,), with_cp=True, frozen_stages=frozen_stages)
    model.train()
    model(torch.randn(2, 3, 32, 32))[0].sum().backward()
    blocks = [model.stem] + [b for n in model.stage_names for b in getattr(model, n)]
    trainable = [b for b in blocks if any(p.requires_grad for p in b.parameters())]
    assert [id(b) for b in checkpointed] == [id(b) for b in trainable]
    assert len(trainable) == (22 if frozen_stages < 0 else 22 - 1 - 2)
    with torch.no_grad():  # nothing to recompute: no checkpointing
        checkpointed.clear()
        model(torch.randn(2, 3, 32, 32))
        assert not checkpointed


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of one rank (mmcv's SyncBatchNorm needs one to be built)."""
    import torch.distributed as dist
    if not dist.is_available():
        pytest.skip('torch.distributed is not available')
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "pg"}', rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize('block', BLOCK_TYPES)
def test_mmcv_sync_bn_fuses_and_honours_norm_eval(block, one_process_group, randomize):
    """A RepVGG built with mmcv's SyncBatchNorm (MMSyncBN, what sync_bn='mmcv' converts
    to), which is no torch _BatchNorm and holds its process group: it fuses (a copy
    shares the group) as exactly as with BN, and norm_eval keeps those norms frozen."""
    from mmcv.ops import SyncBatchNorm as MMSyncBN
    torch.manual_seed(0)
    model = randomize(RepVGG('A0', block=block, norm_cfg=dict(type='MMSyncBN')))
    norms = [m for m in model.modules() if isinstance(m, MMSyncBN)]
    assert len(norms) == (61 if block == 'repvgg' else 44)
    assert_exact(model, torch.randn(1, 3, 32, 32))
    fused = reparameterize(model.eval())
    assert not any(isinstance(m, MMSyncBN) for m in fused.modules())
    model = RepVGG('A0', block=block, norm_cfg=dict(type='MMSyncBN'), norm_eval=True)
    model.train()
    assert norms and not any(m.training for m in model.modules() if isinstance(m, MMSyncBN))
