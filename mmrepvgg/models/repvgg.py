"""The RepVGG backbone: one arch table drives the construction of every variant."""
from contextlib import nullcontext
from functools import lru_cache, partial
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
import torch.utils.checkpoint as cp
from mmengine.model import BaseModule
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..registry import MODELS
from .fusion import is_batch_norm
from .rep_block import BLOCKS, RepVGGBlock

# Even-numbered layers of stages 1-4 (numbered from 1 across stages) are grouped in the
# g2/g4 variants; 26 is the last even layer of the 27-layer B family.
_EVEN_LAYERS = tuple(range(2, 27, 2))


def _grouped(groups: int) -> Dict[int, int]:
    return {layer: groups for layer in _EVEN_LAYERS}


_A_BLOCKS, _B_BLOCKS = (2, 4, 14, 1), (4, 6, 16, 1)

ARCH_SETTINGS = {
    'A0': dict(num_blocks=_A_BLOCKS, width_factors=(0.75, 0.75, 0.75, 2.5)),
    'A1': dict(num_blocks=_A_BLOCKS, width_factors=(1, 1, 1, 2.5)),
    'A2': dict(num_blocks=_A_BLOCKS, width_factors=(1.5, 1.5, 1.5, 2.75)),
    'B0': dict(num_blocks=_B_BLOCKS, width_factors=(1, 1, 1, 2.5)),
    'B1': dict(num_blocks=_B_BLOCKS, width_factors=(2, 2, 2, 4)),
    'B1g2': dict(num_blocks=_B_BLOCKS, width_factors=(2, 2, 2, 4), groups=_grouped(2)),
    'B1g4': dict(num_blocks=_B_BLOCKS, width_factors=(2, 2, 2, 4), groups=_grouped(4)),
    'B2': dict(num_blocks=_B_BLOCKS, width_factors=(2.5, 2.5, 2.5, 5)),
    'B2g2': dict(num_blocks=_B_BLOCKS, width_factors=(2.5, 2.5, 2.5, 5), groups=_grouped(2)),
    'B2g4': dict(num_blocks=_B_BLOCKS, width_factors=(2.5, 2.5, 2.5, 5), groups=_grouped(4)),
    'B3': dict(num_blocks=_B_BLOCKS, width_factors=(3, 3, 3, 5)),
    'B3g2': dict(num_blocks=_B_BLOCKS, width_factors=(3, 3, 3, 5), groups=_grouped(2)),
    'B3g4': dict(num_blocks=_B_BLOCKS, width_factors=(3, 3, 3, 5), groups=_grouped(4)),
    'D2se': dict(num_blocks=(8, 14, 24, 1), width_factors=(2.5, 2.5, 2.5, 5), se_ratio=16),
}

# What a custom arch dict may hold, with defaults for the optional keys.
_ARCH_KEYS = dict(num_blocks=None, width_factors=None, groups=None, se_ratio=None)
_BASE_WIDTHS = (64, 128, 256, 512)


def resolve_arch(arch: Union[str, dict]) -> dict:
    """An arch name or a custom dict, validated and with defaults filled in.

    A custom dict holds ``num_blocks`` (4 ints), ``width_factors`` (4 numbers),
    optionally ``groups`` ({layer number: groups}, layers counted from 1 at the first block
    of stage 1) and ``se_ratio`` (squeeze-excitation reduction, None for none).
    """
    if isinstance(arch, str):
        if arch not in ARCH_SETTINGS:
            raise KeyError(f'unknown RepVGG arch {arch!r}; valid names: '
                           f'{", ".join(ARCH_SETTINGS)} (or a dict with keys '
                           f'{", ".join(_ARCH_KEYS)})')
        arch = ARCH_SETTINGS[arch]
    if not isinstance(arch, dict):
        raise TypeError(f'arch must be a name or a dict, got {type(arch).__name__}')
    unknown = set(arch) - set(_ARCH_KEYS)
    missing = {'num_blocks', 'width_factors'} - set(arch)
    if unknown or missing:
        raise KeyError(f'bad custom arch dict: unknown keys {sorted(unknown)}, missing keys '
                       f'{sorted(missing)}; allowed keys: {", ".join(_ARCH_KEYS)}')
    arch = {**_ARCH_KEYS, **arch}
    if len(arch['num_blocks']) != 4 or len(arch['width_factors']) != 4:
        raise ValueError('num_blocks and width_factors need one entry per stage 1-4, got '
                         f'{arch["num_blocks"]} and {arch["width_factors"]}')
    arch['groups'] = dict(arch['groups'] or {})
    return arch


