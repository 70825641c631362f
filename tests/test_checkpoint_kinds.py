"""Every checkpoint a user holds, given to every tool that takes a checkpoint.

Whole models (the runner's training checkpoint, its fused form as tools/convert.py writes it)
are exercised by tests/test_tools.py and tests/test_deploy.py; here the backbone release
files (the official repository's, training and deploy form; mmpretrain's classifier;
timm's) go to what tools/test.py, tools/convert.py, tools/export.py (--part backbone and
model) and tools/quantize.py call (mmrepvgg.apis, mmrepvgg.convert). A tool
that can use a backbone file computes with exactly its weights; one that needs a whole
model says what the file holds and what it needs, in a few lines, without listing keys.
"""
import re

import onnx
import pytest
import torch

from helpers import (MMPRETRAIN_NAMES, OFFICIAL_NAMES, SEG_CONFIG, SEG_MODEL, TIMM_NAMES,
                     rename, run_convert, run_entry, run_export)
from mmrepvgg import RepVGG, apis, load_file, reparameterize
from mmrepvgg.apis.deploy import quantize
from mmrepvgg.checkpoint import describe_checkpoint
from mmrepvgg.convert import build_model_from_config
from mmrepvgg.deploy import load_backend
from mmrepvgg.errors import MMRepVGGError
from mmrepvgg.numerics import flatten_outputs
from mmrepvgg.reparam import format_report, randomize_norm_stats, rounding_errors

SEG_OPTIONS = {'model.backbone.arch': 'A0', 'model.decode_head.in_channels': 1280,
               'model.auxiliary_head.in_channels': 192}
KINDS = ('official_train', 'official_deploy', 'mmpretrain', 'timm')


def _config_backbone():
    """The seg config's backbone (its out_indices, strides) without weights."""
    return build_model_from_config(SEG_CONFIG, SEG_OPTIONS)[1].backbone.eval()


@pytest.fixture(scope='module')
def releases(tmp_path_factory):
    """The config's backbone with random weights and statistics, and one release file
    per kind holding them: (source backbone, {kind: path})."""
    folder = tmp_path_factory.mktemp('releases')
    source = randomize_norm_stats(_config_backbone(), seed=3)
    # training-form keys only: a release's batch norms have no num_batches_tracked
    train = {k: v for k, v in source.state_dict().items() if 'num_batches' not in k}
    fused = reparameterize(source).state_dict()
    head = {'weight': torch.randn(1000, 1280), 'bias': torch.zeros(1000)}
    payloads = {
        'official_train': dict(rename(train, OFFICIAL_NAMES),
                               **{f'linear.{k}': v for k, v in head.items()}),
        'official_deploy': dict(rename(fused, OFFICIAL_NAMES),
                                **{f'linear.{k}': v for k, v in head.items()}),
        'mmpretrain': dict(meta=dict(), state_dict=dict(
            rename(train, MMPRETRAIN_NAMES, prefix='backbone.'),
            **{f'head.fc.{k}': v for k, v in head.items()})),
        'timm': dict(rename(train, TIMM_NAMES),
                     **{f'head.fc.{k}': v for k, v in head.items()}),
    }
    paths = {}
    for kind, payload in payloads.items():
        paths[kind] = folder / f'{kind}.pth'
        torch.save(payload, paths[kind])
    return source, paths


def _expected_form(kind):
    return 'fused' if kind.endswith('deploy') else 'training-form'


@pytest.mark.parametrize('kind', KINDS)
def test_release_files_are_described_as_backbones(releases, kind):
    info = describe_checkpoint(load_file(releases[1][kind]))
    assert info.holds == 'backbone' and info.deploy == kind.endswith('deploy')
    assert info.layout == kind.split('_')[0] and info.head is not None
    assert str(info).startswith(f'a {_expected_form(kind)} RepVGG backbone only')


def test_whole_models_are_described_as_models(seg):
    for path, deploy in ((seg.ckpt, False), (seg.fused, True)):
        info = describe_checkpoint(load_file(path))
        assert (info.holds, info.layout, info.deploy) == ('model', 'mmrepvgg', deploy)


