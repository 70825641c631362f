"""A QAT checkpoint exported: the fused network with its learned quantizers as an INT8 QDQ
ONNX file, checked against the fake-quantized torch model before it is kept."""
import json
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..deploy.backends import QUANTIZATION_KEY
from ..deploy.export import export_part
from ..deploy.onnx_export import DEFAULT_OPSET
from ..deploy.parts import ExportedPart
from ..deploy.quantize import quantized_ops, sqnr_db
from ..numerics import flatten_outputs
from .fake_quant import (ONNX_TRANSLATIONS, QuantizedPart, freeze_quantizers,
                         requantize_concats)
from .model import QATModel, is_qat_state

__all__ = ['load_qat_model', 'quantized_parity', 'export_qat']


def load_qat_model(config: str, state: dict, cfg_options: Optional[dict] = None) -> QATModel:
    """The :class:`QATModel` of ``config``'s model with a QAT checkpoint's ``state`` (its
    quantizers rebuilt from the state), in eval mode."""
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.runner import load_state_dict
    if not is_qat_state(state):
        raise ValueError('the checkpoint holds no quantizers: it is not a QAT checkpoint')
    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmengine'))
    model = QATModel(cfg.model)
    load_state_dict(model, state.get('state_dict', state), strict=True)
    return model.eval()


@torch.no_grad()
def quantized_parity(module: QuantizedPart, runner, probe: Tensor) -> dict:
    """Judge an INT8 file by the fake-quantized network it came from: its outputs must be
    closer to the torch model's (``file_sqnr_db``) than that model's are to its own
    float network (``quantization_sqnr_db``): the file's integer kernels may flip a
    rounding, but must add less noise than quantization itself."""
    quantized = flatten_outputs(module(probe))
    floats = flatten_outputs(ExportedPart.forward(module, probe))  # the hooks not run
    candidate = runner(probe)
    if len(candidate) != len(quantized):
        raise ValueError(f'{runner.path} gives {len(candidate)} outputs, the module '
                         f'{len(quantized)}')
    file_sqnr, quant_sqnr = sqnr_db(quantized, candidate), sqnr_db(floats, quantized)
    result = dict(within=file_sqnr >= quant_sqnr, file_sqnr_db=file_sqnr,
                  quantization_sqnr_db=quant_sqnr)
    if not result['within']:
        result['reason'] = (f'its SQNR against the fake-quantized torch model is '
                            f'{file_sqnr:.1f} dB, below the {quant_sqnr:.1f} dB of that '
                            'model against its float network')
    return result


def export_qat(config: str, state: dict, output: str, shape: Sequence[int], batch: int = 1,
               dynamic: bool = False, opset: int = DEFAULT_OPSET,
               cfg_options: Optional[dict] = None, check: bool = True,
               source: str = '') -> dict:
    """Write the INT8 QDQ ONNX file of a QAT checkpoint's ``state`` (read from
    ``source``) for ``config``'s model; returns :func:`mmrepvgg.deploy.export_model`'s
    report with ``quantized_ops`` and ``quantizers`` (their counts)."""
    import nncf
    model = load_qat_model(config, state, cfg_options)
    counts = freeze_quantizers(model.model)
    settings = dict(method='quantization-aware training', toolkit=f'nncf {nncf.__version__}',
                    format='QDQ', weights='int8 per channel',
                    activations='uint8 per tensor', source=source)
    report = export_part(QuantizedPart(model.model), config, output, shape, batch, dynamic,
                         opset, check, parity=quantized_parity,
                         translations=ONNX_TRANSLATIONS,
                         metadata={QUANTIZATION_KEY: json.dumps(settings)},
                         report=dict(fusion=None, quantizers=counts),
                         rewrite=requantize_concats)
    import onnx
    report['quantized_ops'] = quantized_ops(onnx.load(output))
    return report
