"""What a deploying user calls: export the fused model (ONNX or a compiled AOTInductor
package) with a parity check, quantize it to INT8, load the file in a backend, and plug
that backend into the model so its own evaluator judges it.

    from mmrepvgg.deploy import export_model, load_backend
"""
from ..ops import (MODES, InferenceRunner, WinogradConv2d, convert_to_winograd,
                   optimize_for_inference)
from .aoti import PackageRunner, package_module
from .backend_model import use_backend, use_recipe
from .backends import BACKENDS, BackendRunner, load_backend
from .export import FORMATS, config_input_shape, export_model
from .onnx_export import DEFAULT_OPSET, ExportFailure, export_module, onnx_parity
from .parity import runner_parity
from .parts import PARTS, ExportedPart
from .quantize import METHODS as CALIBRATION_METHODS
from .quantize import calibration_inputs, quantize_onnx

__all__ = ['BACKENDS', 'BackendRunner', 'load_backend', 'use_backend', 'use_recipe',
           'DEFAULT_OPSET',
           'ExportFailure', 'FORMATS', 'PackageRunner', 'config_input_shape', 'package_module',
           'export_model', 'export_module', 'onnx_parity', 'runner_parity', 'PARTS',
           'ExportedPart', 'CALIBRATION_METHODS', 'calibration_inputs', 'quantize_onnx',
           # the CPU recipes, also reachable here for code written against older releases
           'MODES', 'InferenceRunner', 'optimize_for_inference', 'WinogradConv2d',
           'convert_to_winograd']
