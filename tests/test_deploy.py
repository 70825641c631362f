"""mmrepvgg.apis.deploy.export and apis.test with a backend (tools/export.py,
tools/test.py --backend): the fused network leaves torch.

Runs at RepVGG-A0 size on the mini data, in-process, as tests/test_tools.py does (the
session's trained models of tests/conftest.py, the comparisons of tests/helpers.py).
"""
import copy
import json
import os
import os.path as osp

import onnx
import pytest
import torch
from torch import nn

from helpers import (DET_CONFIG, DET_MODEL, ROOT, SEG_CONFIG, SEG_MODEL,
                     assert_files_score_as_deploy, assert_no_temporary_files,
                     assert_plain_graph, assert_same_detections, det_results, fingerprint,
                     run_entry, run_export, run_test)
from mmrepvgg import RepVGG, reparameterize
from mmrepvgg.apis.deploy import export
from mmrepvgg.convert import build_model_from_config
from mmrepvgg.deploy import ExportedPart, ExportFailure, export_module, load_backend
from mmrepvgg.deploy.parts import attach_backend
from mmrepvgg.errors import MMRepVGGError
from mmrepvgg.reparam import randomize_norm_stats

RETINA_CONFIG = osp.join(ROOT, 'configs', 'retinanet_repvgg-a2_fpn_1x_coco.py')
RETINA_MODEL = ['model.backbone.arch=A0', 'model.neck.in_channels=[48,96,192,1280]',
                'model.test_cfg.score_thr=0.0', 'model.test_cfg.max_per_img=20']
BACKENDS = ('onnxruntime', 'openvino')


# ------------------------------------------------------------- export and parity report
def test_backbone_part_is_only_conv_and_relu(seg, tmp_path):
    out = tmp_path / 'backbone.onnx'
    report = run_export(seg, SEG_CONFIG, seg.ckpt, out, SEG_MODEL, part='backbone')
    assert report['kind'] == 'backbone' and report['fusion']['blocks'] == 22
    assert set(report['node_types']) == {'Conv', 'Relu'}, report['node_types']
    assert report['node_types'] == {'Conv': 22, 'Relu': 22}
    proto = onnx.load(str(out))
    assert all(len(n.input) == 3 for n in proto.graph.node if n.op_type == 'Conv')  # bias
    assert report['parity']['within']
    assert_no_temporary_files(tmp_path)


@pytest.mark.parametrize('se', [False, True])
def test_exported_backbone_graph_without_and_with_fusion(se, tmp_path):
    """Fused: Conv + Relu (+ SE's pooling, 1x1 convs and gating); the training form for
    contrast keeps BatchNormalization and the branch Adds, so the count can fail."""
    arch = dict(num_blocks=(1, 1, 1, 1), width_factors=(0.25, 0.25, 0.25, 0.25),
                se_ratio=4 if se else None)
    torch.manual_seed(0)
    model = randomize_norm_stats(RepVGG(arch)).eval()
    x = torch.randn(1, 3, 32, 32)
    types = {}
    for name, net in (('fused', reparameterize(model)), ('train', model)):
        path = tmp_path / f'{name}.onnx'
        export_module(net, x, str(path))
        types[name] = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert_plain_graph(types['fused'])
    allowed = {'Conv', 'Relu'} | ({'ReduceMean', 'GlobalAveragePool', 'Sigmoid', 'Mul'}
                                  if se else set())
    assert types['fused'] <= allowed and {'Conv', 'Relu'} <= types['fused'], types
    assert {'Add'} <= types['train'], types['train']  # the 3-branch form is not plain


def test_export_of_a_module_whose_train_returns_none(tmp_path):
    class Backbone(nn.Conv2d):  # as mmdet's ResNet, whose train() returns None
        def train(self, mode=True):
            super().train(mode)

    net, x = Backbone(3, 4, 3), torch.randn(1, 3, 8, 8)
    export_module(net, x, str(tmp_path / 'net.onnx'))
    out = load_backend(str(tmp_path / 'net.onnx'), 'onnxruntime')(x)[0]
    assert out.shape == net(x).shape


