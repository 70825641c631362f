"""Quantization-aware fine-tuning: tools/train.py --qat through mmengine's runner, the QAT
checkpoint tested in torch and exported to an INT8 QDQ ONNX file that ONNX Runtime and
OpenVINO run, judged against the fake-quantized model it came from."""
import pytest
import torch
from helpers import (QAT_TRAIN, SEG_CONFIG, SEG_MODEL, TEST, load_state, parse_options,
                     run_entry, working_dir)
from mmengine.registry import init_default_scope

from mmrepvgg import apis
from mmrepvgg.apis.config import load_config
from mmrepvgg.apis.deploy import export
from mmrepvgg.deploy import load_backend
from mmrepvgg.deploy.quantize import calibration_inputs
from mmrepvgg.errors import InputError
from mmrepvgg.qat import (FixedQuantizer, QATModel, QuantizedPart, freeze_quantizers,
                          is_qat_state, use_reference_kernels)
from mmrepvgg.qat.export import load_qat_model


def _convs(module):
    return sum(isinstance(m, torch.nn.Conv2d) for m in module.modules())


def test_finetune_runs_in_the_runner_and_its_checkpoint_holds_the_quantizers(qat, seg):
    log = (next(qat.work.glob('*/*.log'))).read_text()
    assert 'QAT: ' in log and 'ranges from 2 calibration images' in log
    assert log.count('Iter(val)') == 2 and 'mIoU' in log  # evaluated after each iteration
    state = load_state(qat.ckpt)
    assert is_qat_state(state) and not is_qat_state(load_state(seg.ckpt))
    model = load_qat_model(SEG_CONFIG, state, _options())
    # one int8 per-channel quantizer per conv of the exported network: the fused backbone
    # (22 blocks) and the heads' convs, their BN folded in
    counts = model.quantizer_counts()
    exported = QuantizedPart(model.model)
    assert counts['weights'] == _convs(exported) - _convs(model.model.auxiliary_head)
    assert counts['activations'] > 0
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in exported.modules())
    # what is exported is what was trained: the wrapped model's own forward (input
    # quantizer included), then the segmentor's resize to the input size
    x = torch.randn(1, 3, 128, 256)
    with torch.no_grad():
        trained = torch.nn.functional.interpolate(
            model.model(x), size=x.shape[2:], mode='bilinear',
            align_corners=model.model.decode_head.align_corners)
        assert torch.equal(exported(x)[0], trained)


def _options():
    return parse_options(SEG_MODEL)


def test_qat_checkpoint_tests_as_it_validated(qat, seg):
    """tools/test.py recognises a QAT checkpoint and builds the quantized model for it:
    the metric is the one the run's last validation logged."""
    metrics = run_entry(apis.test, seg.root, SEG_CONFIG, str(qat.ckpt), mini=True,
                        work_dir=qat.work / 'test', options=SEG_MODEL
                        + ['test_dataloader.dataset.indices=2'])
    log = next(qat.work.glob('2*/*.log')).read_text()
    last_val = log[log.rindex('Iter(val)'):].split('\n')[0]
    assert f'mIoU: {metrics["mIoU"]:.4f}' in last_val


def test_exported_file_is_int8_and_predicts_as_the_fake_quantized_model(qat, seg):
    report = qat.report
    assert report['quantized_ops']['QuantizeLinear'] >= report['quantizers']['weights']
    assert report['quantized_ops']['DequantizeLinear'] >= report['quantizers']['weights']
    assert report['parity']['within']
    assert not (qat.work / 'qat.torch.pth').exists()  # no weights run outside the file
    model = load_qat_model(SEG_CONFIG, load_state(qat.ckpt), _options())
    freeze_quantizers(model.model)
    network = QuantizedPart(model.model).eval()
    cfg = load_config(SEG_CONFIG, cfg_options=_options(), mini=True)
    with working_dir(seg.root):
        images = calibration_inputs(cfg, 2, 'test')
    # On the test images, every backend's class map may differ from the fake-quantized
    # model's in fewer pixels than that model's differs from its own float network (the
    # integer kernels may round a tie the other way, no more).
    with torch.no_grad():
        fake = [network(x)[0].argmax(1) for x in images]
        floats = [QuantizedPart.__mro__[1].forward(network, x)[0].argmax(1) for x in images]
    quantization_flips = sum(int((f != q).sum()) for f, q in zip(floats, fake))
    for backend in ('onnxruntime', 'openvino'):
        runner = load_backend(str(qat.onnx), backend)
        assert runner.quantized
        flips = sum(int((runner(x)[0].argmax(1) != q).sum()) for x, q in zip(images, fake))
        assert flips <= max(quantization_flips, 1), backend


def test_backends_score_the_file_with_the_configs_metric(qat, seg):
    for backend in ('onnxruntime', 'openvino'):
        metrics = run_entry(apis.test, seg.root, SEG_CONFIG, str(qat.onnx), mini=True,
                            backend=backend, work_dir=qat.work / backend,
                            options=SEG_MODEL + TEST)
        assert 0 <= metrics['mIoU'] <= 100


