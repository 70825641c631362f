"""Behaviour of the inference recipes, the benchmark harness, the benchmark run of
mmrepvgg.benchmark and the command line tools/benchmark.py (never their timings)."""
import copy
import json
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, TINY
from mmrepvgg import RepVGG, reparameterize
from mmrepvgg.benchmark import models as benchmark_models
from mmrepvgg.benchmark.models import prepare_specs, repvgg_specs
from mmrepvgg.benchmark.report import format_report
from mmrepvgg.benchmark.run import (BenchmarkOptions, make_candidates, openvino_bf16_note,
                                    run_benchmark)
from mmrepvgg.benchmark.timing import (Candidate, benchmark_interleaved, count_conv_flops,
                                       peak_memory, summarize)
from mmrepvgg.numerics import fp32_math, output_error
from mmrepvgg.ops.inference import MODES, optimize_for_inference
from mmrepvgg.ops.winograd import convert_to_winograd
from mmrepvgg.reparam import rounding_bound, rounding_errors


def run_tool(*argv):
    """tools/benchmark.py run as a command, from the repository root."""
    return subprocess.run([sys.executable, 'tools/benchmark.py', *argv], cwd=ROOT,
                          capture_output=True, text=True)


@pytest.fixture
def tiny_a0(monkeypatch):
    """The benchmark's A0 built as TINY, to keep exports and packages short."""
    monkeypatch.setattr(benchmark_models, 'RepVGG', lambda arch: RepVGG(arch=TINY))


@pytest.fixture
def fused_tiny(randomize):
    model = randomize(RepVGG(arch=TINY))
    model.eval()
    return reparameterize(model)


def assert_same_function(out, eager, model, x):
    """``out`` (an optimized fp32 run) is within the fp32 rounding that ``eager`` (the
    same arithmetic run eagerly) shows against ``model`` run in fp64 (see
    mmrepvgg.reparam.rounding_errors: 4x, at least a few fp32 ulps of the output)."""
    with torch.no_grad():
        reference = copy.deepcopy(model).double()(x.double())
    errors = rounding_errors(out, eager, reference)
    assert errors['within'], errors


@pytest.mark.parametrize('mode', MODES)
def test_optimized_output_equals_eager_fused(fused_tiny, mode):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = fused_tiny(x)
        # winograd's own eager fp32 error is the baseline of its compiled run
        same_math = copy.deepcopy(fused_tiny)
        if mode == 'winograd':  # the tiny model's convs are too narrow for tile 'auto'
            convert_to_winograd(same_math, 4)
        eager = same_math(x)
    reference_model = copy.deepcopy(fused_tiny)
    runner = optimize_for_inference(fused_tiny, x, device='cpu', mode=mode, winograd_tile=4)
    out = runner(x)
    assert runner.mode == mode and runner.prep_seconds > 0
    assert len(out) == len(expected) == 4
    assert [a.shape for a in out] == [b.shape for b in expected]
    assert_same_function(out, eager, reference_model, x)


@pytest.mark.skipif(not hasattr(torch.backends.mkldnn, 'conv'),
                    reason='needs torch.backends.mkldnn.conv.fp32_precision')
def test_tf32_precision_is_scoped_to_the_runner(fused_tiny):
    # fp32 tensors with bf16 products on CPU: close to fp32, and the global switch is
    # only flipped while the runner runs
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = copy.deepcopy(fused_tiny).double()(x.double())[-1]
    convs = count_conv_flops(fused_tiny, x)['convs']
    before = torch.backends.mkldnn.conv.fp32_precision
    runner = optimize_for_inference(fused_tiny, x, 'cpu', mode='channels_last',
                                    precision='tf32')
    out = runner(x)[-1]
    assert torch.backends.mkldnn.conv.fp32_precision == before
    assert out.dtype == torch.float32
    # each conv rounds its input and weight to bf16 (two roundings of eps/2 per product,
    # fp32 sums), and those relative errors add up over the stack of convs; on a CPU
    # without bf16 arithmetic oneDNN stays in fp32, well inside this
    error, scale = output_error(out, expected)
    assert error <= convs * torch.finfo(torch.bfloat16).eps * scale


def test_jit_freeze_keeps_the_frozen_graph_when_onednn_cannot_run_it():
    # oneDNN's adaptive pooling needs the output size to divide the input (PSPNet's 1/2/3/6
    # pyramid does not), so optimize_for_inference's graph fails; jit.freeze alone works.
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1),
                                torch.nn.AdaptiveAvgPool2d(3))
    model.eval()
    x = torch.randn(1, 3, 8, 8)
    reference_model = copy.deepcopy(model)
    with torch.no_grad():
        expected = model(x)
    with pytest.warns(UserWarning, match='jit.freeze only'):
        runner = optimize_for_inference(model, x, 'cpu', mode='jit_freeze')
    assert runner.note.startswith('jit.freeze only')
    assert_same_function(runner(x), expected, reference_model, x)


