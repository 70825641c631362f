"""The QARepVGG block through the tools, and tools/quantize.py (apis.deploy.quantize):
INT8 files calibrated on the config's data and scored by tools/test.py --backend
(apis.test).

RepVGG-A0 PSPNets after one training iteration on the mini data, in-process, with the
fixtures of tests/conftest.py and the helpers of tests/helpers.py.
"""
import json
import os.path as osp
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from helpers import (DET_CONFIG, DET_MODEL, SEG_CONFIG, SEG_MODEL, assert_no_temporary_files,
                     assert_plain_graph, assert_same_segmentation, log_text, parse_options,
                     run_convert, run_entry, run_export, run_test, seg_maps,
                     train_one_iteration, working_dir)
from mmrepvgg.apis.config import load_config
from mmrepvgg.apis.deploy import quantize
from mmrepvgg.deploy import load_backend
from mmrepvgg.deploy.quantize import calibration_inputs, sqnr_db
from mmrepvgg.errors import MMRepVGGError

QA_MODEL = SEG_MODEL + ['model.backbone.block=qa']


@pytest.fixture(scope='module')
def qa_seg(mini_root, tmp_path_factory):
    """A QARepVGG-A0 PSPNet after one iteration, and its fp32 ONNX export."""
    work = tmp_path_factory.mktemp('qa_train')
    ckpt = train_one_iteration(mini_root, work, SEG_CONFIG, QA_MODEL)
    fixture = SimpleNamespace(root=mini_root, work=work, ckpt=ckpt)
    fixture.onnx = work / 'pspnet.onnx'
    run_export(fixture, SEG_CONFIG, fixture.ckpt, fixture.onnx, QA_MODEL)
    return fixture


def _quantize(fixture, model, output, model_args=QA_MODEL, **kwargs):
    """apis.deploy.quantize (tools/quantize.py) on mini data, ``kwargs`` its further
    arguments (calib, method, per_channel, ...): the report."""
    return run_entry(quantize, fixture.root, SEG_CONFIG, model, output, mini=True,
                     options=model_args, **kwargs)


def _metadata(path):
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


# ------------------------------------------------------------- QA block through the tools
def test_qa_pspnet_deploys_converts_and_exports_as_plain_convs(qa_seg, tmp_path):
    def test(ckpt, name, **kwargs):
        return run_test(qa_seg, SEG_CONFIG, ckpt, tmp_path / name,
                        tmp_path / f'{name}_maps', QA_MODEL, **kwargs)

    plain, _ = test(qa_seg.ckpt, 'plain')
    deploy, deploy_work = test(qa_seg.ckpt, 'deploy', deploy=True)
    assert 'ReparamHook: fused 22 blocks' in log_text(deploy_work)
    fused = tmp_path / 'fused.pth'
    run_convert(qa_seg.root, SEG_CONFIG, qa_seg.ckpt, fused, QA_MODEL)
    converted, _ = test(fused, 'converted', deploy=True)
    reference = seg_maps(tmp_path / 'plain_maps')
    assert_same_segmentation(reference, seg_maps(tmp_path / 'deploy_maps'), plain, deploy)
    assert_same_segmentation(reference, seg_maps(tmp_path / 'converted_maps'), plain,
                             converted)

    report = run_export(qa_seg, SEG_CONFIG, qa_seg.ckpt, tmp_path / 'backbone.onnx', QA_MODEL,
                        part='backbone')
    assert report['node_types'] == {'Conv': 22, 'Relu': 22}
    assert_plain_graph(report['node_types'])
    assert report['parity']['within']