def test_fixed_quantizers_compute_what_nncf_trained(qat):
    """The export's quantizers give NNCF's values, up to a rounding tie (one step)."""
    from nncf.torch.function_hook.wrapper import get_hook_storage
    from nncf.torch.quantization.layers import BaseQuantizer
    model = load_qat_model(SEG_CONFIG, load_state(qat.ckpt), _options())
    torch.manual_seed(0)
    checked = 0
    for _, quantizer in get_hook_storage(model.model).named_hooks():
        if not isinstance(quantizer, BaseQuantizer):
            continue
        fixed = FixedQuantizer(quantizer)
        shape = list(quantizer.scale_shape)
        x = torch.randn([max(s, 2) for s in shape[:1]] + [8] * (len(shape) - 1)
                        if quantizer.per_channel else [1, 4, 8, 8]) * 3 * fixed.scale.max()
        with torch.no_grad():
            want, got = quantizer(x), fixed(x)
        step = fixed.scale.reshape([-1] + [1] * (x.dim() - 1)) if fixed.scale.dim() \
            else fixed.scale
        diff = (want - got).abs()
        # the same grid point, up to float rounding of its value; another one (a tie
        # rounded the other way) for a few inputs at most, and never further than a step
        assert (diff <= step * 1.001).all()
        assert (diff > step * 1e-3).float().mean() < 0.01
        checked += 1
    assert checked == sum(model.quantizer_counts().values())


def test_bad_requests_say_what_is_wrong(qat, seg, tmp_path):
    init_default_scope('mmseg')
    cfg = load_config(SEG_CONFIG, cfg_options=_options(), mini=True)
    with pytest.raises(ValueError, match='QAT checkpoint already'):
        with working_dir(seg.root):
            QATModel(cfg.model, checkpoint=str(qat.ckpt))
    with pytest.raises(ValueError, match='needs calibration'):
        with working_dir(seg.root):
            QATModel(cfg.model, checkpoint=str(seg.ckpt))
    with pytest.raises(InputError):
        run_entry(apis.train, seg.root, SEG_CONFIG, mini=True, work_dir=tmp_path,
                  qat=str(tmp_path / 'missing.pth'), options=QAT_TRAIN + SEG_MODEL)
    with pytest.raises(InputError, match='drop --format'):
        run_entry(export, seg.root, SEG_CONFIG, qat.ckpt, tmp_path / 'x.pt2',
                  format='aoti', mini=True, options=SEG_MODEL)
    # quantizers placed for another network: the checkpoint says so instead of loading
    state = dict(load_state(qat.ckpt)['state_dict'])
    unquantized = QATModel(cfg.model)
    unquantized.set_extra_state(state['_extra_state'])
    assert unquantized.quantized
    with pytest.raises(ValueError, match='quantizers sit elsewhere'):
        unquantized.set_extra_state(state['_extra_state'].replace('conv2d/0', 'conv2d/9'))
    assert not list(tmp_path.glob('*.pth')) and not (tmp_path / 'x.pt2').exists()


def test_cuda_without_nvcc_uses_nncfs_torch_kernels(monkeypatch):
    """pip's CUDA torch brings no nvcc, and NNCF would stop compiling its CUDA kernels:
    on such a machine (simulated: CUDA loader present, no toolkit) it gets its reference
    kernels instead, before anything compiles."""
    from nncf.torch.quantization import extensions, quantize_functions
    from nncf.torch.quantization.reference import ReferenceQuantizedFunctions
    import mmrepvgg.env as env
    namespace = extensions.ExtensionNamespace(extensions.QuantizedFunctionsCUDALoader())
    monkeypatch.setattr(extensions, 'QuantizedFunctionsCUDA', namespace)
    monkeypatch.setattr(quantize_functions, 'QuantizedFunctionsCUDA', namespace)
    monkeypatch.setattr(env, 'find_cuda_toolkit', lambda: ('/usr/local/cuda', '12.8', 'PATH'))
    assert use_reference_kernels('cuda:0') is None  # a toolkit: NNCF compiles
    assert use_reference_kernels('cpu') is None
    monkeypatch.setattr(env, 'find_cuda_toolkit', lambda: (None, None, ''))
    reason = use_reference_kernels('cuda')
    assert 'nvcc' in reason
    assert namespace.get('Quantize_forward') is ReferenceQuantizedFunctions.Quantize_forward