def test_auto_falls_back_when_compile_fails(fused_tiny, monkeypatch):
    def broken_compile(*args, **kwargs):
        raise RuntimeError('no compiler here')

    monkeypatch.setattr(torch, 'compile', broken_compile)
    x = torch.randn(1, 3, 32, 32)
    with pytest.warns(UserWarning, match="mode 'compile' failed"):
        runner = optimize_for_inference(fused_tiny, x, 'cpu', mode='auto')
    assert runner.mode == 'jit_freeze'


def test_optimize_rejects_unknown_mode(fused_tiny):
    with pytest.raises(ValueError, match='valid modes: eager'):
        optimize_for_inference(fused_tiny, torch.randn(1, 3, 32, 32), 'cpu', mode='turbo')


def test_conv_flops_match_the_paper():
    # The paper's "FLOPs" are multiply-accumulates; A0 is listed at 1.4 B (deploy model,
    # the 1000-class head adds only 1.3 M).
    model = reparameterize(RepVGG(arch='A0').eval())
    counts = count_conv_flops(model, torch.randn(1, 3, 224, 224))
    assert round(counts['macs'] / 1e9, 1) == 1.4
    assert counts['flops'] == 2 * counts['macs'] and counts['convs'] == 22


def test_peak_memory_reports_method():
    peak, method = peak_memory(lambda: torch.ones(4, 1024, 1024), torch.device('cpu'))
    assert method in ('cpu', 'cpu-fallback')
    assert isinstance(peak, int) and peak >= 0
    if method == 'cpu':
        assert peak >= 8 * 2**20  # the 16 MiB output is touched during the call


def test_summarize():
    st = summarize([0.3, 0.1, 0.2, 0.4, 0.5])
    assert st['median'] == 0.3 and st['min'] == 0.1 and st['n'] == 5
    assert st['q1'] == pytest.approx(0.2) and st['q3'] == pytest.approx(0.4)
    assert summarize([])['median'] is None


def test_interleaved_benchmark_keeps_going_after_a_failure():
    calls = []

    def good():
        return lambda: calls.append('good')

    def bad():
        raise RuntimeError('no such kernel\nmore detail')

    cands = [Candidate('bad', bad), Candidate('good', good)]
    benchmark_interleaved(cands, 'cpu', repeats=3, warmup=1, measure_memory=False)
    assert cands[0].error == 'RuntimeError: no such kernel ... more detail'
    assert not cands[0].times
    assert len(cands[1].times) == 3 and len(calls) == 4 and cands[1].error is None


def test_tool_end_to_end(tmp_path):
    out_json, out_png = tmp_path / 'r.json', tmp_path / 'r.png'
    # on the CPU, where the fusion bound below is measured; one --input-size value: square
    proc = run_tool('--archs', 'A0', '--resnets', 'none', '--batch-size', '1',
                    '--input-size', '32', '--repeats', '1', '--warmup', '0',
                    '--modes', 'eager', '--no-flush-denormal', '--json', str(out_json),
                    '--plot', str(out_png), '--device', 'cpu', '--seed', '0')
    assert proc.returncode == 0, proc.stderr
    stdout = proc.stdout
    data = json.loads(out_json.read_text())
    assert data['args']['input_size'] == [32, 32]
    names = [c['name'] for c in data['candidates']]
    assert names == ['RepVGG-A0/train @eager', 'RepVGG-A0/fused @eager']
    # A correct fusion, judged by the numbers the tool computed in its own process and
    # thread count (oneDNN picks kernels per thread count, so errors measured here would
    # be of another computation), as mmrepvgg.reparam.fused_weight_errors judges one: the
    # fused weights computed in fp64 stay within the rounding bound of the training
    # form's own fp32 error; and the difference the tool reports between the two forms
    # is the one their errors against fp64 leave room for.
    train, fused = data['candidates']
    for cand in (train, fused):
        assert cand['error'] is None and len(cand['times_ms']) == 1
        assert cand['images_per_s'] > 0
        assert cand['reference_fp64_abs_diff'] == train['fp64_abs_diff'] > 0
    assert train['max_abs_diff'] == 0 and train['fusion_fp64_abs_diff'] is None
    bound = rounding_bound(train['fp64_abs_diff'], fused['output_scale'])
    assert 0 < fused['fusion_fp64_abs_diff'] <= bound, (fused, bound)
    assert fused['max_abs_diff'] <= fused['fp64_abs_diff'] + train['fp64_abs_diff'], fused
    assert data['candidates'][0]['speedup_vs_baseline'] == 1.0
    assert data['comparisons']['same_treatment'][0]['model'] == 'RepVGG-A0'
    assert out_png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert 'RepVGG-A0/fused @eager' in stdout and 'Best of each' in stdout
    assert data['baseline'] == 'RepVGG-A0/train @eager'