# -------------------------------------------------------------- backends: same metrics
def test_segmentor_backends_score_as_deploy(seg, tmp_path):
    out = tmp_path / 'pspnet.onnx'
    report = run_export(seg, SEG_CONFIG, seg.ckpt, out, SEG_MODEL)
    assert report['kind'] == 'segmentor' and report['output_names'] == ['seg_logits']
    assert report['input_shape'] == [1, 3, 128, 256]  # the mini test images
    assert report['parity']['within'] and report['torch_part'] is None
    assert 'BatchNormalization' not in report['node_types']  # head BNs folded too
    assert_no_temporary_files(tmp_path)
    assert_files_score_as_deploy(seg, tmp_path, [(b, out, b) for b in BACKENDS])


def assert_detections_match_deploy(fixture, config, ckpt, onnx_file, model_args, folder,
                                   backends):
    """tools/test.py --backend gives the boxes and COCO metrics of torch --deploy;
    returns the test runner for more calls."""
    def test(name, path, **kwargs):
        return run_test(fixture, config, path, folder / name, folder / f'{name}.pkl',
                        model_args, **kwargs)

    reference, _ = test('deploy', ckpt, deploy=True)
    boxes = det_results(folder / 'deploy.pkl')
    for backend in backends:
        metrics, _ = test(backend, onnx_file, backend=backend)
        print(f'\n{osp.basename(config)} (A0) mini: torch --deploy {reference}; {backend} '
              f'{metrics}')
        assert metrics == reference
        got = det_results(folder / f'{backend}.pkl')
        for img_id, ref in boxes.items():
            assert_same_detections(ref, got[img_id])
    return test


def test_two_stage_detector_backends_match_deploy(det, tmp_path):
    out = tmp_path / 'frcnn.onnx'
    report = run_export(det, DET_CONFIG, det.ckpt, out, DET_MODEL, dynamic=True)
    assert report['kind'] == 'two_stage' and report['input_shape'] == [None, 3, None, None]
    names = report['output_names']
    assert names[:5] == [f'feat_{i}' for i in range(5)] and len(names) == 15, names
    # the RoI head runs in torch: its weights travel beside the ONNX file
    assert report['torch_part'] == str(tmp_path / 'frcnn.torch.pth')
    assert osp.isfile(report['torch_part'])
    meta = {p.key: p.value for p in onnx.load(str(out), load_external_data=False)
            .metadata_props}
    assert meta['mmrepvgg.torch_part'] == 'frcnn.torch.pth'
    assert json.loads(meta['mmrepvgg.groups']) == [['feat', 5], ['cls_score', 5],
                                                   ['bbox_pred', 5]]

    test = assert_detections_match_deploy(det, DET_CONFIG, det.ckpt, out, DET_MODEL,
                                          tmp_path, BACKENDS)

    # Without its RoI-head weights the file cannot be tested; the message says why.
    os.remove(report['torch_part'])
    with pytest.raises(MMRepVGGError, match='needs the weights of the part that runs in'):
        test('missing', out, backend='onnxruntime')


def test_single_stage_detector_backends_match_deploy(det, tmp_path):
    _, model = build_model_from_config(RETINA_CONFIG, {
        'model.backbone.arch': 'A0', 'model.neck.in_channels': [48, 96, 192, 1280],
        'model.backbone.init_cfg': None})
    torch.manual_seed(0)
    randomize_norm_stats(model)
    ckpt = tmp_path / 'retina.pth'
    torch.save(dict(meta={}, state_dict=model.state_dict()), ckpt)
    out = tmp_path / 'retina.onnx'
    report = run_export(det, RETINA_CONFIG, ckpt, out, RETINA_MODEL, dynamic=True)
    assert report['kind'] == 'single_stage' and report['torch_part'] is None
    assert report['output_names'][:1] == ['cls_score_0'] and len(report['output_names']) == 10

    assert_detections_match_deploy(det, RETINA_CONFIG, ckpt, out, RETINA_MODEL, tmp_path,
                                   ('onnxruntime',))


