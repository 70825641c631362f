"""Layout detection and mapping of RepVGG checkpoints (no backbone needed).

Every source layout below is written out by hand, key by key, next to the
name our backbone uses for it, so the tests check the mapping table against
independent knowledge of each layout rather than against itself.

The toy network: stem 3->8 (stride 2), stage1 = [8->16 stride 2, 16->16 with
identity (+ SE in the SE variant)], stage2 = [16->32 stride 2].
"""
import collections

import pytest
import torch
import torch.nn as nn

from mmrepvgg.checkpoint import (detect_layout, extract_state_dict,
                                 load_backbone_checkpoint, to_mmrepvgg)

BN_FIELDS = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')

# (source prefix, our prefix, kind, shape): kind 'conv' -> '.weight',
# 'convb' -> '.weight' + '.bias', 'bn' -> batch-norm fields of width `shape`.
OFFICIAL_TRAIN = [
    ('stage0.rbr_dense.conv', 'stem.dense.conv', 'conv', (8, 3, 3, 3)),
    ('stage0.rbr_dense.bn', 'stem.dense.bn', 'bn', 8),
    ('stage0.rbr_1x1.conv', 'stem.pointwise.conv', 'conv', (8, 3, 1, 1)),
    ('stage0.rbr_1x1.bn', 'stem.pointwise.bn', 'bn', 8),
    ('stage1.0.rbr_dense.conv', 'stage1.0.dense.conv', 'conv', (16, 8, 3, 3)),
    ('stage1.0.rbr_dense.bn', 'stage1.0.dense.bn', 'bn', 16),
    ('stage1.0.rbr_1x1.conv', 'stage1.0.pointwise.conv', 'conv', (16, 8, 1, 1)),
    ('stage1.0.rbr_1x1.bn', 'stage1.0.pointwise.bn', 'bn', 16),
    ('stage1.1.rbr_identity', 'stage1.1.identity', 'bn', 16),
    ('stage1.1.rbr_dense.conv', 'stage1.1.dense.conv', 'conv', (16, 16, 3, 3)),
    ('stage1.1.rbr_dense.bn', 'stage1.1.dense.bn', 'bn', 16),
    ('stage1.1.rbr_1x1.conv', 'stage1.1.pointwise.conv', 'conv', (16, 16, 1, 1)),
    ('stage1.1.rbr_1x1.bn', 'stage1.1.pointwise.bn', 'bn', 16),
    ('stage2.0.rbr_dense.conv', 'stage2.0.dense.conv', 'conv', (32, 16, 3, 3)),
    ('stage2.0.rbr_dense.bn', 'stage2.0.dense.bn', 'bn', 32),
    ('stage2.0.rbr_1x1.conv', 'stage2.0.pointwise.conv', 'conv', (32, 16, 1, 1)),
    ('stage2.0.rbr_1x1.bn', 'stage2.0.pointwise.bn', 'bn', 32),
]
OFFICIAL_SE = [
    ('stage1.1.se.down', 'stage1.1.se.down', 'convb', (4, 16, 1, 1)),
    ('stage1.1.se.up', 'stage1.1.se.up', 'convb', (16, 4, 1, 1)),
]
OFFICIAL_DEPLOY = [
    ('stage0.rbr_reparam', 'stem.fused', 'convb', (8, 3, 3, 3)),
    ('stage1.0.rbr_reparam', 'stage1.0.fused', 'convb', (16, 8, 3, 3)),
    ('stage1.1.rbr_reparam', 'stage1.1.fused', 'convb', (16, 16, 3, 3)),
    ('stage2.0.rbr_reparam', 'stage2.0.fused', 'convb', (32, 16, 3, 3)),
]
OFFICIAL_HEAD = {'linear.weight': (10, 32), 'linear.bias': (10,)}