def arch_channels(arch: Union[str, dict]) -> Tuple[int, ...]:
    """Output channels of stages 1-4, e.g. for a neck's ``in_channels`` in a config."""
    factors = resolve_arch(arch)['width_factors']
    return tuple(int(base * f) for base, f in zip(_BASE_WIDTHS, factors))


def _per_stage(name: str, value: Sequence, allowed: str) -> tuple:
    if len(value) != 4:
        raise ValueError(f'{name} needs one value per stage 1-4 ({allowed}), got {value}')
    return tuple(value)


# Gradient checkpointing runs a block's forward a second time in backward. Batch norms in
# training mode would then update their running statistics twice per step (and fusion
# folds those statistics into the deployed weights), and synchronized ones would
# communicate again inside backward. The recomputation therefore runs on copies of the
# block's buffers, and its collectives hand back what they returned in the forward, so the
# norms normalize with the same batch statistics without touching the real ones.

@lru_cache(maxsize=None)
def _replayable_collectives() -> frozenset:
    """c10d ops whose first argument receives the result, returned with their work."""
    if not dist.is_available():
        return frozenset()
    names = ('allreduce_', 'allgather_', '_allgather_base_', 'broadcast_',
             'reduce_scatter_', '_reduce_scatter_base_')
    return frozenset(getattr(torch.ops.c10d, n) for n in names
                     if hasattr(torch.ops.c10d, n))


class _RecordCollectives(TorchDispatchMode):
    """Runs the forward of a checkpointed block, keeping a copy of what each collective
    returned (a few values per norm: the synchronized batch statistics)."""

    def __init__(self, tape: List[Tuple[Any, List[Tensor]]]):
        super().__init__()
        self.tape, self.ops = tape, _replayable_collectives()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func.overloadpacket in self.ops:
            outputs, work = result
            # an asynchronous collective's values exist only once its work is done
            torch._C._distributed_c10d.Work.unbox(work).wait()
            self.tape.append((func, [t.detach().clone() for t in tree_leaves(outputs)]))
        return result


class _ReplayCollectives(TorchDispatchMode):
    """Runs the recomputation: each collective writes what it returned in the forward
    into its outputs, without communicating."""

    def __init__(self, tape: List[Tuple[Any, List[Tensor]]]):
        super().__init__()
        self.tape, self.ops, self.position = tape, _replayable_collectives(), 0

    def __enter__(self):
        self.position = 0  # each backward (retain_graph) recomputes from the start
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket not in self.ops:
            return func(*args, **(kwargs or {}))
        outputs = args[0]
        targets = tree_leaves(outputs)
        recorded = self.tape[self.position] if self.position < len(self.tape) else None
        if (recorded is None or recorded[0] != func
                or [t.shape for t in targets] != [v.shape for v in recorded[1]]):
            ran = 'nothing more' if recorded is None else str(recorded[0])
            raise RuntimeError(
                f'with_cp: recomputing a checkpointed block ran collective {func} '
                f'({[tuple(t.shape) for t in targets]}) as its collective number '
                f'{self.position + 1}, where the forward ran {ran}: the block must run the '
                'same collectives each time it runs')
        self.position += 1
        for target, value in zip(targets, recorded[1]):
            target.copy_(value)
        from torch._C._distributed_c10d import FakeWork  # a work that is done
        return outputs, FakeWork().boxed()