def _qdq_concat_graph(second_scale):
    """input -> two quantized branches (scales 0.05 and ``second_scale``) -> Concat ->
    1x1 Conv: the shape NNCF's shared concat quantizer exports to."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper
    inits = [numpy_helper.from_array(np.array(v, dtype=np.float32), n)
             for n, v in (('s1', 0.05), ('s2', second_scale))]
    inits += [numpy_helper.from_array(np.array(3, dtype=np.uint8), 'z'),
              numpy_helper.from_array(np.ones((2, 4, 1, 1), np.float32), 'w')]
    nodes = []
    for i, scale in ((1, 's1'), (2, 's2')):
        nodes += [helper.make_node('Relu' if i == 1 else 'Neg', ['x'], [f'a{i}']),
                  helper.make_node('QuantizeLinear', [f'a{i}', scale, 'z'], [f'q{i}']),
                  helper.make_node('DequantizeLinear', [f'q{i}', scale, 'z'], [f'd{i}'])]
    nodes += [helper.make_node('Concat', ['d1', 'd2'], ['cat'], axis=1),
              helper.make_node('Conv', ['cat', 'w'], ['y'])]
    graph = helper.make_graph(
        nodes, 'g', [helper.make_tensor_value_info('x', TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info('y', TensorProto.FLOAT, [1, 2, 4, 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid('', 18)], ir_version=9)


def test_concats_on_one_grid_are_requantized_without_changing_a_value():
    import numpy as np
    import onnx
    import onnxruntime
    from mmrepvgg.qat import requantize_concats

    def run(proto):
        session = onnxruntime.InferenceSession(proto.SerializeToString(),
                                               providers=['CPUExecutionProvider'])
        return session.run(None, {'x': x})[0]
    x = np.random.default_rng(0).normal(size=(1, 2, 4, 4)).astype(np.float32)
    proto = _qdq_concat_graph(0.05)
    before = run(proto)
    assert requantize_concats(proto) == 1
    onnx.checker.check_model(proto)
    conv = next(n for n in proto.graph.node if n.op_type == 'Conv')
    reader = next(n for n in proto.graph.node if conv.input[0] in n.output)
    assert reader.op_type == 'DequantizeLinear'  # ONNX Runtime's int8 conv pattern
    assert np.array_equal(run(proto), before)
    assert requantize_concats(_qdq_concat_graph(0.07)) == 0  # two grids: left alone


def test_recommend_lists_the_qat_file_beside_post_training_int8(qat, seg, capsys):
    """benchmark.py --recommend --metric --qat: the QAT file's forms are timed and scored
    as their commands (export the QAT checkpoint, test it in the backend) would, beside
    the other forms."""
    from mmrepvgg.benchmark.recommend import format_recommendation, recommend
    from mmrepvgg.errors import UsageError
    forms = (('eager', 'fp32'),)  # the post-training forms: tests/test_recommend.py
    with working_dir(seg.root):
        result = recommend(SEG_CONFIG, str(seg.ckpt), cfg_options=_options(), mini=True,
                           forms=forms, repeats=1, warmup=0, time_limit=1e-6, metric=True,
                           qat=str(qat.ckpt))
        with pytest.raises(UsageError, match='holds no quantizers'):
            recommend(SEG_CONFIG, str(seg.ckpt), cfg_options=_options(), mini=True,
                      forms=forms, qat=str(seg.ckpt))
    rows = {r['mode']: r for r in result['rows']}
    assert set(rows) | {k.split()[0] for k in result['left_out']} == {
        'eager', 'onnxruntime-qat', 'openvino-qat'}
    for mode, backend in (('onnxruntime-qat', 'onnxruntime'), ('openvino-qat', 'openvino')):
        row = rows[mode]
        assert row['precision'] == 'int8' and row['ms'] > 0
        assert isinstance(row['metric'], float), row.get('metric_error')
        assert row['drop'] == pytest.approx(result['base_metric'] - row['metric'])
        assert row['commands'][0].startswith(f'python tools/export.py {SEG_CONFIG} '
                                             f'{qat.ckpt} model_qat.onnx')
        assert f'--backend {backend}' in row['commands'][1]
    assert 'onnxruntime-qat' in format_recommendation(result)


def test_a_two_stage_detector_is_refused_for_export():
    """Its tensor-mode forward runs the RoI head too, which the exported network does not
    hold: exporting its QAT model would quantize something else than what was trained."""
    from helpers import DET_CONFIG, DET_MODEL
    cfg = load_config(DET_CONFIG, cfg_options=parse_options(DET_MODEL))
    init_default_scope('mmdet')
    from mmengine.registry import MODELS
    with pytest.raises(ValueError, match='segmentor or a single-stage detector'):
        QuantizedPart(MODELS.build(cfg.model))


def test_nncf_waits_longer_for_its_kernels_unless_told():
    """NNCF gives its kernel build 60 s, which a busy small machine exceeds."""
    import os
    import subprocess
    import sys
    code = 'import os, mmrepvgg; print(os.environ["NNCF_EXTENSION_LOAD_TIMEOUT"])'
    env = {k: v for k, v in os.environ.items() if k != 'NNCF_EXTENSION_LOAD_TIMEOUT'}
    for given, seen in ((None, '600'), ('42', '42')):
        run_env = env if given is None else dict(env, NNCF_EXTENSION_LOAD_TIMEOUT=given)
        out = subprocess.run([sys.executable, '-c', code], env=run_env, capture_output=True,
                             text=True, timeout=300)
        assert out.stdout.strip().splitlines()[-1] == seen, out.stderr[-2000:]