MMPRETRAIN_TRAIN = [
    ('stem.branch_3x3.conv', 'stem.dense.conv', 'conv', (8, 3, 3, 3)),
    ('stem.branch_3x3.norm', 'stem.dense.bn', 'bn', 8),
    ('stem.branch_1x1.conv', 'stem.pointwise.conv', 'conv', (8, 3, 1, 1)),
    ('stem.branch_1x1.norm', 'stem.pointwise.bn', 'bn', 8),
    ('stage_1.0.branch_3x3.conv', 'stage1.0.dense.conv', 'conv', (16, 8, 3, 3)),
    ('stage_1.0.branch_3x3.norm', 'stage1.0.dense.bn', 'bn', 16),
    ('stage_1.0.branch_1x1.conv', 'stage1.0.pointwise.conv', 'conv', (16, 8, 1, 1)),
    ('stage_1.0.branch_1x1.norm', 'stage1.0.pointwise.bn', 'bn', 16),
    ('stage_1.1.branch_norm', 'stage1.1.identity', 'bn', 16),
    ('stage_1.1.branch_3x3.conv', 'stage1.1.dense.conv', 'conv', (16, 16, 3, 3)),
    ('stage_1.1.branch_3x3.norm', 'stage1.1.dense.bn', 'bn', 16),
    ('stage_1.1.branch_1x1.conv', 'stage1.1.pointwise.conv', 'conv', (16, 16, 1, 1)),
    ('stage_1.1.branch_1x1.norm', 'stage1.1.pointwise.bn', 'bn', 16),
    ('stage_2.0.branch_3x3.conv', 'stage2.0.dense.conv', 'conv', (32, 16, 3, 3)),
    ('stage_2.0.branch_3x3.norm', 'stage2.0.dense.bn', 'bn', 32),
    ('stage_2.0.branch_1x1.conv', 'stage2.0.pointwise.conv', 'conv', (32, 16, 1, 1)),
    ('stage_2.0.branch_1x1.norm', 'stage2.0.pointwise.bn', 'bn', 32),
]
MMPRETRAIN_SE = [
    ('stage_1.1.se_layer.conv1.conv', 'stage1.1.se.down', 'convb', (4, 16, 1, 1)),
    ('stage_1.1.se_layer.conv2.conv', 'stage1.1.se.up', 'convb', (16, 4, 1, 1)),
]
MMPRETRAIN_DEPLOY = [
    ('stem.branch_reparam', 'stem.fused', 'convb', (8, 3, 3, 3)),
    ('stage_1.0.branch_reparam', 'stage1.0.fused', 'convb', (16, 8, 3, 3)),
    ('stage_1.1.branch_reparam', 'stage1.1.fused', 'convb', (16, 16, 3, 3)),
    ('stage_2.0.branch_reparam', 'stage2.0.fused', 'convb', (32, 16, 3, 3)),
]
MMPRETRAIN_HEAD = {'head.fc.weight': (10, 32), 'head.fc.bias': (10,)}

TIMM_TRAIN = [
    ('stem.conv_kxk.conv', 'stem.dense.conv', 'conv', (8, 3, 3, 3)),
    ('stem.conv_kxk.bn', 'stem.dense.bn', 'bn', 8),
    ('stem.conv_1x1.conv', 'stem.pointwise.conv', 'conv', (8, 3, 1, 1)),
    ('stem.conv_1x1.bn', 'stem.pointwise.bn', 'bn', 8),
    ('stages.0.0.conv_kxk.conv', 'stage1.0.dense.conv', 'conv', (16, 8, 3, 3)),
    ('stages.0.0.conv_kxk.bn', 'stage1.0.dense.bn', 'bn', 16),
    ('stages.0.0.conv_1x1.conv', 'stage1.0.pointwise.conv', 'conv', (16, 8, 1, 1)),
    ('stages.0.0.conv_1x1.bn', 'stage1.0.pointwise.bn', 'bn', 16),
    ('stages.0.1.identity', 'stage1.1.identity', 'bn', 16),
    ('stages.0.1.conv_kxk.conv', 'stage1.1.dense.conv', 'conv', (16, 16, 3, 3)),
    ('stages.0.1.conv_kxk.bn', 'stage1.1.dense.bn', 'bn', 16),
    ('stages.0.1.conv_1x1.conv', 'stage1.1.pointwise.conv', 'conv', (16, 16, 1, 1)),
    ('stages.0.1.conv_1x1.bn', 'stage1.1.pointwise.bn', 'bn', 16),
    ('stages.1.0.conv_kxk.conv', 'stage2.0.dense.conv', 'conv', (32, 16, 3, 3)),
    ('stages.1.0.conv_kxk.bn', 'stage2.0.dense.bn', 'bn', 32),
    ('stages.1.0.conv_1x1.conv', 'stage2.0.pointwise.conv', 'conv', (32, 16, 1, 1)),
    ('stages.1.0.conv_1x1.bn', 'stage2.0.pointwise.bn', 'bn', 32),
]
TIMM_SE = [
    ('stages.0.1.attn.fc1', 'stage1.1.se.down', 'convb', (4, 16, 1, 1)),
    ('stages.0.1.attn.fc2', 'stage1.1.se.up', 'convb', (16, 4, 1, 1)),
]
TIMM_DEPLOY = [
    ('stem.reparam_conv', 'stem.fused', 'convb', (8, 3, 3, 3)),
    ('stages.0.0.reparam_conv', 'stage1.0.fused', 'convb', (16, 8, 3, 3)),
    ('stages.0.1.reparam_conv', 'stage1.1.fused', 'convb', (16, 16, 3, 3)),
    ('stages.1.0.reparam_conv', 'stage2.0.fused', 'convb', (32, 16, 3, 3)),
]
TIMM_HEAD = {'head.fc.weight': (10, 32), 'head.fc.bias': (10,)}