# ------------------------------------------------------------------------- quantization
def test_int8_pspnet_is_written_calibrated_and_scored_in_both_backends(qa_seg, tmp_path):
    out = tmp_path / 'pspnet_int8.onnx'
    report = _quantize(qa_seg, qa_seg.onnx, out, calib=2)
    assert_no_temporary_files(tmp_path)
    assert report['calibration_images'] == 2
    assert report['quantized_ops']['QuantizeLinear'] > 0
    meta = _metadata(out)
    settings = json.loads(meta['mmrepvgg.quantization'])
    assert settings['method'] == 'minmax' and settings['calibration_images'] == 2
    assert settings['split'] == 'test' and settings['toolkit'].startswith('onnxruntime')
    # the export's own metadata is kept, so tools/test.py checks the file as any other
    assert meta['mmrepvgg.part'] == 'segmentor' and meta['mmrepvgg.config'] == osp.basename(
        SEG_CONFIG)

    # Every conv runs on int8 weights, one scale per output channel.
    proto = onnx.load(str(out))
    init = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    convs = [n for n in proto.graph.node if n.op_type == 'Conv']
    assert len(convs) == 28  # 22 backbone blocks, 4 pyramid-pooling convs, bottleneck, cls
    for conv in convs:
        weight = producers[conv.input[1]]
        assert weight.op_type == 'DequantizeLinear'
        assert init[weight.input[0]].dtype == np.int8
        assert init[weight.input[1]].shape == (init[weight.input[0]].shape[0],)

    # Independent of the tool's report: the INT8 outputs follow the fp32 file's on the
    # calibration images far closer than noise would (a broken range gives <= 0 dB);
    # 8-bit quantization of ~30 stacked layers keeps tens of dB.
    assert report['sqnr_db'] > 12, report['sqnr_db']
    with working_dir(qa_seg.root):  # the mini data's paths are relative
        # the config as tools/quantize.py CONFIG ... --mini --cfg-options QA_MODEL reads it
        cfg = load_config(SEG_CONFIG, cfg_options=parse_options(QA_MODEL), mini=True)
        images = calibration_inputs(cfg, 2)
        # training images read through the test pipeline: the exported shape, not crops
        train = calibration_inputs(cfg, 3, 'train')
    assert [tuple(x.shape) for x in images + train] == [(1, 3, 128, 256)] * 5
    assert not any(torch.equal(a, b) for a in images for b in train)
    fp32, int8 = load_backend(str(qa_seg.onnx)), load_backend(str(out))
    assert int8.quantized and not fp32.quantized
    sqnr = sqnr_db([t for x in images for t in fp32(x)], [t for x in images for t in int8(x)])
    assert abs(sqnr - report['sqnr_db']) < 1e-6

    for backend in ('onnxruntime', 'openvino'):
        metrics, work = run_test(qa_seg, SEG_CONFIG, out, tmp_path / backend,
                                 tmp_path / f'{backend}_maps', QA_MODEL, backend=backend)
        assert {'aAcc', 'mIoU', 'mAcc'} <= set(metrics) and metrics['aAcc'] > 0
        assert 'testing the INT8 (QDQ) model' in log_text(work)


def _activation_scales(path):
    proto = onnx.load(str(path))
    init = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    return sorted(float(init[n.input[1]]) for n in proto.graph.node
                  if n.op_type == 'QuantizeLinear' and n.input[0] not in init)


def test_calibration_methods_and_per_tensor_weights(qa_seg, tmp_path):
    scales = {}
    for method in ('minmax', 'percentile', 'entropy'):
        out = tmp_path / f'{method}.onnx'
        report = _quantize(qa_seg, qa_seg.onnx, out, calib=2, method=method)
        assert json.loads(_metadata(out)['mmrepvgg.quantization'])['method'] == method
        assert np.isfinite(report['sqnr_db'])
        scales[method] = _activation_scales(out)
    # Same tensors quantized, ranges chosen differently: percentile and entropy clip
    # below the observed extremes minmax keeps.
    assert len(scales['minmax']) == len(scales['percentile']) == len(scales['entropy'])
    for method in ('percentile', 'entropy'):
        assert scales[method] != scales['minmax']
        assert sum(scales[method]) < sum(scales['minmax'])

    out = tmp_path / 'per_tensor.onnx'
    _quantize(qa_seg, qa_seg.onnx, out, calib=2, per_channel=False)  # --per-tensor
    proto = onnx.load(str(out))
    init = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    weight_scales = [init[n.input[1]] for n in proto.graph.node
                     if n.op_type == 'DequantizeLinear' and init.get(n.input[0]) is not None
                     and init[n.input[0]].dtype == np.int8]
    assert weight_scales and all(s.size == 1 for s in weight_scales)


