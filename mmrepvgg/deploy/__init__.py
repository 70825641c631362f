"""What a deploying user calls: export the fused model (ONNX or a compiled AOTInductor
package), quantize it, run the file in a backend."""
from .aoti import PackageRunner, package_module
from .backend_model import use_backend
from .backends import BACKENDS, BackendRunner, load_backend
from .export import FORMATS, config_input_shape, export_model
from .inference import MODES, InferenceRunner, optimize_for_inference
from .onnx_export import DEFAULT_OPSET, ExportFailure, export_module, onnx_parity
from .parts import PARTS, ExportedPart
from .quantize import METHODS as CALIBRATION_METHODS
from .quantize import calibration_inputs, quantize_onnx
from .winograd import WinogradConv2d, convert_to_winograd

__all__ = ['BACKENDS', 'BackendRunner', 'load_backend', 'use_backend', 'DEFAULT_OPSET',
           'ExportFailure', 'FORMATS', 'PackageRunner', 'config_input_shape', 'package_module',
           'export_model', 'export_module', 'onnx_parity', 'PARTS',
           'ExportedPart', 'CALIBRATION_METHODS', 'calibration_inputs', 'quantize_onnx',
           'MODES', 'InferenceRunner', 'optimize_for_inference', 'WinogradConv2d',
           'convert_to_winograd']