# Our own names map onto themselves.
OURS_TRAIN = [(ours, ours, kind, shape) for _, ours, kind, shape in OFFICIAL_TRAIN]
OURS_SE = [(ours, ours, kind, shape) for _, ours, kind, shape in OFFICIAL_SE]
OURS_DEPLOY = [(ours, ours, kind, shape) for _, ours, kind, shape in OFFICIAL_DEPLOY]

TABLES = {
    'official': (OFFICIAL_TRAIN, OFFICIAL_SE, OFFICIAL_DEPLOY, OFFICIAL_HEAD),
    'mmpretrain': (MMPRETRAIN_TRAIN, MMPRETRAIN_SE, MMPRETRAIN_DEPLOY, MMPRETRAIN_HEAD),
    'timm': (TIMM_TRAIN, TIMM_SE, TIMM_DEPLOY, TIMM_HEAD),
    'mmrepvgg': (OURS_TRAIN, OURS_SE, OURS_DEPLOY, {}),
}


def build(rows, head=None, tracked=True, seed=0):
    """Return (source state dict, expected state dict in our names)."""
    gen = torch.Generator().manual_seed(seed)
    src, ours = collections.OrderedDict(), collections.OrderedDict()

    def put(s, o, t):
        src[s] = t
        ours[o] = t

    for s, o, kind, shape in rows:
        if kind in ('conv', 'convb'):
            put(f'{s}.weight', f'{o}.weight', torch.randn(shape, generator=gen))
            if kind == 'convb':
                put(f'{s}.bias', f'{o}.bias', torch.randn(shape[0], generator=gen))
        else:
            for field in BN_FIELDS:
                if field == 'num_batches_tracked':
                    if tracked:
                        put(f'{s}.{field}', f'{o}.{field}', torch.tensor(7))
                else:
                    put(f'{s}.{field}', f'{o}.{field}', torch.rand(shape, generator=gen))
    for key, shape in (head or {}).items():
        src[key] = torch.randn(shape, generator=gen)
    return src, ours


def sample(layout, deploy=False, se=False, head=True, tracked=True):
    train, se_rows, deploy_rows, head_keys = TABLES[layout]
    rows = list(deploy_rows if deploy else train) + (list(se_rows) if se else [])
    return build(rows, head_keys if head else None, tracked=tracked)


# -- a small module with our naming, standing in for the real backbone -----------------
class ConvBN(nn.Module):

    def __init__(self, cin, cout, k):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, bias=False)
        self.bn = nn.BatchNorm2d(cout)


class SE(nn.Module):

    def __init__(self, c, mid):
        super().__init__()
        self.down = nn.Conv2d(c, mid, 1)
        self.up = nn.Conv2d(mid, c, 1)


