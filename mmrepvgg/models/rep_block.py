"""RepVGG blocks: three branches while training, one 3x3 conv once deployed."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from mmcv.cnn import build_activation_layer, build_norm_layer
from torch import Tensor, nn
from torch.nn.utils import skip_init

from .fusion import check_fusable_norm, fuse_branches, fuse_qa_branches


class ConvNorm(nn.Module):
    """A bias-free conv followed by a norm: one branch of the training-form block."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 padding: int, dilation: int, groups: int, norm_cfg: dict):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                              dilation, groups, bias=False)
        self.bn = build_norm_layer(norm_cfg, out_channels)[1]

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


class SqueezeExcite(nn.Module):
    """Channel gating of RepVGG-D2se; runs on the branch sum, so it survives fusion."""

    def __init__(self, channels: int, ratio: int):
        super().__init__()
        hidden = max(channels // ratio, 1)
        self.down = nn.Conv2d(channels, hidden, 1, bias=True)
        self.up = nn.Conv2d(hidden, channels, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        gate = F.adaptive_avg_pool2d(x, 1)
        gate = torch.sigmoid(self.up(F.relu(self.down(gate))))
        return x * gate


class RepVGGBlock(nn.Module):
    """3x3 conv+BN, 1x1 conv+BN and (when shapes allow) identity BN, summed, then ReLU.

    ``switch_to_deploy()`` folds the branches into a single 3x3 conv with bias (``fused``);
    ``deploy=True`` builds that form directly, e.g. to load a converted checkpoint.
    Subclasses change only the training-form branches and their fusion.
    """

    #: the training-form submodules, dropped once fused
    branch_names = ('dense', 'pointwise', 'identity')

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, se_ratio: Optional[int] = None,
                 norm_cfg: dict = dict(type='BN'), act_cfg: dict = dict(type='ReLU'),
                 deploy: bool = False):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f'groups={groups} must divide in_channels={in_channels} and '
                             f'out_channels={out_channels}')
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.dilation, self.groups = stride, dilation, groups
        self.deploy = deploy
        # Padding = dilation keeps the 3x3 centre tap aligned with the 1x1 and identity
        # branches, which is what makes fusion exact at any dilation.
        conv_args = dict(stride=stride, dilation=dilation, groups=groups)
        if deploy:
            self.fused = nn.Conv2d(in_channels, out_channels, 3, padding=dilation,
                                   bias=True, **conv_args)
            for name in self.branch_names:
                setattr(self, name, None)
        else:
            self.fused = None
            self.dense = ConvNorm(in_channels, out_channels, 3, padding=dilation,
                                  norm_cfg=norm_cfg, **conv_args)
            self._build_branches(in_channels == out_channels and stride == 1, norm_cfg)
        self.se = SqueezeExcite(out_channels, se_ratio) if se_ratio else None
        self.act = build_activation_layer(act_cfg)

    def _build_branches(self, has_identity: bool, norm_cfg: dict) -> None:
        """The branches beside ``dense``."""
        self.pointwise = ConvNorm(self.in_channels, self.out_channels, 1, self.stride, 0,
                                  self.dilation, self.groups, norm_cfg)
        self.identity = (build_norm_layer(norm_cfg, self.out_channels)[1]
                         if has_identity else None)

    def _training_forward(self, x: Tensor) -> Tensor:
        out = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return out

    def _norms(self) -> list:
        """The batch norms fusion folds."""
        return [self.dense.bn, self.pointwise.bn] + (
            [self.identity] if self.identity is not None else [])

    def _fused_kernel_bias(self) -> Tuple[Tensor, Tensor]:
        return fuse_branches(self.dense.conv.weight, self.dense.bn, self.pointwise.conv.weight,
                             self.pointwise.bn, self.identity, self.groups)

    def forward(self, x: Tensor) -> Tensor:
        out = self.fused(x) if self.deploy else self._training_forward(x)
        if self.se is not None:
            out = self.se(out)
        return self.act(out)

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        """Replace the branches by one 3x3 conv computing the same eval-mode output."""
        if self.deploy:
            return
        for norm in self._norms():
            check_fusable_norm(norm)
        if self.training:
            raise RuntimeError(
                f'refusing to fuse a {type(self).__name__} in training mode: fusion folds '
                "the batch norms' running statistics into the conv, which matches the "
                'training form only in eval mode. Call model.eval() first.')
        kernel, bias = self._fused_kernel_bias()
        dense = self.dense.conv
        # skip_init: the weights are overwritten below, and a default init would draw
        # from the global RNG, shifting the random stream of a run that fuses mid-way.
        self.fused = skip_init(nn.Conv2d, self.in_channels, self.out_channels, 3,
                               self.stride, dense.padding, dense.dilation, self.groups,
                               bias=True, device=kernel.device, dtype=kernel.dtype)
        self.fused.weight.copy_(kernel)
        self.fused.bias.copy_(bias)
        for name in self.branch_names:
            setattr(self, name, None)
        self.deploy = True


class QARepVGGBlock(RepVGGBlock):
    """The quantization-friendly block of QARepVGG (Chu et al., "Make RepVGG Greater
    Again: A Quantization-aware Approach"): 3x3 conv+BN, plain 1x1 conv and plain identity,
    summed, then one batch norm (``bn``) before the ReLU.

    Without a norm of their own the 1x1 and identity branches cannot blow up the fused
    kernel's per-channel scale, which is what makes plain RepVGG lose accuracy under
    per-tensor INT8. Fuses exactly into the same single 3x3 conv with bias.
    """

    branch_names = ('dense', 'pointwise', 'identity', 'bn')

    def _build_branches(self, has_identity: bool, norm_cfg: dict) -> None:
        self.pointwise = nn.Conv2d(self.in_channels, self.out_channels, 1, self.stride,
                                   groups=self.groups, bias=False)
        # Parameter-free; kept as a module so both blocks say "has identity" the same way.
        self.identity = nn.Identity() if has_identity else None
        self.bn = build_norm_layer(norm_cfg, self.out_channels)[1]

    def _training_forward(self, x: Tensor) -> Tensor:
        out = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            out = out + x
        return self.bn(out)

    def _norms(self) -> list:
        return [self.dense.bn, self.bn]

    def _fused_kernel_bias(self) -> Tuple[Tensor, Tensor]:
        return fuse_qa_branches(self.dense.conv.weight, self.dense.bn, self.pointwise.weight,
                                self.bn, self.identity is not None, self.groups)


#: the block types ``RepVGG(block=...)`` builds
BLOCKS = {'repvgg': RepVGGBlock, 'qa': QARepVGGBlock}
