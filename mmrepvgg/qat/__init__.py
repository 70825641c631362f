"""Quantization-aware fine-tuning (NNCF): the model the runner fine-tunes, and its export
to an INT8 QDQ ONNX file that ONNX Runtime and OpenVINO run like a post-training one."""
import os

# NNCF compiles its CPU kernels on first use and gives up after 60 s, which a busy small
# machine exceeds (as does waiting on another build of the same torch's kernels: torch's
# extension folder is shared by every environment of that torch build). Wait longer,
# unless the user set it.
os.environ.setdefault('NNCF_EXTENSION_LOAD_TIMEOUT', '600')

from .export import export_qat, quantized_parity  # noqa: E402
from .fake_quant import (ONNX_TRANSLATIONS, FixedQuantizer, QuantizedPart,  # noqa: E402
                         fake_quantize, freeze_quantizers, requantize_concats)
from .model import (QATModel, is_qat_state, prepare_for_quantization,  # noqa: E402
                    use_reference_kernels)

__all__ = ['QATModel', 'is_qat_state', 'prepare_for_quantization', 'use_reference_kernels',
           'export_qat', 'quantized_parity', 'ONNX_TRANSLATIONS', 'FixedQuantizer',
           'QuantizedPart', 'fake_quantize', 'freeze_quantizers', 'requantize_concats']
