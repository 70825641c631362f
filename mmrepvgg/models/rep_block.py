"""The RepVGG block: three branches while training, one 3x3 conv once deployed."""
from typing import Optional

import torch
import torch.nn.functional as F
from mmcv.cnn import build_activation_layer, build_norm_layer
from torch import Tensor, nn
from torch.nn.utils import skip_init

from .fusion import check_fusable_norm, fuse_branches


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
    """

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
            self.dense = self.pointwise = self.identity = None
        else:
            self.fused = None
            self.dense = ConvNorm(in_channels, out_channels, 3, padding=dilation,
                                  norm_cfg=norm_cfg, **conv_args)
            self.pointwise = ConvNorm(in_channels, out_channels, 1, padding=0,
                                      norm_cfg=norm_cfg, **conv_args)
            has_identity = in_channels == out_channels and stride == 1
            self.identity = (build_norm_layer(norm_cfg, out_channels)[1]
                             if has_identity else None)
        self.se = SqueezeExcite(out_channels, se_ratio) if se_ratio else None
        self.act = build_activation_layer(act_cfg)

    def forward(self, x: Tensor) -> Tensor:
        if self.deploy:
            out = self.fused(x)
        else:
            out = self.dense(x) + self.pointwise(x)
            if self.identity is not None:
                out = out + self.identity(x)
        if self.se is not None:
            out = self.se(out)
        return self.act(out)

    @torch.no_grad()
    def switch_to_deploy(self) -> None:
        """Replace the three branches by one 3x3 conv computing the same eval-mode output."""
        if self.deploy:
            return
        norms = [self.dense.bn, self.pointwise.bn] + (
            [self.identity] if self.identity is not None else [])
        for norm in norms:
            check_fusable_norm(norm)
        if self.training:
            raise RuntimeError(
                'refusing to fuse a RepVGG block in training mode: fusion folds the batch '
                "norms' running statistics into the conv, which matches the training form "
                'only in eval mode. Call model.eval() first.')
        kernel, bias = fuse_branches(
            self.dense.conv.weight, self.dense.bn, self.pointwise.conv.weight,
            self.pointwise.bn, self.identity, self.groups)
        dense = self.dense.conv
        # skip_init: the weights are overwritten below, and a default init would draw
        # from the global RNG, shifting the random stream of a run that fuses mid-way.
        self.fused = skip_init(nn.Conv2d, self.in_channels, self.out_channels, 3,
                               self.stride, dense.padding, dense.dilation, self.groups,
                               bias=True, device=kernel.device, dtype=kernel.dtype)
        self.fused.weight.copy_(kernel)
        self.fused.bias.copy_(bias)
        self.dense = self.pointwise = self.identity = None
        self.deploy = True