# ------------------------------------------------------- the cut itself is exact in torch
@pytest.mark.parametrize('config,model_args', [
    (SEG_CONFIG, {'model.backbone.arch': 'A0', 'model.decode_head.in_channels': 1280,
                  'model.auxiliary_head.in_channels': 192}),
    (DET_CONFIG, {'model.backbone.arch': 'A0', 'model.neck.in_channels': [48, 96, 192, 1280],
                  'model.test_cfg.rcnn.score_thr': 0.0}),
    (RETINA_CONFIG, {'model.backbone.arch': 'A0',
                     'model.neck.in_channels': [48, 96, 192, 1280],
                     'model.test_cfg.score_thr': 0.0}),
], ids=['segmentor', 'two_stage', 'single_stage'])
def test_attached_part_predicts_exactly_as_the_model(config, model_args):
    """With the exported part itself as the 'backend', predictions are bit-identical to
    the model's own predict: the cut and the re-nesting lose nothing."""
    _, model = build_model_from_config(config, dict(model_args, **{
        'model.backbone.init_cfg': None}))
    torch.manual_seed(0)
    model = randomize_norm_stats(model).eval()
    x = torch.randn(1, 3, 96, 128)
    meta = dict(img_shape=(96, 128), ori_shape=(96, 128), pad_shape=(96, 128),
                scale_factor=(1.0, 1.0), batch_input_shape=(96, 128))
    if config == SEG_CONFIG:
        from mmseg.structures import SegDataSample
        sample = SegDataSample(metainfo=meta)
    else:
        from mmdet.structures import DetDataSample
        sample = DetDataSample(metainfo=meta)
    with torch.no_grad():
        expected = model.predict(x, [copy.deepcopy(sample)])[0]
        part = ExportedPart(copy.deepcopy(model))
        part(x)  # sets the groups
        attach_backend(model, lambda inputs: list(part(inputs)), part.kind, part.groups)
        got = model.predict(x, [copy.deepcopy(sample)])[0]
    if config == SEG_CONFIG:
        assert torch.equal(got.seg_logits.data, expected.seg_logits.data)
    else:
        for key in ('bboxes', 'scores', 'labels'):
            assert torch.equal(got.pred_instances[key], expected.pred_instances[key]), key
        assert len(expected.pred_instances) > 0


# -------------------------------------------------------------------------- bad input
def test_parity_failure_writes_nothing(seg, tmp_path, monkeypatch):
    """A file 1e-3 off in one conv bias fails the check; nothing is left at OUTPUT."""
    from mmrepvgg.deploy import onnx_export
    from onnx import numpy_helper
    real = onnx_export.export_module

    def export_then_perturb(*args, **kwargs):
        real(*args, **kwargs)
        path = args[2]
        proto = onnx.load(path)
        conv = next(n for n in proto.graph.node if n.op_type == 'Conv')
        bias = next(i for i in proto.graph.initializer if i.name == conv.input[2])
        bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 1e-3, bias.name))
        onnx.save(proto, path)

    monkeypatch.setattr(onnx_export, 'export_module', export_then_perturb)
    out = tmp_path / 'bad.onnx'
    with pytest.raises(MMRepVGGError, match='disagrees with the torch model'):
        run_export(seg, SEG_CONFIG, seg.ckpt, out, SEG_MODEL, part='backbone')
    assert os.listdir(tmp_path) == []


