"""The speed benchmark of tools/benchmark.py: the timing harness (``timing``), the models
it times (``models``), a whole run (``run``), its report and plot (``report``, ``plot``),
the deployment recommender (``recommend``, with the steps that write and test each form,
``deploy_steps``) and the INT8 accuracy study (``quantization_report``)."""
from .report import format_report, write_json
from .run import BenchmarkOptions, run_benchmark

__all__ = ['BenchmarkOptions', 'format_report', 'run_benchmark', 'write_json']