def test_benchmark_times_the_exported_backends(tiny_a0):
    # A0 built as TINY, to keep its four exports short; openvino-bf16 stands for both
    # OpenVINO modes (it computes in fp32 where the CPU has no bf16 arithmetic).
    modes = ['eager', 'onnxruntime', 'openvino-bf16', 'onnxruntime-int8']
    result = run_benchmark(BenchmarkOptions(
        archs=['A0'], resnets=[], batch_size=1, input_size=[32, 32], repeats=2, warmup=0,
        modes=modes, no_memory=True, no_flush_denormal=True, device='cpu', seed=0))
    rows = {c['name']: c for c in result['candidates']}
    assert list(rows) == [f'RepVGG-A0/{form} @{mode}' for mode in modes
                          for form in ('train', 'fused')]
    train = repvgg_specs(['A0'], ['train'], seed=0)[0].model
    inputs = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    models = {'train': train, 'fused': reparameterize(train)}
    # OpenVINO computes in fp32 where the CPU has no bf16 arithmetic (the report says so)
    bf16_math = openvino_bf16_note() is None
    for form, model in models.items():
        # Each row's error against fp64, as the run measured it, is held to what torch's
        # eager fp32 run of the same network showed in the same run (rounding_bound, as
        # the export's parity check holds it); bf16 products as in the tf32 test above.
        eager = rows[f'RepVGG-A0/{form} @eager']
        scale = eager['output_scale']
        fp32_bound = rounding_bound(eager['fp64_abs_diff'], scale)
        bf16_bound = (count_conv_flops(model, inputs)['convs']
                      * torch.finfo(torch.bfloat16).eps * scale + eager['fp64_abs_diff'])
        bounds = {'onnxruntime': ('fp32', fp32_bound),
                  'openvino-bf16': ('bf16', bf16_bound if bf16_math else fp32_bound)}
        for mode, (precision, bound) in bounds.items():
            row = rows[f'RepVGG-A0/{form} @{mode}']
            assert row['error'] is None and row['precision'] == precision, row
            assert len(row['times_ms']) == 2 and min(row['times_ms']) > 0, row
            assert row['fp64_abs_diff'] <= bound, (row, bound)
            assert 0 < row['compile_s'] <= row['prep_s']
        # one ONNX export per model, shared by its rows: the row set up first records it
        exports = [rows[f'RepVGG-A0/{form} @{mode}'].get('export_s')
                   for mode in ('onnxruntime', 'openvino-bf16', 'onnxruntime-int8')]
        assert [e for e in exports if e is not None] == [exports[0]] and exports[0] > 0
        # INT8: quantized first (within the set-up time), then timed like the others. Its
        # error is quantization's: 8-bit activations through a few layers keep it to a few
        # percent of the output scale (0.2: far from noise, which is ~1x), never zero.
        row = rows[f'RepVGG-A0/{form} @onnxruntime-int8']
        assert row['error'] is None and row['precision'] == 'int8', row
        assert len(row['times_ms']) == 2 and min(row['times_ms']) > 0, row
        assert 0 < row['quantize_s'] < row['prep_s']
        assert 0 < row['max_abs_diff'] <= 0.2 * scale, (row['max_abs_diff'], scale)
    assert result['environment']['backends'].keys() == {'onnxruntime', 'openvino'}


def test_benchmark_times_aoti_packages_with_their_load_time(tiny_a0):
    # compiled into a package (set-up time, load time in its own column), then timed; the
    # Winograd package at tile 4 (the tiny model's convs are too narrow for 'auto')
    result = run_benchmark(BenchmarkOptions(
        archs=['A0'], forms=['fused'], resnets=[], batch_size=1, input_size=[32, 32],
        repeats=2, warmup=0, modes=['eager', 'aoti', 'winograd-aoti'], winograd_tile=4,
        no_memory=True, device='cpu'))
    rows = {c['name']: c for c in result['candidates']}
    # as for the ONNX rows: against fp64, within rounding_bound of torch eager's own fp32
    # error in the same run; Winograd's convs may magnify rounding by up to
    # error_growth(4) = 256 (tests/test_winograd.py)
    eager = rows['RepVGG-A0/fused @eager']
    fp32_bound = rounding_bound(eager['fp64_abs_diff'], eager['output_scale'])
    bounds = {'aoti': fp32_bound, 'winograd-aoti': 256 * fp32_bound}
    peak = result['environment']['matmul_peak']
    assert peak['tflops'] > 0 and peak['size'] in (1024, 2048, 3072)
    assert eager['x_peak'] == pytest.approx(eager['tflops'] / peak['tflops'])
    for mode in bounds:
        row = rows[f'RepVGG-A0/fused @{mode}']
        assert row['error'] is None and len(row['times_ms']) == 2, row
        assert 0 < row['load_s'] and 0 < row['compile_s'] <= row['prep_s']
        assert row['export_s'] + row['compile_s'] + row['load_s'] <= row['prep_total_s']
        assert row['fp64_abs_diff'] <= bounds[mode], (row, bounds[mode])
    assert result['environment']['backends'] == {'aoti': torch.__version__}


