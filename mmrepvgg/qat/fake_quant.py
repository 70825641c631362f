"""A quantization-aware model as the exported file holds it: fixed INT8 fake quantizers
that torch.export traces and the ONNX exporter writes as QuantizeLinear/DequantizeLinear.

NNCF's quantizers (:class:`mmrepvgg.models.QATModel`) are trainable modules whose
forward branches on their state, which ``torch.export`` cannot trace, and torch's own
``fake_quantize_per_channel_affine`` has no shape function for it. After fine-tuning,
:func:`freeze_quantizers` puts a :class:`FixedQuantizer` (the learned scale and zero
point, as buffers) in each quantizer's place; it calls the op ``mmrepvgg::fake_quantize``,
which :data:`ONNX_TRANSLATIONS` turns into a QDQ pair, the format ``tools/quantize.py``
writes, so ONNX Runtime and OpenVINO run the file in int8 like a post-training one.
"""
from typing import Dict

import torch
from torch import Tensor, nn

from ..deploy.parts import ExportedPart
from .model import quantizer_counts

__all__ = ['fake_quantize', 'FixedQuantizer', 'freeze_quantizers', 'QuantizedPart',
           'ONNX_TRANSLATIONS', 'requantize_concats']


@torch.library.custom_op('mmrepvgg::fake_quantize', mutates_args=())
def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int, quant_min: int,
                  quant_max: int) -> Tensor:
    """``x`` rounded to the integer grid ``scale * (q - zero_point)``, ``q`` clamped to
    ``[quant_min, quant_max]``; per tensor (0-d ``scale``) or per channel along ``axis``.
    Round half to even, as ONNX's QuantizeLinear."""
    shape = [1] * x.dim()
    if scale.dim():
        shape[axis] = -1
    step = scale.reshape(shape).to(x.dtype)
    zero = zero_point.reshape(shape).to(x.dtype)
    return (torch.clamp(torch.round(x / step) + zero, quant_min, quant_max) - zero) * step


@fake_quantize.register_fake
def _(x, scale, zero_point, axis, quant_min, quant_max):
    return torch.empty_like(x)


def _onnx_fake_quantize(x, scale, zero_point, axis: int, quant_min: int, quant_max: int):
    from onnxscript import opset18 as op
    # QuantizeLinear's range is its zero point's type: uint8 [0, 255] or int8 [-128, 127];
    # NNCF's narrow-range weights [-127, 127] are clipped first (a constant folded away)
    zero = op.Cast(zero_point, to=2 if quant_min >= 0 else 3)  # UINT8, INT8
    if (quant_min, quant_max) == (-127, 127):
        limit = op.Mul(scale, op.Constant(value_float=127.0))
        if scale.shape is not None and len(scale.shape) == 1:  # per channel, on axis 0
            limit = op.Reshape(limit, op.Constant(value_ints=[-1] + [1] * (len(x.shape) - 1)))
        x = op.Max(op.Min(x, limit), op.Neg(limit))
    quantized = op.QuantizeLinear(x, scale, zero, axis=axis)
    return op.DequantizeLinear(quantized, scale, zero, axis=axis)


#: The exporter's translation of ``mmrepvgg::fake_quantize`` (torch.onnx.export's
#: ``custom_translation_table``).
ONNX_TRANSLATIONS = {torch.ops.mmrepvgg.fake_quantize.default: _onnx_fake_quantize}

#: The integer ranges an ONNX QDQ pair can hold.
_RANGES = ((0, 255), (-128, 127), (-127, 127))


class FixedQuantizer(nn.Module):
    """An NNCF quantizer's grid, fixed: the scale and zero point it had when built."""

    def __init__(self, quantizer: nn.Module):
        super().__init__()
        quant_min, quant_max, scale, zero_point = quantizer.get_parameters_for_torch_fq()
        if quantizer.narrow_range:  # the helper widens it for torch's FakeQuantize
            quant_min, quant_max = quantizer.level_low, quantizer.level_high
        if (quant_min, quant_max) not in _RANGES:
            raise ValueError(f'a {quantizer.num_bits}-bit quantizer with levels '
                             f'[{quant_min}, {quant_max}] has no ONNX QDQ form (8-bit '
                             f'ranges only: {_RANGES})')
        self.quant_min, self.quant_max = int(quant_min), int(quant_max)
        shape = list(quantizer.scale_shape)
        self.axis = max(range(len(shape)), key=shape.__getitem__) if quantizer.per_channel \
            else 0
        flat = (lambda t: t.reshape(-1)) if quantizer.per_channel else (lambda t: t.reshape(()))
        self.register_buffer('scale', flat(scale.detach().float()).clone())
        self.register_buffer('zero_point', flat(zero_point.detach().int()).clone())

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mmrepvgg.fake_quantize(x, self.scale, self.zero_point, self.axis,
                                                self.quant_min, self.quant_max)

    def extra_repr(self) -> str:
        kind = f'per channel (axis {self.axis})' if self.scale.dim() else 'per tensor'
        return f'[{self.quant_min}, {self.quant_max}], {kind}'