class _Recomputation:
    """The context of a checkpointed block's recomputation: its modules see copies of
    their buffers (the running statistics are updated in the forward only), and
    collectives are replayed when ``replay`` is given. Re-enterable, as every backward
    through a retained graph recomputes."""

    def __init__(self, block: nn.Module, replay: Optional[_ReplayCollectives]):
        self.block, self.replay, self.kept = block, replay, []

    def __enter__(self) -> '_Recomputation':
        for module in self.block.modules():
            for name, buffer in module.named_buffers(recurse=False):
                self.kept.append((module, name, buffer))
                setattr(module, name, buffer.clone())
        if self.replay is not None:
            self.replay.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        try:
            if self.replay is not None:
                self.replay.__exit__(*exc)
        finally:
            for module, name, buffer in self.kept:
                setattr(module, name, buffer)
            self.kept = []
        return False


def _synchronizes(module: nn.Module) -> bool:
    """torch's SyncBatchNorm and mmcv's (which is no torch _BatchNorm) communicate."""
    return isinstance(module, nn.SyncBatchNorm) or (
        is_batch_norm(module) and not isinstance(module, _BatchNorm))


def _checkpoint_contexts(block: nn.Module) -> Tuple[Any, _Recomputation]:
    """``context_fn`` of ``torch.utils.checkpoint``: (forward context, recompute context)."""
    # The dispatch modes see every op of the block: only where a norm may communicate
    # (a synchronized norm in eval mode, e.g. with norm_eval, does not).
    if (dist.is_available() and dist.is_initialized()
            and any(_synchronizes(m) and m.training for m in block.modules())):
        tape = []
        return _RecordCollectives(tape), _Recomputation(block, _ReplayCollectives(tape))
    return nullcontext(), _Recomputation(block, None)


