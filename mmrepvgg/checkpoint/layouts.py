"""Recognise RepVGG checkpoint layouts and map them onto our backbone's names.

Our backbone's state dict (training form / deploy form)::

    stem.dense.conv.weight             stem.fused.weight
    stem.dense.bn.{weight,bias,running_mean,running_var,num_batches_tracked}
    stem.pointwise.conv.weight         stem.fused.bias
    stem.pointwise.bn.*
    stage1.1.identity.*                (only where in == out and stride 1)
    block='qa' (QARepVGG): stem.dense.*, stem.pointwise.weight (no norm), stem.bn.*
    (the norm after the branch sum); its identity branch has no weights
    stage3.5.se.down.{weight,bias}     stage3.5.se.up.{weight,bias}

Supported source layouts: the official RepVGG release (``stage0.rbr_dense...``),
mmpretrain (``backbone.stage_1.0.branch_3x3...``), timm's byobnet
(``stages.0.0.conv_kxk...``) and our own (bare, or inside a whole-model runner
checkpoint). Everything is driven by the one table :data:`LAYOUTS`.
"""
import re
from collections.abc import Mapping
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ['LAYOUTS', 'extract_state_dict', 'detect_layout', 'to_mmrepvgg', 'fused_form',
           'CheckpointInfo', 'describe_checkpoint', 'whole_model_needed']

# Per layout: how a block is addressed (regex with optional groups ``s`` =
# stage and ``i`` = block index, plus the offset from its stage numbering to
# ours), how each branch is named (source prefix -> our prefix), and which
# keys are the classifier head (dropped: detectors/segmentors have their own).
LAYOUTS: Dict[str, Dict[str, Any]] = {
    'mmrepvgg': dict(
        blocks=(r'stem\.', r'stage(?P<s>[1-4])\.(?P<i>\d+)\.'),
        stage_offset=0,
        # Our own names, kept as they are (both block types).
        branches={b: b for b in ('dense.', 'pointwise.', 'identity.', 'bn.', 'fused.',
                                 'se.down.', 'se.up.')},
        head=None),
    'official': dict(
        blocks=(r'stage0\.', r'stage(?P<s>[1-4])\.(?P<i>\d+)\.'),
        stage_offset=0,
        branches={
            'rbr_dense.conv.': 'dense.conv.', 'rbr_dense.bn.': 'dense.bn.',
            'rbr_1x1.conv.': 'pointwise.conv.', 'rbr_1x1.bn.': 'pointwise.bn.',
            'rbr_identity.': 'identity.', 'rbr_reparam.': 'fused.',
            'se.down.': 'se.down.', 'se.up.': 'se.up.'},
        head=r'linear\.'),
    'mmpretrain': dict(
        blocks=(r'stem\.', r'stage_(?P<s>[1-4])\.(?P<i>\d+)\.'),
        stage_offset=0,
        branches={
            # mmpretrain names the BN 'norm'; ConvModule-built ones say 'bn'.
            'branch_3x3.conv.': 'dense.conv.', 'branch_3x3.norm.': 'dense.bn.',
            'branch_3x3.bn.': 'dense.bn.',
            'branch_1x1.conv.': 'pointwise.conv.', 'branch_1x1.norm.': 'pointwise.bn.',
            'branch_1x1.bn.': 'pointwise.bn.',
            'branch_norm.': 'identity.', 'branch_reparam.': 'fused.',
            'se_layer.conv1.conv.': 'se.down.', 'se_layer.conv2.conv.': 'se.up.'},
        head=r'head\.'),
    'timm': dict(
        # timm counts stages from 0 (stages.0 is our stage1).
        blocks=(r'stem\.', r'stages\.(?P<s>[0-3])\.(?P<i>\d+)\.'),
        stage_offset=1,
        branches={
            'conv_kxk.conv.': 'dense.conv.', 'conv_kxk.bn.': 'dense.bn.',
            'conv_1x1.conv.': 'pointwise.conv.', 'conv_1x1.bn.': 'pointwise.bn.',
            'identity.': 'identity.', 'reparam_conv.': 'fused.',
            'attn.fc1.': 'se.down.', 'attn.fc2.': 'se.up.'},
        head=r'head\.'),
}

# Wrappers seen around a state dict, in order of preference: a timm training
# checkpoint has both 'state_dict' and 'state_dict_ema'; take the raw weights.
_WRAPPER_KEYS = ('state_dict', 'model', 'module', 'state_dict_ema', 'model_ema')
_TRAINING_BRANCHES = ('dense.', 'pointwise.', 'identity.', 'bn.')
_DEPLOY_BRANCH = 'fused.'
_OUR_BLOCK = re.compile(r'^(stem|stage[1-4]\.\d+)\.(?P<branch>[a-z]+\.)')