@pytest.mark.skipif(not hasattr(torch.backends.mkldnn, 'conv'),
                    reason='needs torch.backends.mkldnn.conv.fp32_precision')
def test_reference_outputs_are_ieee_fp32_whatever_the_default(tiny_a0):
    # A process-wide reduced-precision default (TF32 convs on CUDA, bf16 products on the
    # CPU) must not reach the fp32 outputs every row is compared with; the same switch on
    # both devices (mmrepvgg.numerics.fp32_math), tried here on the CPU.
    specs = repvgg_specs(['A0'], ['fused'], seed=0)
    models = [specs[0].model, specs[0].reference.model]
    seen = []

    def spy(module, args, output):
        seen.append((output.dtype, torch.backends.mkldnn.conv.fp32_precision))

    for model in models:  # on the convs: the benchmark calls the model's method itself
        for conv in model.modules():
            if isinstance(conv, torch.nn.Conv2d):
                conv.register_forward_hook(spy)
    x = torch.randn(1, 3, 32, 32)
    default = torch.backends.mkldnn.conv.fp32_precision
    torch.backends.mkldnn.conv.fp32_precision = 'bf16'
    try:
        prepare_specs(specs, x, torch.device('cpu'), check=True)
    finally:
        torch.backends.mkldnn.conv.fp32_precision = default
    assert {flag for dtype, flag in seen if dtype == torch.float32} == {'ieee'}, seen
    assert {dtype for dtype, _ in seen} == {torch.float32, torch.float64}  # float64 too
    with fp32_math('cpu', 'fp32'), torch.no_grad():
        for model, spec in zip(models, (specs[0], specs[0].reference)):
            assert all(torch.equal(a, b) for a, b in zip(model(x), spec.output))


def test_benchmark_marks_backend_rows_skipped_off_the_cpu(tiny_a0):
    # one row per model for a backend mode (it sets its own precision), none timed on CUDA
    specs = repvgg_specs(['A0'], ['fused'], seed=0)
    candidates = make_candidates(specs, ['eager', 'onnxruntime', 'openvino-bf16'],
                                 ['fp32', 'amp'], torch.zeros(1, 3, 32, 32),
                                 torch.device('cuda'))
    assert [c.name for c in candidates] == [
        'RepVGG-A0/fused @eager fp32', 'RepVGG-A0/fused @onnxruntime fp32',
        'RepVGG-A0/fused @openvino-bf16 bf16', 'RepVGG-A0/fused @eager amp']
    for cand in candidates[1:3]:
        assert cand.setup is None and 'CPU only' in cand.info['skipped']


def test_benchmark_skips_resnet_rows_without_mmdet(monkeypatch):
    # sys.modules[name] = None makes any import of mmdet fail, as if it were missing
    for name in [n for n in sys.modules if n == 'mmdet' or n.startswith('mmdet.')]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, 'mmdet', None)
    result = run_benchmark(BenchmarkOptions(
        archs=['A0'], forms=['fused'], resnets=[50], batch_size=1, input_size=[32, 32],
        repeats=1, warmup=0, modes=['eager'], no_memory=True, no_flush_denormal=True))
    assert [c['name'] for c in result['candidates']] == ['RepVGG-A0/fused @eager']
    assert 'skipped ResNet-50: mmdet is not importable' in result['skipped'][0]
    # and the printed report says so
    assert 'skipped ResNet-50' in format_report(result)


@pytest.mark.parametrize('argv, message', [
    (['--archs', 'B1g2,Z9'], "unknown RepVGG arch 'Z9'; valid names: A0, A1"),
    (['--modes', 'eager,turbo'], 'valid modes: eager, channels_last'),
    (['--modes', 'tensorrt'], 'winograd, onnxruntime, openvino, openvino-bf16, '
                              'onnxruntime-int8, openvino-int8, aoti, winograd-aoti, auto, '
                              'all'),
    (['--resnets', '42'], '--resnets takes depths'),
    (['--recommend', 'a.py', 'b.pth', 'c'], '--recommend takes CONFIG [CHECKPOINT]'),
])
def test_tool_bad_arguments(argv, message):
    proc = run_tool(*argv)
    assert proc.returncode == 2
    assert message in proc.stderr
