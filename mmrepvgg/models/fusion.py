"""Fusion maths of structural re-parameterization: tensors in, kernel and bias out.

Every branch of a block is turned into an equivalent 3x3 kernel plus bias; the block's
fused conv is their sum (for the QARepVGG block, with the batch norm after the sum folded
in last). The blocks, the model-wide ``reparameterize`` and the conversion tool all come
through here, so the maths lives in one place.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils.fusion import fuse_conv_bn_weights


def batch_norm_types() -> Tuple[type, ...]:
    """The batch-norm classes: torch's (every ``_BatchNorm``, SyncBatchNorm included) and
    mmcv's ``SyncBatchNorm`` (``MMSyncBN``), which is not a torch ``_BatchNorm``."""
    try:
        from mmcv.ops import SyncBatchNorm as MMSyncBN
    except ImportError:  # mmcv without its compiled ops
        return (_BatchNorm,)
    return (_BatchNorm, MMSyncBN)


def is_batch_norm(module: nn.Module) -> bool:
    return isinstance(module, batch_norm_types())


def check_fusable_norm(norm: nn.Module) -> None:
    """Only batch norms fold into a conv: their eval-mode output is affine per channel."""
    if not is_batch_norm(norm):
        raise TypeError(
            f'cannot fuse a {type(norm).__name__} into a conv: re-parameterization needs a '
            'batch norm (BatchNorm2d, SyncBatchNorm, mmcv\'s SyncBatchNorm, BatchNormXd or '
            'another _BatchNorm subclass) whose eval-mode output is a fixed affine map per '
            'channel')
    if norm.running_mean is None or norm.running_var is None:
        raise ValueError('cannot fuse a batch norm built with track_running_stats=False: '
                         'it has no running statistics to fold into the conv')


def fuse_conv_bn(kernel: Tensor, norm: nn.Module,
                 conv_bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Fold an eval-mode batch norm that follows a conv (bias-free unless ``conv_bias``)
    into kernel and bias.

    Returned in float64: callers sum branches there and cast once at the end.
    """
    check_fusable_norm(norm)
    f64 = torch.float64
    weight = None if norm.weight is None else norm.weight.detach().to(f64)
    bias = None if norm.bias is None else norm.bias.detach().to(f64)
    conv_bias = None if conv_bias is None else conv_bias.detach().to(f64)
    fused_kernel, fused_bias = fuse_conv_bn_weights(
        kernel.detach().to(f64), conv_bias, norm.running_mean.to(f64),
        norm.running_var.to(f64), norm.eps, weight, bias)
    return fused_kernel.detach(), fused_bias.detach()


def pad_1x1_to_3x3(kernel: Tensor) -> Tensor:
    """A 1x1 kernel is a 3x3 kernel with zeros around the centre tap."""
    return F.pad(kernel, [1, 1, 1, 1])


def identity_kernel(channels: int, groups: int, dtype: torch.dtype,
                    device: Optional[torch.device] = None) -> Tensor:
    """The 3x3 kernel of a grouped conv that copies its input: output channel i reads
    input channel i % (channels / groups) of its own group at the centre tap."""
    in_per_group = channels // groups
    kernel = torch.zeros(channels, in_per_group, 3, 3, dtype=dtype, device=device)
    index = torch.arange(channels, device=device)
    kernel[index, index % in_per_group, 1, 1] = 1
    return kernel


def fuse_branches(dense_kernel: Tensor, dense_norm: nn.Module,
                  pointwise_kernel: Optional[Tensor] = None,
                  pointwise_norm: Optional[nn.Module] = None,
                  identity_norm: Optional[nn.Module] = None,
                  groups: int = 1) -> Tuple[Tensor, Tensor]:
    """Sum the 3x3+BN, 1x1+BN and identity-BN branches into one 3x3 kernel and bias.

    The sum is taken in float64 and cast back once, so the fused model differs from the
    3-branch one only by the rounding of its own convolution.
    """
    kernel, bias = fuse_conv_bn(dense_kernel, dense_norm)
    if pointwise_kernel is not None:
        k, b = fuse_conv_bn(pad_1x1_to_3x3(pointwise_kernel), pointwise_norm)
        kernel, bias = kernel + k, bias + b
    if identity_norm is not None:
        eye = identity_kernel(dense_kernel.shape[0], groups, torch.float64,
                              dense_kernel.device)
        k, b = fuse_conv_bn(eye, identity_norm)
        kernel, bias = kernel + k, bias + b
    return kernel.to(dense_kernel.dtype), bias.to(dense_kernel.dtype)


def fuse_qa_branches(dense_kernel: Tensor, dense_norm: nn.Module, pointwise_kernel: Tensor,
                     sum_norm: nn.Module, with_identity: bool,
                     groups: int = 1) -> Tuple[Tensor, Tensor]:
    """Fuse a QARepVGG block: 3x3 conv+BN, plain 1x1 conv and plain identity, summed, then
    the batch norm after the sum, into one 3x3 kernel and bias.

    The bias-free branches add only to the kernel; the post-sum norm then scales the whole
    sum (kernel and the dense branch's bias) per output channel, as one conv+BN fold.
    Float64 throughout, cast back once, as in :func:`fuse_branches`.
    """
    kernel, bias = fuse_conv_bn(dense_kernel, dense_norm)
    kernel = kernel + pad_1x1_to_3x3(pointwise_kernel.detach().to(torch.float64))
    if with_identity:
        kernel = kernel + identity_kernel(dense_kernel.shape[0], groups, torch.float64,
                                          dense_kernel.device)
    kernel, bias = fuse_conv_bn(kernel, sum_norm, conv_bias=bias)
    return kernel.to(dense_kernel.dtype), bias.to(dense_kernel.dtype)
