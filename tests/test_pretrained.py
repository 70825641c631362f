"""Pretrained loading through init_cfg: release layouts map onto the real backbone."""
import pytest
import torch

from helpers import (MMPRETRAIN_NAMES, OFFICIAL_NAMES, TIMM_NAMES, assert_same_weights,
                     rename, source_model)
from mmrepvgg import RepVGG

@pytest.mark.parametrize('deploy', [False, True])
@pytest.mark.parametrize('layout', ['official', 'mmpretrain', 'timm'])
def test_release_layouts_load_through_init_cfg(layout, deploy, randomize, tmp_path):
    source = source_model(randomize, deploy)
    if layout == 'official':
        state = rename(source.state_dict(), OFFICIAL_NAMES, prefix='module.')
        state['module.linear.weight'] = torch.randn(1000, 1280)
        state['module.linear.bias'] = torch.zeros(1000)
        payload = dict(model=state)
    elif layout == 'mmpretrain':
        state = rename(source.state_dict(), MMPRETRAIN_NAMES, prefix='backbone.')
        state['head.fc.weight'] = torch.randn(1000, 1280)
        payload = dict(meta=dict(), state_dict=state)
    else:
        payload = rename(source.state_dict(), TIMM_NAMES)
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
    torch.save(rename(fused.state_dict(), OFFICIAL_NAMES), tmp_path / 'deploy.pth')
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
