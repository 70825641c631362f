"""Pretrained loading through init_cfg: release layouts map onto the real backbone."""
import re

import pytest
import torch

from mmrepvgg import RepVGG, reparameterize

# Our names -> the official release's, written out by hand (not from the loader's table).
OFFICIAL = [(r'^stem\.', 'stage0.'), (r'\.dense\.', '.rbr_dense.'),
            (r'\.pointwise\.', '.rbr_1x1.'), (r'\.identity\.', '.rbr_identity.'),
            (r'\.fused\.', '.rbr_reparam.')]
MMPRETRAIN = [(r'^stage(\d)\.', r'stage_\1.'), (r'\.dense\.bn\.', '.branch_3x3.norm.'),
              (r'\.dense\.conv\.', '.branch_3x3.conv.'),
              (r'\.pointwise\.bn\.', '.branch_1x1.norm.'),
              (r'\.pointwise\.conv\.', '.branch_1x1.conv.'),
              (r'\.identity\.', '.branch_norm.'), (r'\.fused\.', '.branch_reparam.')]

# timm's byobnet names (stages counted from 0)
TIMM = [(r'^stage(\d)\.', lambda m: f'stages.{int(m.group(1)) - 1}.'),
        (r'\.dense\.', '.conv_kxk.'), (r'\.pointwise\.', '.conv_1x1.'),
        (r'\.fused\.', '.reparam_conv.')]


def rename(state, rules, prefix=''):
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[prefix + key] = value.clone()
    return out


def source_model(randomize, deploy=False):
    model = randomize(RepVGG('A0'), seed=5).eval()
    return reparameterize(model) if deploy else model


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize('deploy', [False, True])
@pytest.mark.parametrize('layout', ['official', 'mmpretrain', 'timm'])
def test_release_layouts_load_through_init_cfg(layout, deploy, randomize, tmp_path):
    source = source_model(randomize, deploy)
    if layout == 'official':
        state = rename(source.state_dict(), OFFICIAL, prefix='module.')
        state['module.linear.weight'] = torch.randn(1000, 1280)
        state['module.linear.bias'] = torch.zeros(1000)
        payload = dict(model=state)
    elif layout == 'mmpretrain':
        state = rename(source.state_dict(), MMPRETRAIN, prefix='backbone.')
        state['head.fc.weight'] = torch.randn(1000, 1280)
        payload = dict(meta=dict(), state_dict=state)
    else:
        payload = rename(source.state_dict(), TIMM)
        payload['head.fc.weight'] = torch.randn(1000, 1280)
    path = tmp_path / f'{layout}.pth'
    torch.save(payload, path)
    target = RepVGG('A0', deploy=deploy, init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    target.init_weights()
    assert_same_weights(source, target)


def test_whole_model_checkpoint_of_ours_loads_backbone_only(randomize, tmp_path):
    source = source_model(randomize)
    state = {f'backbone.{k}': v for k, v in source.state_dict().items()}
    state['decode_head.conv_seg.weight'] = torch.zeros(19, 512, 1, 1)
    torch.save(dict(meta=dict(), state_dict=state), tmp_path / 'seg.pth')
    target = RepVGG('A0', init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'seg.pth')))
    target.init_weights()
    assert_same_weights(source, target)


def test_deploy_file_into_training_model_names_keys(randomize, tmp_path):
    fused = source_model(randomize, deploy=True)
    torch.save(rename(fused.state_dict(), OFFICIAL), tmp_path / 'deploy.pth')
    target = RepVGG('A0', init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'deploy.pth')))
    fused_key = r'deploy.*stem\.fused\.weight|stem\.fused\.weight.*deploy'
    with pytest.raises(ValueError, match=fused_key):
        target.init_weights()


def test_missing_pretrained_file_says_where_to_put_it(tmp_path):
    path = str(tmp_path / 'checkpoints' / 'RepVGG-B1g2-train.pth')
    model = RepVGG('A0', init_cfg=dict(type='Pretrained', checkpoint=path))
    with pytest.raises(FileNotFoundError, match='init_cfg=None') as err:
        model.init_weights()
    assert path in str(err.value)


def test_wrong_arch_file_names_mismatched_keys(randomize, tmp_path):
    torch.save(source_model(randomize).state_dict(), tmp_path / 'a0.pth')
    model = RepVGG('B0', init_cfg=dict(type='Pretrained', checkpoint=str(tmp_path / 'a0.pth')))
    with pytest.raises(ValueError, match='stage'):
        model.init_weights()