def test_bad_input_is_refused_and_writes_nothing(qa_seg, tmp_path):
    out = tmp_path / 'int8.onnx'

    def refused(model, model_args=QA_MODEL, **kwargs):
        with pytest.raises(MMRepVGGError) as err:
            _quantize(qa_seg, model, out, model_args, **kwargs)
        assert not out.exists()
        assert_no_temporary_files(tmp_path)
        return str(err.value)

    # a calibration set larger than the data
    msg = refused(qa_seg.onnx, calib=3)
    assert 'asked for 3 calibration images' in msg and 'holds only 2' in msg
    # data the config cannot load: a data root that holds no dataset (--mini writes the
    # synthetic one only where the folder is absent or empty)
    stray = tmp_path / 'nowhere' / 'mini_cityscapes' / 'README'
    stray.parent.mkdir(parents=True)
    stray.write_text('not a dataset')
    msg = refused(qa_seg.onnx, calib=1, model_args=QA_MODEL + [
        f'test_dataloader.dataset.data_root={stray.parent}'])
    assert 'cannot load the calibration data from test_dataloader' in msg and 'nowhere' in msg
    # an already quantized file
    int8 = tmp_path / 'done' / 'int8.onnx'
    _quantize(qa_seg, qa_seg.onnx, int8, calib=1)
    msg = refused(int8, calib=1)
    assert 'already quantized' in msg and 'QuantizeLinear' in msg
    # an ONNX file that tools/export.py did not write
    foreign = tmp_path / 'foreign.onnx'
    proto = onnx.load(str(qa_seg.onnx))
    del proto.metadata_props[:]
    onnx.save(proto, str(foreign))
    assert 'was not written by tools/export.py' in refused(foreign, calib=1)
    foreign.unlink()
    # not ONNX at all, and outputs that would overwrite the input or are not .onnx
    junk = tmp_path / 'junk.onnx'
    junk.write_bytes(b'not a model')
    assert 'is not an ONNX model' in refused(junk, calib=1)
    with pytest.raises(MMRepVGGError, match='OUTPUT is the input file'):
        run_entry(quantize, qa_seg.root, SEG_CONFIG, qa_seg.onnx, qa_seg.onnx, mini=True,
                  calib=1, options=QA_MODEL)
    with pytest.raises(MMRepVGGError, match='must end with .onnx'):
        run_entry(quantize, qa_seg.root, SEG_CONFIG, qa_seg.onnx, tmp_path / 'int8.pth',
                  mini=True, calib=1, options=QA_MODEL)
    assert not (tmp_path / 'int8.pth').exists()


def test_int8_two_stage_detector_keeps_its_roi_head_weights(det, tmp_path):  # noqa: F811
    """Given the checkpoint, the tool exports the detector (with dynamic sizes: its test
    images differ) beside the output, quantizes it and keeps only the INT8 file and the
    RoI head's weights."""
    out = tmp_path / 'frcnn_int8.onnx'
    report = run_entry(quantize, det.root, DET_CONFIG, det.ckpt, out, mini=True, calib=2,
                       options=DET_MODEL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['frcnn_int8.onnx',
                                                          'frcnn_int8.torch.pth']
    assert report['torch_part'] == str(tmp_path / 'frcnn_int8.torch.pth')
    meta = _metadata(out)
    assert meta['mmrepvgg.torch_part'] == 'frcnn_int8.torch.pth'
    assert json.loads(meta['mmrepvgg.input_shape']) == [None, 3, None, None]
    metrics, _ = run_test(det, DET_CONFIG, out, tmp_path / 'ort', tmp_path / 'ort.pkl',
                          DET_MODEL, backend='onnxruntime')
    assert 'coco/bbox_mAP' in metrics


def test_quantization_report_scores_every_form(qa_seg, tmp_path):
    from mmrepvgg.benchmark.quantization_report import quantization_study
    with working_dir(qa_seg.root):  # what tools/quantization_report.py runs
        results = quantization_study(SEG_CONFIG, str(qa_seg.ckpt), str(tmp_path), calib=2,
                                     methods=['minmax'], sqnr_images=2, mini=True,
                                     cfg_options=parse_options(QA_MODEL))
    metrics = results['metrics']
    assert list(metrics) == ['torch fp32', 'torch fused fp32', 'onnxruntime fp32',
                             'onnxruntime int8 minmax']
    # fusion and export keep the metric (a pixel tie may move it by 0.05, see test_tools)
    for form in ('torch fused fp32', 'onnxruntime fp32'):
        for key, value in metrics['torch fp32'].items():
            assert abs(metrics[form][key] - value) <= 0.05, (form, key)
    sqnr = results['sqnr_db']['minmax']
    assert list(sqnr) == ['stage 1', 'stage 2', 'stage 3', 'stage 4', 'all']
    assert all(0 < v < 100 for v in sqnr.values()), sqnr
    # one entry per fused block, each kernel's largest weight beyond its std
    assert len(results['weight_ranges']) == 22
    assert all(r > 1 for _, r in results['weight_ranges'])