class Block(nn.Module):

    def __init__(self, cin, cout, identity, deploy, se=False):
        super().__init__()
        if deploy:
            self.fused = nn.Conv2d(cin, cout, 3)
        else:
            self.dense = ConvBN(cin, cout, 3)
            self.pointwise = ConvBN(cin, cout, 1)
            if identity:
                self.identity = nn.BatchNorm2d(cout)
        if se:
            self.se = SE(cout, cout // 4)


class TinyBackbone(nn.Module):

    def __init__(self, deploy=False, se=False, width2=32):
        super().__init__()
        self.stem = Block(3, 8, False, deploy)
        self.stage1 = nn.Sequential(Block(8, 16, False, deploy),
                                    Block(16, 16, True, deploy, se=se))
        self.stage2 = nn.Sequential(Block(16, width2, False, deploy))


# -- detection and mapping -------------------------------------------------------------
@pytest.mark.parametrize('layout', list(TABLES))
@pytest.mark.parametrize('deploy', [False, True])
@pytest.mark.parametrize('se', [False, True])
def test_detect_and_map_each_layout(layout, deploy, se):
    src, expected = sample(layout, deploy=deploy, se=se)
    assert detect_layout(src) == (layout, deploy)
    mapped, info = to_mmrepvgg(src)
    assert list(mapped) == list(expected)
    for key, tensor in expected.items():
        assert torch.equal(mapped[key], tensor), key
    assert info['layout'] == layout and info['deploy'] is deploy
    assert sorted(info['dropped']) == sorted(TABLES[layout][3])
    assert info['unmapped'] == []


def test_mmpretrain_accepts_bn_as_norm_name():
    src, expected = sample('mmpretrain', head=False)
    renamed = {k.replace('.norm.', '.bn.'): v for k, v in src.items()}
    assert 'stage_1.0.branch_3x3.bn.running_var' in renamed
    mapped, _ = to_mmrepvgg(renamed)
    assert set(mapped) == set(expected)


def test_mmpretrain_classifier_checkpoint():
    # What mmpretrain publishes: a whole ImageClassifier under 'state_dict'.
    src, expected = sample('mmpretrain')
    ckpt = {'meta': {'epoch': 120},
            'state_dict': {('backbone.' + k if not k.startswith('head.') else k): v
                           for k, v in src.items()}}
    assert detect_layout(ckpt) == ('mmpretrain', False)
    mapped, info = to_mmrepvgg(ckpt)
    assert set(mapped) == set(expected)
    assert sorted(info['dropped']) == ['head.fc.bias', 'head.fc.weight']


@pytest.mark.parametrize('wrap', [
    lambda sd: {'state_dict': sd},
    lambda sd: {'model': sd},
    lambda sd: {'state_dict_ema': sd, 'epoch': 3},
    lambda sd: {'module.' + k: v for k, v in sd.items()},
    lambda sd: {'state_dict': {'module.' + k: v for k, v in sd.items()}},
    lambda sd: {'model': {'state_dict': sd}},
], ids=['state_dict', 'model', 'state_dict_ema', 'module', 'state_dict+module', 'nested'])
def test_wrappers_are_unwrapped(wrap):
    src, expected = sample('official')
    flat = extract_state_dict(wrap(src))
    assert list(flat) == list(src)
    mapped, info = to_mmrepvgg(wrap(src))
    assert info['layout'] == 'official'
    assert set(mapped) == set(expected)


def test_prefers_raw_weights_over_ema():
    src, _ = sample('official')
    ema = {k: torch.zeros_like(v) for k, v in src.items()}
    flat = extract_state_dict({'state_dict_ema': ema, 'state_dict': src})
    assert all(flat[k] is src[k] for k in src)


def test_runner_whole_model_checkpoint_keeps_backbone_only():
    src, expected = sample('mmrepvgg')
    state = {'backbone.' + k: v for k, v in src.items()}
    state['neck.lateral_convs.0.conv.weight'] = torch.randn(4, 32, 1, 1)
    state['decode_head.conv_seg.weight'] = torch.randn(2, 4, 1, 1)
    state['decode_head.conv_seg.bias'] = torch.randn(2)
    ckpt = {'meta': {'mmengine_version': '0.10.7', 'iter': 2},
            'state_dict': state,
            'message_hub': {'log_scalars': {}, 'runtime_info': {'iter': 2}},
            'optimizer': {'state': {}, 'param_groups': [{'lr': 0.01}]}}
    flat = extract_state_dict(ckpt)
    assert set(flat) == set(src)
    mapped, info = to_mmrepvgg(ckpt)
    assert info['layout'] == 'mmrepvgg' and info['deploy'] is False
    assert set(mapped) == set(expected)
    assert 'decode_head.conv_seg.weight' in info['dropped']
    # DDP-wrapped whole model too
    ddp = dict(ckpt, state_dict={'module.' + k: v for k, v in state.items()})
    assert set(extract_state_dict(ddp)) == set(src)


def test_unknown_layout_names_keys_and_layouts():
    resnet = {'conv1.weight': torch.randn(8, 3, 7, 7), 'bn1.weight': torch.ones(8),
              'layer1.0.conv1.weight': torch.randn(8, 8, 1, 1), 'fc.weight': torch.randn(2, 8)}
    with pytest.raises(ValueError) as err:
        detect_layout(resnet)
    msg = str(err.value)
    assert 'layer1.0.conv1.weight' in msg
    for layout in ('official', 'mmpretrain', 'timm', 'mmrepvgg'):
        assert layout in msg


def test_no_tensors_is_a_clear_error():
    with pytest.raises(ValueError, match='no weights'):
        extract_state_dict({'meta': {'epoch': 1}, 'optimizer': {}})


def test_mixed_deploy_and_training_blocks_rejected():
    src, _ = sample('official')
    fused, _ = sample('official', deploy=True, head=False)
    src = {k: v for k, v in src.items() if not k.startswith('stage2.0.')}
    src.update({k: v for k, v in fused.items() if k.startswith('stage2.0.')})
    with pytest.raises(ValueError, match='mixes deploy'):
        detect_layout(src)


# -- loading into a module -------------------------------------------------------------
@pytest.mark.parametrize('layout', list(TABLES))
@pytest.mark.parametrize('deploy', [False, True])
def test_load_into_module(layout, deploy):
    src, expected = sample(layout, deploy=deploy, se=True)
    model = TinyBackbone(deploy=deploy, se=True)
    info = load_backbone_checkpoint(model, {'state_dict': src})
    assert info['layout'] == layout and info['deploy'] is deploy
    assert info['loaded'] == len(expected) and info['kept_from_model'] == []
    state = model.state_dict()
    assert set(state) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(state[key], tensor), key


def test_official_without_num_batches_tracked_keeps_models():
    src, expected = sample('official', tracked=False)
    assert not any(k.endswith('num_batches_tracked') for k in src)
    model = TinyBackbone()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = load_backbone_checkpoint(model, src)
    assert len(info['kept_from_model']) == 9  # one per batch norm
    state = model.state_dict()
    for key in info['kept_from_model']:
        assert torch.equal(state[key], before[key])
    assert torch.equal(state['stage1.1.identity.running_var'],
                       expected['stage1.1.identity.running_var'])


def test_load_by_path(tmp_path):
    src, expected = sample('official', se=True)
    path = tmp_path / 'RepVGG-tiny-train.pth'
    torch.save(src, path)
    model = TinyBackbone(se=True)
    info = load_backbone_checkpoint(model, str(path))
    assert info['source'] == str(path)
    assert torch.equal(model.state_dict()['stage1.1.se.up.bias'], expected['stage1.1.se.up.bias'])
    # pathlib works too, and a runner-style checkpoint with non-tensor metadata
    ours = {'meta': {'seed': 0}, 'state_dict': {'backbone.' + k: v for k, v in expected.items()},
            'message_hub': {'runtime_info': {'iter': 1}}}
    torch.save(ours, tmp_path / 'iter_1.pth')
    info = load_backbone_checkpoint(TinyBackbone(se=True), tmp_path / 'iter_1.pth')
    assert info['layout'] == 'mmrepvgg'


def test_missing_path_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        load_backbone_checkpoint(TinyBackbone(), tmp_path / 'nope.pth')


def test_deploy_file_into_training_model_explains():
    src, _ = sample('official', deploy=True)
    with pytest.raises(ValueError) as err:
        load_backbone_checkpoint(TinyBackbone(deploy=False), src)
    msg = str(err.value)
    assert 'stem.fused.weight' in msg and 'stage0.rbr_reparam.weight' in msg
    assert 'stem.dense.conv.weight' in msg
    assert 'deploy=True' in msg


def test_training_file_into_deployed_model_explains():
    src, _ = sample('mmpretrain')
    with pytest.raises(ValueError) as err:
        load_backbone_checkpoint(TinyBackbone(deploy=True), src)
    msg = str(err.value)
    assert 'stem.branch_3x3.conv.weight' in msg and 'stem.fused.weight' in msg
    assert 'deploy=False' in msg


def test_missing_and_unexpected_keys_are_listed():
    src, _ = sample('official', head=False)
    del src['stage1.1.rbr_identity.running_var']
    src['stage3.0.rbr_dense.conv.weight'] = torch.randn(64, 32, 3, 3)
    with pytest.raises(ValueError) as err:
        load_backbone_checkpoint(TinyBackbone(), src)
    msg = str(err.value)
    assert '1 missing key(s): stage1.1.identity.running_var' in msg
    assert '1 unexpected key(s): stage3.0.dense.conv.weight' in msg
    assert 'stage3.0.rbr_dense.conv.weight' in msg


def test_se_weights_into_model_without_se_are_unexpected():
    src, _ = sample('timm', se=True)
    with pytest.raises(ValueError, match=r'4 unexpected key\(s\): stage1\.1\.se\.down\.weight'):
        load_backbone_checkpoint(TinyBackbone(se=False), src)


def test_many_missing_keys_are_truncated_with_count():
    src, _ = sample('official')
    src = {k: v for k, v in src.items() if not k.startswith(('stage1.', 'stage2.'))}
    with pytest.raises(ValueError) as err:
        load_backbone_checkpoint(TinyBackbone(), src)
    msg = str(err.value)
    # 41 tensors in stage1/2, less the 7 num_batches_tracked the loader tolerates
    assert '34 missing key(s)' in msg and '(+24 more)' in msg
    assert 'num_batches_tracked' not in msg


def test_shape_mismatch_names_key_and_shapes():
    src, _ = sample('official')
    with pytest.raises(ValueError) as err:
        load_backbone_checkpoint(TinyBackbone(width2=24), src)
    msg = str(err.value)
    assert 'stage2.0.dense.conv.weight: file (32, 16, 3, 3) vs model (24, 16, 3, 3)' in msg


# -- the QARepVGG block ----------------------------------------------------------------
def test_qa_backbone_round_trips_in_training_and_deploy_form(tmp_path):
    from mmrepvgg import RepVGG, reparameterize
    from mmrepvgg.checkpoint import fused_form
    from mmrepvgg.reparam import randomize_norm_stats
    model = randomize_norm_stats(RepVGG('A0', block='qa')).eval()
    torch.save({'state_dict': {'backbone.' + k: v for k, v in model.state_dict().items()}},
               tmp_path / 'qa.pth')
    assert fused_form(torch.load(tmp_path / 'qa.pth')) is False
    loaded = RepVGG('A0', block='qa')
    info = load_backbone_checkpoint(loaded, str(tmp_path / 'qa.pth'))
    assert info['layout'] == 'mmrepvgg' and info['kept_from_model'] == []
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    fused = reparameterize(model)
    assert fused_form(fused.state_dict()) is True
    deployed = RepVGG('A0', block='qa', deploy=True)
    load_backbone_checkpoint(deployed, fused.state_dict())
    assert torch.equal(deployed.stem.fused.weight, fused.stem.fused.weight)


def test_repvgg_weights_into_a_qa_backbone_name_the_block():
    from mmrepvgg import RepVGG
    with pytest.raises(ValueError) as err:
        load_backbone_checkpoint(RepVGG('A0', block='qa'), RepVGG('A0').state_dict())
    msg = str(err.value)
    assert 'missing key(s): stem.pointwise.weight, stem.bn.weight' in msg
    assert 'unexpected key(s): stem.pointwise.conv.weight' in msg
    assert "block (block='repvgg' vs 'qa')" in msg