@pytest.mark.parametrize('kind', KINDS)
def test_export_backbone_from_a_release_file(releases, seg, kind, tmp_path):
    """The exported backbone computes the release's network: its features are the
    training-form source's within what fp32 rounding explains."""
    source, paths = releases
    out = tmp_path / 'backbone.onnx'
    report = run_export(seg, SEG_CONFIG, paths[kind], out, SEG_MODEL, part='backbone')
    assert report['parity']['within'] and out.is_file()
    assert (report['fusion'] is None) == kind.endswith('deploy')
    probe = torch.randn(1, 3, *report['input_shape'][2:], generator=torch.Generator()
                        .manual_seed(0))
    with torch.no_grad():
        baseline = flatten_outputs(source(probe))
        reference = flatten_outputs(source.double()(probe.double()))
        source.float()
    candidate = load_backend(out, 'onnxruntime')(probe)
    assert len(candidate) == len(baseline) == 4
    errors = rounding_errors(candidate, baseline, reference)
    assert errors['within'], errors


def _refusal(call, error=MMRepVGGError):
    """The message ``call`` fails with: the package's refusal (MMRepVGGError), or for
    mmrepvgg.convert the error tools/convert.py exits with."""
    with pytest.raises(error) as err:
        call()
    return str(err.value)


def _assert_short_and_says(message, kind, request):
    assert f'holds a {_expected_form(kind)} RepVGG backbone only' in message, message
    assert f'{request} needs the weights of a whole model' in message, message
    assert '--part backbone' in message and 'init_cfg' in message
    # no key dump: no key of any layout, a few lines at most
    assert not re.search(r'rbr_|branch_|conv_kxk|stage\d\.\d|\.weight', message), message
    assert len(message) < 600 and message.count('\n') <= 2


@pytest.mark.parametrize('kind', ['official_train', 'timm'])
def test_tools_needing_a_whole_model_say_what_the_file_holds(releases, seg, kind, tmp_path):
    path = releases[1][kind]
    work = tmp_path / 'work'
    message = _refusal(lambda: run_entry(apis.test, seg.root, SEG_CONFIG, path, mini=True,
                                         work_dir=work, options=SEG_MODEL))
    _assert_short_and_says(message, kind, 'testing')
    out = tmp_path / 'model.onnx'
    message = _refusal(lambda: run_export(seg, SEG_CONFIG, path, out, SEG_MODEL))
    _assert_short_and_says(message, kind, 'exporting the whole network')
    assert not work.exists() and not out.exists()


def test_convert_fuses_a_release_backbone(releases, seg, tmp_path):
    """tools/convert.py CONFIG RELEASE OUT writes the fused backbone in this project's
    layout, which a deploy-form backbone loads as Pretrained."""
    source, paths = releases
    out = tmp_path / 'fused_backbone.pth'
    printed = format_report(run_convert(seg.root, SEG_CONFIG, paths['mmpretrain'], out,
                                        SEG_MODEL))  # what tools/convert.py prints
    assert 'fused 22 blocks' in printed and 'within fp32 rounding' in printed
    saved = load_file(out)
    info = describe_checkpoint(saved)
    assert (info.holds, info.layout, info.deploy) == ('backbone', 'mmrepvgg', True)
    loaded = RepVGG('A0', out_indices=(0, 1, 2, 3), deploy=True,
                    init_cfg=dict(type='Pretrained', checkpoint=str(out)))
    loaded.init_weights()
    fused = reparameterize(source)
    for key, value in fused.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    message = _refusal(lambda: run_convert(
        seg.root, SEG_CONFIG, paths['official_deploy'], tmp_path / 'again.pth', SEG_MODEL),
        ValueError)
    assert 'fused already' in message and not (tmp_path / 'again.pth').exists()


def test_quantize_takes_a_release_file(releases, seg, tmp_path):
    """tools/quantize.py exports a checkpoint first (as tools/export.py would), then
    quantizes that network."""
    out = tmp_path / 'backbone_int8.onnx'
    report = run_entry(quantize, seg.root, SEG_CONFIG, releases[1]['official_train'], out,
                       mini=True, calib=2, part='backbone', options=SEG_MODEL)
    assert report['quantized_ops']['QuantizeLinear'] > 0 and report['sqnr_db'] > 12
    metadata = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert metadata['mmrepvgg.part'] == 'backbone'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['backbone_int8.onnx']
    message = _refusal(lambda: run_entry(quantize, seg.root, SEG_CONFIG, releases[1]['timm'],
                                         tmp_path / 'm.onnx', mini=True, calib=1,
                                         options=SEG_MODEL))
    _assert_short_and_says(message, 'timm', 'exporting the whole network')
