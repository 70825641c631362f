"""What the tools share, callable from Python with explicit arguments: a config prepared
with the plugin's options, training and test runs, export and quantization as the tools
do them, and the speed benchmark (run and report)."""
from .benchmark_report import format_report, write_json
from .benchmark_run import BenchmarkOptions, run_benchmark
from .config import load_config
from .deploy import export, quantize
from .runner import build_runner, resolve_checkpoint, test, train

__all__ = ['BenchmarkOptions', 'build_runner', 'export', 'format_report', 'load_config',
           'quantize', 'resolve_checkpoint', 'run_benchmark', 'test', 'train', 'write_json']