@MODELS.register_module()
class RepVGG(BaseModule):
    """RepVGG backbone (Ding et al., CVPR 2021) for detection and segmentation.

    A PyTorch implementation of `RepVGG: Making VGG-style ConvNets Great Again
    <https://arxiv.org/abs/2101.03697>`_. Trained with three branches per block (3x3 conv
    + BN, 1x1 conv + BN, identity BN), it fuses into plain 3x3 conv + ReLU blocks for
    inference (:func:`mmrepvgg.reparameterize`, or ``deploy=True`` to build that form).

    Args:
        arch (str | dict): The architecture, a name of ``ARCH_SETTINGS`` ('A0', 'A1',
            'A2', 'B0', 'B1', 'B1g2', 'B1g4', 'B2', 'B2g2', 'B2g4', 'B3', 'B3g2',
            'B3g4', 'D2se') or a dict with the keys ``num_blocks`` (blocks of stages 1-4,
            4 ints), ``width_factors`` (widths of stages 1-4 relative to 64, 128, 256,
            512; 4 numbers) and optionally ``groups`` ({layer number: groups}, layers
            counted from 1 at the first block of stage 1) and ``se_ratio``
            (squeeze-excitation reduction, None for none); see ``resolve_arch``.
            Defaults to 'B1g2'.
        in_channels (int): Number of input image channels. Defaults to 3.
        out_indices (Sequence[int]): Which of stages 1-4 (0-3, as in ResNet) to
            return. Stages after the last one listed are not built: nothing would use
            or train them (DDP with ``find_unused_parameters=False`` fails on parameters
            without gradients), and pretrained files load with their weights left
            unused. Defaults to ``(0, 1, 2, 3)``.
        strides (Sequence[int]): Stride of the first block of each of stages 1-4.
            Defaults to ``(2, 2, 2, 2)``.
        dilations (Sequence[int]): Dilation of each of stages 1-4, e.g.
            ``(1, 1, 2, 4)`` with strides ``(2, 2, 1, 1)`` for output stride 8.
            Defaults to ``(1, 1, 1, 1)``.
        num_dilated_blocks (Sequence[int | None]): Per stage, how many of its last
            blocks take its dilation (None: all). RepVGG-B1g2-fast dilates only the
            last 4 blocks of stage 3. Defaults to ``(None, None, None, None)``.
        frozen_stages (int): Stages to freeze (eval mode, no gradients): -1 none, 0 the
            stem, k the stem and stages 1..k. Defaults to -1.
        norm_eval (bool): Whether to keep the batch norms in eval mode while training
            (their running statistics frozen). Defaults to False.
        with_cp (bool): Whether to use gradient checkpointing on each block, to save
            memory. The recomputation in backward normalizes with the batch statistics
            of the forward and leaves the running statistics alone (no second update,
            no second SyncBN synchronization): a step gives the same running statistics
            and gradients as without it. Defaults to False.
        norm_cfg (dict): Config dict of the batch norms of every branch (e.g.
            ``dict(type='SyncBN', requires_grad=True)``, or ``'MMSyncBN'``, mmcv's).
            Defaults to ``dict(type='BN', requires_grad=True)``.
        act_cfg (dict): Config dict of the activation after each block.
            Defaults to ``dict(type='ReLU')``.
        deploy (bool): Whether to build the fused form directly (plain 3x3 conv + ReLU
            blocks), e.g. to load a fused checkpoint. Defaults to False.
        block (str): The training-form block: ``'repvgg'`` (RepVGG's three branches
            with a batch norm each) or ``'qa'`` (QARepVGG: norms only on the 3x3 branch
            and after the sum, for models that will be quantized to INT8). Both fuse
            into the same deploy form. Defaults to ``'repvgg'``.
        init_cfg (dict | list[dict], optional): Initialization config dict, e.g.
            ``dict(type='Pretrained', checkpoint=...)`` with a release file of the
            official, mmpretrain or timm layout or a whole-model checkpoint of this
            project (training form; fused with ``deploy=True``). Defaults to None.

    Example:
        >>> import torch
        >>> from mmrepvgg import RepVGG
        >>> model = RepVGG('A0', out_indices=(2, 3)).eval()
        >>> for out in model(torch.rand(1, 3, 64, 64)):
        ...     print(tuple(out.shape))
        (1, 192, 4, 4)
        (1, 1280, 2, 2)
    """

    def __init__(self, arch: Union[str, dict] = 'B1g2', in_channels: int = 3,
                 out_indices: Sequence[int] = (0, 1, 2, 3),
                 strides: Sequence[int] = (2, 2, 2, 2),
                 dilations: Sequence[int] = (1, 1, 1, 1),
                 num_dilated_blocks: Sequence[Optional[int]] = (None, None, None, None),
                 frozen_stages: int = -1, norm_eval: bool = False, with_cp: bool = False,
                 norm_cfg: dict = dict(type='BN', requires_grad=True),
                 act_cfg: dict = dict(type='ReLU'), deploy: bool = False,
                 block: str = 'repvgg', init_cfg: Optional[Union[dict, list]] = None):
        super().__init__(init_cfg=init_cfg)
        self.arch = resolve_arch(arch)
        if block not in BLOCKS:
            raise KeyError(f'unknown RepVGG block {block!r}; valid names: '
                           f'{", ".join(BLOCKS)}')
        self.block_type = block
        block_cls = BLOCKS[block]
        strides = _per_stage('strides', strides, 'usually 1 or 2')
        dilations = _per_stage('dilations', dilations, 'e.g. (1, 1, 2, 4) for stride 8')
        num_dilated_blocks = _per_stage('num_dilated_blocks', num_dilated_blocks,
                                        'None for all blocks')
        out_indices = tuple(out_indices)
        if not out_indices or any(i not in range(4) for i in out_indices):
            raise ValueError(f'out_indices must be a non-empty subset of 0-3 (stages 1-4), '
                             f'got {out_indices}')
        if frozen_stages not in range(-1, 5):
            raise ValueError(f'frozen_stages must be in -1..4, got {frozen_stages}')
        self.out_indices, self.frozen_stages = out_indices, frozen_stages
        self.norm_eval, self.with_cp, self.deploy = norm_eval, with_cp, deploy

        stage_channels = arch_channels(self.arch)
        self.stem_channels = min(64, stage_channels[0])
        block_args = dict(norm_cfg=norm_cfg, act_cfg=act_cfg, deploy=deploy,
                          se_ratio=self.arch['se_ratio'])
        self.stem = block_cls(in_channels, self.stem_channels, stride=2, **block_args)

        self.stage_names = []
        layer, channels = 1, self.stem_channels
        last = max(out_indices)
        #: the stages after the last output, not built (their pretrained weights unused)
        self.unbuilt_stages = tuple(f'stage{i + 1}' for i in range(last + 1, 4))
        for i, (depth, width) in enumerate(zip(self.arch['num_blocks'][:last + 1],
                                               stage_channels)):
            blocks = []
            dilated_from = depth - (depth if num_dilated_blocks[i] is None
                                    else num_dilated_blocks[i])
            for j in range(depth):
                blocks.append(block_cls(
                    channels, width, stride=strides[i] if j == 0 else 1,
                    dilation=dilations[i] if j >= dilated_from else 1,
                    groups=self.arch['groups'].get(layer, 1), **block_args))
                layer, channels = layer + 1, width
            name = f'stage{i + 1}'
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
        #: channels of every stage 1-4 of the arch (built or not), and of the outputs
        #: this backbone returns
        self.stage_channels = stage_channels
        self.out_channels = tuple(stage_channels[i] for i in out_indices)
        self._freeze_stages()

    def _run_block(self, block: nn.Module, x: Tensor) -> Tensor:
        # Non-reentrant checkpointing needs no input gradient, so the stem and the first
        # trainable block after frozen stages are checkpointed too; frozen blocks keep
        # no activations for backward anyway.
        if (self.with_cp and torch.is_grad_enabled()
                and any(p.requires_grad for p in block.parameters())):
            if torch.compiler.is_compiling():  # compiled checkpoints take dispatch modes only
                return cp.checkpoint(block, x, use_reentrant=False)
            return cp.checkpoint(block, x, use_reentrant=False,
                                 context_fn=partial(_checkpoint_contexts, block))
        return block(x)

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        x = self._run_block(self.stem, x)
        outs = []
        for i, name in enumerate(self.stage_names):
            for block in getattr(self, name):
                x = self._run_block(block, x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)

    def _freeze_stages(self) -> None:
        frozen = [self.stem] if self.frozen_stages >= 0 else []
        frozen += [getattr(self, n) for n in self.stage_names[:max(self.frozen_stages, 0)]]
        for module in frozen:
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> 'RepVGG':
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if is_batch_norm(module):
                    module.eval()
        return self

    def switch_to_deploy(self) -> None:
        """Fuse every block; the backbone then computes the same eval-mode outputs."""
        for module in self.modules():
            if isinstance(module, RepVGGBlock):
                module.switch_to_deploy()
        self.deploy = True

    def init_weights(self) -> None:
        # Release files come in several key layouts; map them instead of letting
        # mmengine's Pretrained initializer load keys that do not match.
        if isinstance(self.init_cfg, dict) and self.init_cfg.get('type') == 'Pretrained':
            from ..checkpoint.backbone import load_backbone_checkpoint
            from ..checkpoint.fetch import CheckpointDownloadError, is_remote_checkpoint
            path = self.init_cfg['checkpoint']
            # Never fall back to a silent random init: say what failed and what to do.
            instead = 'or set model.backbone.init_cfg=None to train from scratch.'
            try:
                load_backbone_checkpoint(self, path)
            except CheckpointDownloadError as err:
                raise CheckpointDownloadError(
                    f'pretrained RepVGG weights: {err}. Check the '
                    'address and the network, or point model.backbone.init_cfg.checkpoint '
                    'at a local file (e.g. checkpoints/RepVGG-<arch>-train.pth, the '
                    f'official release), {instead}') from err
            except FileNotFoundError as err:
                if is_remote_checkpoint(path):  # a model-zoo name mapped to a local file
                    raise
                raise FileNotFoundError(
                    f'pretrained RepVGG weights not found at {path!r}. Put the release '
                    f'file there (e.g. the official RepVGG-<arch>-train.pth, an mmpretrain '
                    f'repvgg checkpoint, or one of ours), {instead}') from err
            self._is_init = True
            return
        super().init_weights()