def freeze_quantizers(model: nn.Module) -> Dict[str, int]:
    """Replace every NNCF quantizer of the NNCF-wrapped ``model`` by its
    :class:`FixedQuantizer`, in place. Returns the count of quantizers by kind
    (``weights``: per channel, ``activations``: per tensor)."""
    from nncf.torch.function_hook.wrapper import get_hook_storage
    from nncf.torch.quantization.layers import BaseQuantizer
    counts = quantizer_counts(model)
    storage = get_hook_storage(model)
    for name, module in list(storage.named_hooks(remove_duplicate=False)):
        if isinstance(module, BaseQuantizer):
            # one module per hook: torch.export loses track of a module called twice
            storage.set_submodule(name, FixedQuantizer(module))
    return counts


class QuantizedPart(ExportedPart):
    """:class:`ExportedPart` of an NNCF-wrapped segmentor or single-stage detector: the
    network is the wrapped model's own tensor-mode forward, whose hooks meet the ops
    under the names they were placed and trained under (the image quantizer included),
    then the part's outputs as :class:`ExportedPart` gives them."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        if self.kind not in ('segmentor', 'single_stage'):
            raise ValueError(f'a QAT checkpoint exports a segmentor or a single-stage '
                             f'detector; this one is a {self.kind} model: its tensor-mode '
                             'forward runs more than the exported network')

    def torch_state(self) -> Dict[str, Tensor]:
        from nncf.torch.function_hook.wrapper import ATR_HOOK_STORAGE
        return {k: v for k, v in super().torch_state().items()
                if not k.startswith(ATR_HOOK_STORAGE + '.')}

    def forward(self, x: Tensor):
        return self.dense_outputs(x, self.model(x))


def _constant(graph, name: str):
    """The value of ``name`` where it is an initializer or a Constant node's output."""
    from onnx import numpy_helper
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == 'Constant' and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def requantize_concats(proto) -> int:
    """Quantize the output of each Concat whose inputs all come dequantized on one grid
    (NNCF gives a concat's inputs one shared quantizer), in place: a QDQ pair on that
    grid, which leaves every value as it is. ONNX Runtime runs a conv in int8 only where
    its input comes out of a DequantizeLinear; PSPNet's bottleneck conv reads the
    pyramid's concat. Returns how many concats were requantized."""
    from onnx import helper
    graph = proto.graph
    producer = {out: node for node in graph.node for out in node.output}
    grids = {}
    for node in graph.node:
        if node.op_type != 'Concat':
            continue
        sources = [producer.get(name) for name in node.input]
        if not sources or any(s is None or s.op_type != 'DequantizeLinear' or len(s.input) < 3
                              for s in sources):
            continue
        values = [(_constant(graph, s.input[1]), _constant(graph, s.input[2])) for s in sources]
        first = values[0]
        if any(v is None for pair in values for v in pair) or first[0].size != 1 or any(
                (v[0] != first[0]).any() or (v[1] != first[1]).any() for v in values):
            continue
        grids[node.output[0]] = sources[0].input[1:3]
    outputs = {out.name for out in graph.output}
    grids = {name: grid for name, grid in grids.items() if name not in outputs}
    if not grids:
        return 0
    nodes, inserted = [], set()
    for node in graph.node:
        nodes.append(node)
        for out in node.output:
            if out in grids:
                scale, zero = grids[out]
                quantize = helper.make_node('QuantizeLinear', [out, scale, zero], [out + '_q'])
                inserted.add(id(quantize))
                nodes += [quantize, helper.make_node('DequantizeLinear',
                                                     [out + '_q', scale, zero], [out + '_dq'])]
    for node in nodes:  # the concat's readers read the requantized values
        if id(node) not in inserted:
            for i, name in enumerate(node.input):
                if name in grids:
                    node.input[i] = name + '_dq'
    del graph.node[:]
    graph.node.extend(nodes)
    return len(grids)
