"""The entry layer, what a user calls from Python with explicit arguments: a config
prepared with the plugin's options, training and test runs, export and quantization as
the tools do them, inference on images and videos from any form of a model. Each raises
(mmrepvgg.errors) instead of exiting."""
from .config import load_config
from .deploy import export, quantize
from .inference import infer, init_inferencer
from .runner import build_runner, resolve_checkpoint, test, train

__all__ = ['build_runner', 'export', 'infer', 'init_inferencer', 'load_config', 'quantize',
           'resolve_checkpoint', 'test', 'train']