def test_unsupported_op_names_the_op_and_the_module(tmp_path):
    @torch.library.custom_op('mmrepvgg_test::unexportable', mutates_args=())
    def unexportable(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @unexportable.register_fake
    def _(x):
        return torch.empty_like(x)

    class Odd(nn.Module):
        def forward(self, x):
            return unexportable(x) + 1

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.odd = nn.Conv2d(3, 4, 3), Odd()

        def forward(self, x):
            return self.odd(self.conv(x))

    out = tmp_path / 'net.onnx'
    with pytest.raises(ExportFailure, match=r'unexportable in Net\.odd') as err:
        export_module(Net(), torch.randn(1, 3, 8, 8), str(out))
    print(f'\n{err.value}')
    assert os.listdir(tmp_path) == []


def test_backend_refuses_files_that_do_not_fit(seg, det, tmp_path):
    psp = tmp_path / 'psp.onnx'
    run_export(seg, SEG_CONFIG, seg.ckpt, psp, SEG_MODEL, check=False)

    def test(config, path, model_args, **kwargs):
        return run_test(seg, config, path, tmp_path / 'w', tmp_path / 'o', model_args,
                        **kwargs)

    with pytest.raises(MMRepVGGError, match='is not an ONNX model'):
        test(SEG_CONFIG, seg.ckpt, SEG_MODEL, backend='onnxruntime')
    with pytest.raises(MMRepVGGError, match='holds a segmentor network; the config builds a '
                                         'two_stage'):
        test(DET_CONFIG, psp, DET_MODEL, backend='onnxruntime')
    with pytest.raises(MMRepVGGError, match="does not match the config's model"):
        test(SEG_CONFIG, psp, SEG_MODEL + ['model.decode_head.num_classes=7'],
             backend='openvino')
    with pytest.raises(MMRepVGGError, match='onnxruntime runs fp32, not'):
        test(SEG_CONFIG, psp, SEG_MODEL, backend='onnxruntime', precision='bf16')
    with pytest.raises(MMRepVGGError, match='drop --deploy'):
        test(SEG_CONFIG, psp, SEG_MODEL, backend='onnxruntime', deploy=True)
    # OpenVINO says what it runs: bf16 only where the CPU has bfloat16 instructions (and
    # oneDNN is not held to an instruction set without them)
    from mmrepvgg.deploy.backends import openvino_bf16_problem
    assert load_backend(str(psp), 'openvino', 'bf16').precision_used == \
        ('bf16' if openvino_bf16_problem() is None else 'fp32')
    assert load_backend(str(psp), 'openvino').precision_used == 'fp32'
    # A static file and a batch of another size: what to do instead.
    runner = load_backend(str(psp), 'onnxruntime')
    with pytest.raises(ValueError, match=r'takes inputs of shape 1x3x128x256, got '
                                         r'2x3x128x256: export again with --dynamic'):
        runner(torch.zeros(2, 3, 128, 256))
    # An ONNX file of someone else's: no metadata saying what part it holds.
    foreign = tmp_path / 'foreign.onnx'
    export_module(nn.Conv2d(3, 19, 1), torch.zeros(1, 3, 128, 256), str(foreign))
    with pytest.raises(MMRepVGGError, match='was not written by tools/export.py'):
        test(SEG_CONFIG, foreign, SEG_MODEL, backend='onnxruntime')


def test_input_size_the_network_cannot_take_says_what_would(seg, tmp_path):
    """mmseg's UNet needs sizes its 16x downsampling divides: the export says so and
    suggests sizes that fit, before writing anything."""
    import mmseg
    config = osp.join(osp.dirname(mmseg.__file__), '.mim', 'configs', 'unet',
                      'unet-s5-d16_fcn_4xb4-40k_drive-64x64.py')
    _, model = build_model_from_config(config)
    ckpt = tmp_path / 'unet.pth'
    torch.save(dict(meta={}, state_dict=model.state_dict()), ckpt)
    out = tmp_path / 'unet.onnx'
    with pytest.raises(MMRepVGGError, match=r'cannot take a 1x3x60x60 input .*multiples of '
                                         r'the feature stride 32, e.g. --shape 64 64'):
        run_entry(export, seg.root, config, ckpt, out, shape=[60, 60])
    assert sorted(os.listdir(tmp_path)) == ['unet.pth']


def test_export_never_overwrites_the_checkpoint(seg, tmp_path):
    same = tmp_path / 'model.onnx'
    same.write_bytes(seg.ckpt.read_bytes())
    before = fingerprint(same)
    with pytest.raises(MMRepVGGError, match='is the input checkpoint'):
        run_export(seg, SEG_CONFIG, same, same, SEG_MODEL)
    assert fingerprint(same) == before
    with pytest.raises(MMRepVGGError, match='must end with .onnx'):
        run_export(seg, SEG_CONFIG, seg.ckpt, tmp_path / 'model.pth', SEG_MODEL)
