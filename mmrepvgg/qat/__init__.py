"""Quantization-aware fine-tuning (NNCF): the model the runner fine-tunes, and its export
to an INT8 QDQ ONNX file that ONNX Runtime and OpenVINO run like a post-training one."""
from .export import export_qat, quantized_parity
from .fake_quant import (ONNX_TRANSLATIONS, FixedQuantizer, QuantizedPart, fake_quantize,
                         freeze_quantizers, requantize_concats)
from .model import QATModel, is_qat_state, prepare_for_quantization, use_reference_kernels

__all__ = ['QATModel', 'is_qat_state', 'prepare_for_quantization', 'use_reference_kernels',
           'export_qat', 'quantized_parity', 'ONNX_TRANSLATIONS', 'FixedQuantizer',
           'QuantizedPart', 'fake_quantize', 'freeze_quantizers', 'requantize_concats']