def list_examples(keys: Iterable[str], limit: int = 10) -> str:
    keys = list(keys)
    shown = ', '.join(keys[:limit])
    return shown + (f', ... (+{len(keys) - limit} more)' if len(keys) > limit else '')


def _unwrap(obj: Any) -> Dict[str, torch.Tensor]:
    """The name->tensor dict inside any checkpoint object (wrappers and a DataParallel
    ``module.`` prefix removed)."""
    for _ in range(len(_WRAPPER_KEYS) + 1):
        if isinstance(obj, nn.Module):
            obj = obj.state_dict()
        if not isinstance(obj, Mapping):
            raise TypeError(f'expected a checkpoint dict, got {type(obj).__name__}')
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS
                      if isinstance(obj.get(k), (Mapping, nn.Module))), None)
        if inner is None:
            break
        obj = inner
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError('no weights found in the checkpoint; its top-level keys '
                         f'are: {list_examples(map(str, obj.keys()))}')
    # DataParallel / DistributedDataParallel prefix every key with 'module.'.
    if all(k.startswith('module.') for k in tensors):
        tensors = {k[len('module.'):]: v for k, v in tensors.items()}
    return tensors


def _extract(obj: Any) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """extract_state_dict, also returning the non-backbone keys it left out."""
    tensors = _unwrap(obj)
    # A whole model (classifier, detector, segmentor): keep only the backbone.
    if any(k.startswith('backbone.') for k in tensors):
        ignored = [k for k in tensors if not k.startswith('backbone.')]
        tensors = {k[len('backbone.'):]: v for k, v in tensors.items()
                   if k.startswith('backbone.')}
        return tensors, ignored
    return tensors, []


def extract_state_dict(obj: Any) -> Dict[str, torch.Tensor]:
    """Return the backbone's name->tensor dict from any checkpoint object.

    Unwraps ``state_dict`` / ``model`` / ``state_dict_ema`` style wrappers,
    strips a ``module.`` prefix and, for a whole model's weights, keeps only
    the ``backbone.`` sub-dict (with the prefix removed).
    """
    return _extract(obj)[0]


def _map_key(layout: Dict[str, Any], key: str) -> Optional[str]:
    """Our name for ``key`` under ``layout``; None if it is not a block key."""
    for pattern in layout['blocks']:
        m = re.match(pattern, key)
        if not m:
            continue
        if m.groupdict().get('s') is None:
            block = 'stem.'
        else:
            block = f"stage{int(m['s']) + layout['stage_offset']}.{m['i']}."
        rest = key[m.end():]
        for src, dst in layout['branches'].items():
            if rest.startswith(src):
                return block + dst + rest[len(src):]
        return None
    return None


def _is_head(layout: Dict[str, Any], key: str) -> bool:
    return layout['head'] is not None and re.match(layout['head'], key) is not None


def split_by_form(keys: Iterable[str]) -> Tuple[List[str], List[str]]:
    """Split our-named keys into (deploy-form keys, training-form keys)."""
    deploy, training = [], []
    for key in keys:
        m = _OUR_BLOCK.match(key)
        if not m:
            continue
        branch = m['branch']
        if branch == _DEPLOY_BRANCH:
            deploy.append(key)
        elif branch in _TRAINING_BRANCHES:
            training.append(key)
    return deploy, training


def map_state_dict(obj: Any) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], Dict[str, str]]:
    """Map to our names. Returns (state dict, info, our name -> source name)."""
    state_dict, ignored = _extract(obj)
    keys = list(state_dict)
    best_name, best_hits = None, 0
    for name, layout in LAYOUTS.items():  # ties go to the earlier entry
        hits = sum(_map_key(layout, k) is not None for k in keys)
        if hits > best_hits:
            best_name, best_hits = name, hits
    if best_name is not None:
        layout = LAYOUTS[best_name]
        body = [k for k in keys if not _is_head(layout, k)]
    # Most keys must fit, or e.g. a ResNet's 'stem.' keys would look like ours.
    if best_name is None or best_hits * 2 < len(body):
        raise ValueError(
            'unrecognised checkpoint layout; keys seen: '
            f'{list_examples(keys, 8)}. Supported layouts: {", ".join(LAYOUTS)} '
            '(official RepVGG release, mmpretrain, timm byobnet, mmrepvgg).')

    mapped: Dict[str, torch.Tensor] = {}
    origin: Dict[str, str] = {}
    dropped, unmapped = list(ignored), []
    for key in keys:
        if _is_head(layout, key):
            dropped.append(key)
            continue
        ours = _map_key(layout, key)
        if ours is None:
            # Kept under its own name so the loader reports it as unexpected.
            ours = key
            unmapped.append(key)
        if ours in mapped:
            raise ValueError(f'checkpoint keys {origin[ours]!r} and {key!r} both '
                             f'map to {ours!r}')
        mapped[ours] = state_dict[key]
        origin[ours] = key

    deploy, training = split_by_form(mapped)
    if deploy and training:
        raise ValueError(
            'checkpoint mixes deploy-form (fused) and training-form blocks, e.g. '
            f'{origin[deploy[0]]} and {origin[training[0]]}; fuse or convert all '
            'blocks consistently.')
    if not deploy and not training:
        raise ValueError('checkpoint has no RepVGG conv branches; keys seen: '
                         f'{list_examples(keys, 8)}')
    info = dict(layout=best_name, deploy=bool(deploy), dropped=dropped,
                unmapped=unmapped)
    return mapped, info, origin


def detect_layout(state_dict: Any) -> Tuple[str, bool]:
    """Return ``(layout, is_deploy)``; layout is one of :data:`LAYOUTS`.

    Raises ValueError for an unknown layout, listing some of the keys seen.
    """
    info = map_state_dict(state_dict)[1]
    return info['layout'], info['deploy']


def fused_form(obj: Any) -> Optional[bool]:
    """True for a checkpoint object holding a deploy-form RepVGG backbone, False for a
    training-form one, None when it holds no RepVGG backbone (e.g. a ResNet baseline)."""
    try:
        return detect_layout(extract_state_dict(obj))[1]
    except ValueError:
        return None


class CheckpointInfo(NamedTuple):
    """What a checkpoint holds (see :func:`describe_checkpoint`)."""
    #: 'model': a whole detector or segmentor (backbone, neck, heads); 'backbone': a
    #: backbone's weights alone, as release files hold them (a classifier's head aside)
    holds: str
    #: the RepVGG backbone's key layout (one of :data:`LAYOUTS`), None without one
    layout: Optional[str]
    #: True for a fused (deploy-form) RepVGG backbone, False for a training-form one,
    #: None without a RepVGG backbone
    deploy: Optional[bool]
    #: the classifier head a backbone release carries, e.g. 'linear.weight'; None if none
    head: Optional[str]

    def __str__(self) -> str:
        form = {True: 'fused', False: 'training-form', None: 'non-RepVGG'}[self.deploy]
        if self.holds == 'model':
            return f'a whole model (backbone, neck and heads) with a {form} backbone'
        if self.layout is None:
            return 'a backbone only, of no RepVGG layout'
        head = ', with its ImageNet classifier head' if self.head else ''
        return f'a {form} RepVGG backbone only ({self.layout} layout{head})'


# What a classifier holds besides its backbone (mmpretrain: head.fc; the neck pools).
_CLASSIFIER_PARTS = ('head.', 'neck.', 'data_preprocessor.')


def describe_checkpoint(obj: Any) -> CheckpointInfo:
    """Whether a loaded checkpoint is a whole model or a backbone release, and its
    RepVGG backbone's layout and form. A classifier's checkpoint (mmpretrain, timm, the
    official release) counts as a backbone: its head serves no detector or segmentor."""
    tensors = _unwrap(obj)
    outside = [k for k in tensors if not k.startswith('backbone.')]
    holds = 'model' if (len(outside) < len(tensors) and not all(
        k.startswith(_CLASSIFIER_PARTS) for k in outside)) else 'backbone'
    try:
        _, info, _ = map_state_dict(tensors)
    except ValueError:  # no RepVGG backbone (a ResNet, an unknown layout)
        return CheckpointInfo(holds, None, None, None)
    head = next((k for k in info['dropped'] if not k.startswith(('neck.',
                                                                 'data_preprocessor.'))),
                None) if holds == 'backbone' else None
    return CheckpointInfo(holds, info['layout'], info['deploy'], head)


def whole_model_needed(source: str, info: CheckpointInfo, request: str) -> str:
    """The error for a backbone release given where a whole model's weights are needed."""
    return (f'{source} holds {info}, but {request} needs the weights of a whole model '
            '(backbone, neck and heads), such as the checkpoint tools/train.py writes '
            '(work_dir/iter_N.pth) or its fused form from tools/convert.py. A backbone '
            "file starts a training (model.backbone.init_cfg=dict(type='Pretrained', "
            "checkpoint=...)) or exports alone (tools/export.py --part backbone).")


def to_mmrepvgg(state_dict: Any) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Map a checkpoint of any supported layout to our backbone's names.

    Returns ``(state_dict, info)`` with info ``{'layout', 'deploy', 'dropped',
    'unmapped'}``: ``dropped`` are the classifier-head (and, for a whole model,
    non-backbone) keys left out; ``unmapped`` are keys kept under their own
    name because no rule matched them.
    """
    mapped, info, _ = map_state_dict(state_dict)
    return mapped, info
