"""mmrepvgg.apis.train and test (tools/train.py, tools/test.py, --deploy) and
mmrepvgg.convert (tools/convert.py) on the mini datasets.

Everything runs in-process at RepVGG-A0 size (1 training iteration, 2 val images), with
the session's mini data folder as the working directory, as `--mini` expects; the tools
themselves run as processes only where their command line is what is tested.
"""
import glob
import os
import os.path as osp
import re
import shutil
import subprocess
import sys
import uuid
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from mmengine.config import Config

from helpers import (A0_BLOCKS, DET_CONFIG, DET_MODEL, ROOT, SEG_CONFIG, SEG_MODEL, TEST,
                     TRAIN, assert_resumed_from_iter_1, assert_same_detections,
                     assert_same_segmentation, det_results, fingerprint, load_state, log_text,
                     parse_options, run_convert, run_convert_release, run_entry, run_test,
                     run_tools, seg_maps, working_dir)
from mmrepvgg import apis
from mmrepvgg.convert import build_model_from_config
from mmrepvgg.errors import MMRepVGGError
from mmrepvgg.models import RepVGG
from mmrepvgg.reparam import (assert_fusion_exact, format_report, fusion_errors,
                              reparameterize)

R50_CONFIG = osp.join(ROOT, 'configs', 'pspnet_r50_cityscapes.py')


# ---------------------------------------------------------------- --deploy: same scores
def test_segmentor_deploy_metrics_and_maps_equal_training_form(seg, tmp_path):
    def test(ckpt, name, **kwargs):
        return run_test(seg, SEG_CONFIG, ckpt, tmp_path / name,
                        tmp_path / f'{name}_maps', SEG_MODEL, **kwargs)

    plain, _ = test(seg.ckpt, 'plain')
    deploy, deploy_work = test(seg.ckpt, 'deploy', deploy=True)
    fused, fused_work = test(seg.fused, 'fused', deploy=True)

    assert isinstance(plain, dict) and {'aAcc', 'mIoU', 'mAcc'} <= set(plain)
    print(f'\nPSPNet RepVGG-A0, 2 mini val images: training form {plain}; --deploy '
          f'(fused after loading) {deploy}; --deploy on the converted checkpoint {fused}')
    assert plain['aAcc'] > 0  # a real evaluation happened
    reference = seg_maps(tmp_path / 'plain_maps')
    assert_same_segmentation(reference, seg_maps(tmp_path / 'deploy_maps'), plain, deploy)
    assert_same_segmentation(reference, seg_maps(tmp_path / 'fused_maps'), plain, fused)

    # A training checkpoint is fused by the hook after loading...
    log = log_text(deploy_work)
    assert f'ReparamHook: fused {A0_BLOCKS} blocks' in log
    assert 'max output difference on a probe input' in log
    # ...a converted one is detected and loaded into a deploy-form model, no hook.
    dumped = Config.fromfile(str(fused_work / osp.basename(SEG_CONFIG)))
    assert dumped.model.backbone.deploy is True
    assert 'ReparamHook:' not in log_text(fused_work)


def test_detector_deploy_predictions_and_map_equal_training_form(det, tmp_path):
    fused_ckpt = tmp_path / 'fused.pth'
    report = run_convert(det.root, DET_CONFIG, det.ckpt, fused_ckpt, DET_MODEL[:2])
    assert f'fused {A0_BLOCKS} blocks' in format_report(report)

    def test(ckpt, name, **kwargs):
        return run_test(det, DET_CONFIG, ckpt, tmp_path / name, tmp_path / f'{name}.pkl',
                        DET_MODEL, **kwargs)

    plain, _ = test(det.ckpt, 'plain')
    deploy, deploy_work = test(det.ckpt, 'deploy', deploy=True)
    fused, _ = test(fused_ckpt, 'fused', deploy=True)
    print(f'\nFaster R-CNN RepVGG-A0, 2 mini val images: training form {plain}; '
          f'--deploy {deploy}; converted checkpoint --deploy {fused}')
    assert 'coco/bbox_mAP' in plain
    assert deploy == plain
    assert fused == plain
    assert f'ReparamHook: fused {A0_BLOCKS} blocks' in log_text(deploy_work)

    reference = det_results(tmp_path / 'plain.pkl')
    for name in ('deploy.pkl', 'fused.pkl'):
        results = det_results(tmp_path / name)
        assert results.keys() == reference.keys()
        for img_id, ref in reference.items():
            assert_same_detections(ref, results[img_id])


# ---------------------------------------------------------------------- tools/convert.py
# The report of a fusion as format_report words it (tools/convert.py prints it, then
# '; wrote OUTPUT'): blocks, parameters before -> after, the verified probe difference
# and its verdict (measured against a float64 copy, mmrepvgg.reparam), not a fixed
# tolerance.
FUSED_LINE = (r'fused (\d+) blocks; parameters ([\d,]+) -> ([\d,]+); max output '
              r'difference on a probe input (\S+), within fp32 rounding .*')


def test_convert_writes_deploy_checkpoint_atomically_with_meta(seg):
    assert os.listdir(seg.out_dir) == ['fused.pth'], 'temporary files left behind'
    found = re.search(FUSED_LINE, format_report(seg.report))
    assert found, seg.report
    before, after = (int(found.group(i).replace(',', '')) for i in (2, 3))
    assert (before, after) == (seg.report['params_before'], seg.report['params_after'])
    assert int(found.group(1)) == A0_BLOCKS and after < before
    assert float(found.group(4)) > 0  # a real fp32 comparison was made

    source, fused = load_state(seg.ckpt), load_state(seg.fused)
    for key, value in source['meta'].items():  # meta kept...
        assert key in fused['meta']
        if isinstance(value, (str, int, float, bool)):
            assert fused['meta'][key] == value, key
    assert fused['meta']['mmrepvgg_deploy'] is True  # ...plus the flag
    keys = list(fused['state_dict'])
    assert any('.fused.' in k for k in keys)
    assert not any(k.startswith('backbone.') and ('.dense.' in k or '.pointwise.' in k)
                   for k in keys)
    assert sum(v.numel() for k, v in fused['state_dict'].items()
               if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))) \
        == after


def test_converted_checkpoint_loads_into_deploy_model(seg):
    from mmengine.runner import load_state_dict
    opts = {'model.backbone.arch': 'A0', 'model.decode_head.in_channels': 1280,
            'model.auxiliary_head.in_channels': 192}  # SEG_MODEL as a dict
    _, train_model = build_model_from_config(SEG_CONFIG, dict(opts))
    _, deploy_model = build_model_from_config(SEG_CONFIG,
                                              {**opts, 'model.backbone.deploy': True})
    load_state_dict(train_model, load_state(seg.ckpt)['state_dict'], strict=True)
    load_state_dict(deploy_model, load_state(seg.fused)['state_dict'], strict=True)
    assert deploy_model.backbone.deploy and not train_model.backbone.deploy
    train_model.eval()
    deploy_model.eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    # The converted weights as the fp32 fusion: they may move the outputs by no more than
    # fp32 rounding explains (mmrepvgg.reparam.fusion_errors; its fp64 check fuses anew).
    def converted(model):
        return deploy_model if model is train_model else reparameterize(model)

    errors = fusion_errors(train_model, x, forward=lambda m, x: m._forward(x), fuse=converted)
    assert_fusion_exact(errors)


def test_convert_refuses_output_equal_to_checkpoint(seg, tmp_path):
    before = fingerprint(seg.ckpt)
    listing = sorted(os.listdir(seg.work))
    link = tmp_path / 'link.pth'
    link.symlink_to(seg.ckpt)
    spellings = [seg.ckpt, osp.join(seg.work, '..', seg.work.name, 'iter_1.pth'), link]
    for output in spellings:
        with pytest.raises(ValueError) as err:  # tools/convert.py: its exit message
            run_convert(seg.root, SEG_CONFIG, seg.ckpt, output, SEG_MODEL)
        assert 'is the input checkpoint' in str(err.value)
        assert fingerprint(seg.ckpt) == before
        assert sorted(os.listdir(seg.work)) == listing
    with pytest.raises(ValueError, match='is the input checkpoint'):
        run_convert_release(seg.root, seg.ckpt, seg.ckpt)
    assert fingerprint(seg.ckpt) == before


def test_convert_tool_prints_what_it_wrote_and_exits_with_the_error(seg, tmp_path):
    """tools/convert.py's command line, in processes of its own: the fusion report and
    the file written on stdout; a refused request as a one-line message, exit status 1."""
    out = tmp_path / 'fused.pth'
    before = fingerprint(seg.ckpt)
    fused, refused = run_tools(
        ('convert', SEG_CONFIG, seg.ckpt, out, '--cfg-options', *SEG_MODEL),
        ('convert', '--release', seg.ckpt, seg.ckpt), cwd=seg.root)
    assert fused.returncode == 0, (fused.stdout + fused.stderr)[-5000:]
    found = re.search(FUSED_LINE + r'; wrote (\S+)', fused.stdout)
    assert found, fused.stdout
    assert int(found.group(1)) == A0_BLOCKS and found.group(5) == str(out)
    assert os.listdir(tmp_path) == ['fused.pth']
    # what the package wrote for the same request (the seg fixture's)
    got, ref = load_state(out)['state_dict'], load_state(seg.fused)['state_dict']
    assert got.keys() == ref.keys()
    for key, value in ref.items():
        assert torch.equal(got[key], value), key

    assert refused.returncode == 1, (refused.stdout + refused.stderr)[-5000:]
    assert refused.stderr.startswith(f'error: output {seg.ckpt} is the input checkpoint'), \
        refused.stderr
    assert 'Traceback' not in refused.stderr
    assert fingerprint(seg.ckpt) == before


# Our backbone's branch names -> the official RepVGG release's (written out, not taken
# from the project's mapping table).
OFFICIAL_BRANCHES = [('dense.conv.', 'rbr_dense.conv.'), ('dense.bn.', 'rbr_dense.bn.'),
                     ('pointwise.conv.', 'rbr_1x1.conv.'), ('pointwise.bn.', 'rbr_1x1.bn.'),
                     ('identity.', 'rbr_identity.')]


def _official_name(ours):
    block, rest = ours.split('.', 1)
    if block == 'stem':
        prefix = 'stage0.'
    else:  # stageN.i.
        index, rest = rest.split('.', 1)
        prefix = f'{block}.{index}.'
    for mine, theirs in OFFICIAL_BRANCHES:
        if rest.startswith(mine):
            return prefix + theirs + rest[len(mine):]
    raise AssertionError(f'unexpected key {ours}')


def test_convert_release_official_layout(tmp_path):
    shapes = RepVGG('A0').state_dict()
    gen = torch.Generator().manual_seed(0)
    release, expected = {}, {}
    for key, value in shapes.items():
        if key.endswith('num_batches_tracked'):
            continue  # official release files have none
        tensor = torch.rand(value.shape, generator=gen) + 0.1
        release[_official_name(key)] = tensor
        expected[key] = tensor
    assert 'stage0.rbr_dense.conv.weight' in release
    assert 'stage1.1.rbr_identity.running_var' in release
    assert 'stage4.0.rbr_1x1.bn.bias' in release
    release['linear.weight'] = torch.rand(1000, 1280, generator=gen)
    release['linear.bias'] = torch.rand(1000, generator=gen)
    src, out = tmp_path / 'RepVGG-A0-train.pth', tmp_path / 'converted' / 'a0.pth'
    torch.save(release, src)

    info = run_convert_release(tmp_path, src, out)
    # tools/convert.py prints 'official layout, training form; dropped 2 head keys'
    assert (info['layout'], info['deploy'], len(info['dropped'])) == ('official', False, 2)
    assert os.listdir(out.parent) == ['a0.pth']
    assert load_state(out)['meta']['source_layout'] == 'official'

    model = RepVGG('A0', init_cfg=dict(type='Pretrained', checkpoint=str(out)))
    model.init_weights()
    loaded = model.state_dict()
    for key, tensor in expected.items():
        assert torch.equal(loaded[key], tensor), key


# ----------------------------------------------------------------------- tools/train.py
def _resume_source(seg, tmp_path):
    """A copy of the 1-iteration work dir whose last_checkpoint points into the copy."""
    work = tmp_path / 'resume'
    work.mkdir()
    shutil.copy(seg.ckpt, work / 'iter_1.pth')
    (work / 'last_checkpoint').write_text(str(work / 'iter_1.pth'))
    return work


@pytest.mark.parametrize('explicit', [False, True], ids=['auto', 'path'])
def test_train_resume_continues_from_the_checkpoint(seg, tmp_path, explicit):
    if explicit:
        work = tmp_path / 'fresh'
        resume = seg.ckpt
    else:
        work = _resume_source(seg, tmp_path)
        resume = 'auto'  # tools/train.py --resume without a path
    before = fingerprint(seg.ckpt)
    run_entry(apis.train, seg.root, SEG_CONFIG, mini=True, work_dir=work, resume=resume,
              options=TRAIN + SEG_MODEL + ['train_cfg.max_iters=2'])
    assert_resumed_from_iter_1(work)
    assert fingerprint(seg.ckpt) == before  # the source checkpoint is never touched


def test_train_cli_prepares_amp_resume_and_cfg_options(monkeypatch, mini_root):
    import mmengine.device

    from mmrepvgg.apis import runner
    seen = []

    class FakeRunner:
        def __init__(self, cfg):
            seen.append(cfg)

        def train(self):
            pass

    monkeypatch.setattr(runner, 'build_runner', FakeRunner)
    options = ['model.backbone.arch=A0', 'train_dataloader.batch_size=2']

    def train(*more_options, **kwargs):
        apis.train(SEG_CONFIG, mini=True, work_dir='w',
                   cfg_options=parse_options(options + list(more_options)), **kwargs)

    with working_dir(mini_root):
        for device in ('cpu', 'cuda'):  # --amp depends on where the Runner will train
            with monkeypatch.context() as patch:
                patch.setattr(mmengine.device, 'get_device', lambda: device)
                train(amp=True)
                with pytest.raises(MMRepVGGError, match="not 'ApexOptimWrapper'"):
                    train('optim_wrapper.type=ApexOptimWrapper', amp=True)
        train()
        train(resume='auto')
        train(resume='w/iter_3.pth')
    amp_cpu, amp_cuda, plain, auto, path = seen
    # CPU: bfloat16 autocast, no loss scale; CUDA: mmengine's float16 AMP, dynamic scale
    assert amp_cpu.optim_wrapper.type == 'mmrepvgg.CPUAmpOptimWrapper'
    assert 'loss_scale' not in amp_cpu.optim_wrapper
    assert amp_cuda.optim_wrapper.type == 'AmpOptimWrapper'
    assert amp_cuda.optim_wrapper.loss_scale == 'dynamic'
    for amp in (amp_cpu, amp_cuda):
        assert amp.optim_wrapper.optimizer.lr == plain.optim_wrapper.optimizer.lr == 0.01
    assert plain.optim_wrapper.get('type', 'OptimWrapper') == 'OptimWrapper'
    for cfg in seen:
        assert cfg.model.backbone.arch == 'A0' and cfg.train_dataloader.batch_size == 2
        assert cfg.work_dir == 'w' and cfg.launcher == 'none'
        assert cfg.train_dataloader.dataset.data_root == 'data/mini_cityscapes'
    assert not plain.get('resume', False)
    assert auto.resume is True and auto.load_from is None
    assert path.resume is True and path.load_from == 'w/iter_3.pth'
    # tools/train.py's --resume without a path is resume='auto': see the next test


PLUGINLESS_CONFIG = """\
# inherits mmseg's PSPNet, swaps in the plugin's backbone, and has NO custom_imports
_base_ = 'mmseg::pspnet/pspnet_r50-d8_4xb2-40k_cityscapes-512x1024.py'
model = dict(
    pretrained=None,
    backbone=dict(_delete_=True, type='mmrepvgg.RepVGG', arch='A0',
                  out_indices=(0, 1, 2, 3), strides=(2, 2, 1, 1), dilations=(1, 1, 2, 4)),
    decode_head=dict(in_channels=1280),
    auxiliary_head=dict(in_channels=192))
"""


def test_train_config_without_custom_imports(mini_root, tmp_path):
    """tools/train.py in a fresh interpreter, where nothing but the tool itself imports
    mmrepvgg; its --resume given without a path resumes from the work dir's latest
    checkpoint (none in a new work dir: the run starts afresh)."""
    config = tmp_path / 'pspnet_repvgg_a0_no_imports.py'
    config.write_text(PLUGINLESS_CONFIG)
    assert 'custom_imports' not in Config.fromfile(str(config))
    work = tmp_path / 'work'
    proc = subprocess.run(
        [sys.executable, osp.join(ROOT, 'tools', 'train.py'), str(config), '--mini',
         '--work-dir', str(work), '--resume', '--cfg-options', *TRAIN],
        cwd=str(mini_root), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    state = load_state(work / 'iter_1.pth')['state_dict']
    assert 'backbone.stage1.0.dense.conv.weight' in state
    assert state['backbone.stage4.0.dense.conv.weight'].shape[0] == 1280
    # --resume alone parsed as 'auto': resume from the work dir, no checkpoint named
    dumped = Config.fromfile(str(work / config.name))
    assert dumped.resume is True and dumped.load_from is None
    assert 'Auto resumed from the latest checkpoint None' in log_text(work)


# ------------------------------------------------------------------------- bad input
def _assert_untouched(work):
    assert not osp.exists(work), f'{work} was created'


def test_test_missing_and_corrupt_checkpoints(seg, tmp_path):
    work = tmp_path / 'work'
    missing = tmp_path / 'missing.pth'
    with pytest.raises(MMRepVGGError, match='not found'):
        run_entry(apis.test, seg.root, SEG_CONFIG, missing, mini=True, work_dir=work,
                  deploy=True, options=SEG_MODEL)
    _assert_untouched(work)
    assert not missing.exists()

    corrupt = tmp_path / 'corrupt.pth'
    corrupt.write_bytes(np.random.default_rng(0).bytes(4096))
    before = fingerprint(corrupt)
    for deploy in (False, True):
        with pytest.raises(MMRepVGGError, match='not a valid PyTorch checkpoint'):
            run_entry(apis.test, seg.root, SEG_CONFIG, corrupt, mini=True, work_dir=work,
                      deploy=deploy, options=SEG_MODEL)
        _assert_untouched(work)
    assert fingerprint(corrupt) == before


def test_convert_missing_and_corrupt_checkpoints(seg, tmp_path):
    out = tmp_path / 'out' / 'fused.pth'
    # tools/convert.py ends with these errors' messages
    with pytest.raises(FileNotFoundError, match='not found'):
        run_convert(seg.root, SEG_CONFIG, tmp_path / 'missing.pth', out, SEG_MODEL)
    corrupt = tmp_path / 'corrupt.pth'
    corrupt.write_bytes(np.random.default_rng(1).bytes(4096))
    before = fingerprint(corrupt)
    with pytest.raises(ValueError, match='not a valid PyTorch checkpoint'):
        run_convert(seg.root, SEG_CONFIG, corrupt, out, SEG_MODEL)
    with pytest.raises(ValueError, match='not a valid PyTorch checkpoint'):
        run_convert_release(seg.root, corrupt, out)
    assert fingerprint(corrupt) == before
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ['corrupt.pth']


def test_deploy_checkpoint_without_deploy_flag_is_refused(seg, tmp_path):
    work = tmp_path / 'work'
    before = fingerprint(seg.fused)
    with pytest.raises(MMRepVGGError) as err:
        run_entry(apis.test, seg.root, SEG_CONFIG, seg.fused, mini=True, work_dir=work,
                  options=TEST + SEG_MODEL)
    assert '--deploy' in str(err.value)
    _assert_untouched(work)
    assert fingerprint(seg.fused) == before


def test_deploy_with_nothing_to_fuse_warns(mini_root, tmp_path):
    """ResNet-50 PSPNet: --deploy logs a clear warning and tests it as it is; convert
    refuses it."""
    _, model = build_model_from_config(R50_CONFIG, {'model.pretrained': None})
    ckpt = tmp_path / 'r50.pth'
    torch.save(dict(meta=dict(note='built, not trained'), state_dict=model.state_dict()),
               ckpt)
    del model
    work = tmp_path / 'work'
    metrics = run_entry(apis.test, mini_root, R50_CONFIG, ckpt, mini=True, work_dir=work,
                        deploy=True, options=['test_dataloader.dataset.indices=1'])
    assert 'aAcc' in metrics and 'mIoU' in metrics
    log = log_text(work)
    assert 'WARNING - ReparamHook: nothing to fuse' in log

    out = tmp_path / 'r50_fused.pth'
    with pytest.raises(ValueError, match='nothing to fuse'):  # tools/convert.py: its exit
        run_convert(mini_root, R50_CONFIG, ckpt, out, probe=False)
    assert not out.exists()
    assert not [n for n in os.listdir(tmp_path) if n.endswith('.tmp')]


# ------------------------------------------------------------------ EMA (mmengine EMAHook)
def test_deploy_scores_the_fused_ema_weights_of_a_pspnet(mini_root, tmp_path):
    """Trained with mmengine's EMAHook (checkpoint weights = the average), a PSPNet
    tested with --deploy scores like the EMA model unfused, for any EMA priority."""
    work = tmp_path / 'train'
    config = tmp_path / 'pspnet_ema.py'
    config.write_text(f'_base_ = {SEG_CONFIG!r}\n'
                      "custom_hooks = [dict(type='EMAHook', momentum=0.5)]\n")
    run_entry(apis.train, mini_root, config, mini=True, work_dir=work,
              options=TRAIN + SEG_MODEL + ['train_cfg.max_iters=2'])
    ckpt = work / 'iter_2.pth'
    assert 'ema_state_dict' in load_state(ckpt)

    def test(name, options=(), **kwargs):
        return run_test(SimpleNamespace(root=mini_root), config, ckpt, tmp_path / name,
                        tmp_path / f'{name}_maps', SEG_MODEL + list(options), **kwargs)[0]

    plain = test('plain')
    reference = seg_maps(tmp_path / 'plain_maps')
    for priority in ('HIGHEST', 'NORMAL', 'LOW'):
        name = f'deploy_{priority}'
        deploy = test(name, [f'custom_hooks.0.priority={priority}'], deploy=True)
        assert_same_segmentation(reference, seg_maps(tmp_path / f'{name}_maps'),
                                 plain, deploy)
        assert 'ReparamHook: fused the EMA model too' in log_text(tmp_path / name)


@pytest.mark.parametrize('kind', ['seg', 'det'])
def test_show_dir_draws_every_test_image(kind, request, tmp_path):
    fixture = request.getfixturevalue(kind)
    # mmseg's hook draws every `interval`-th test batch (50 by default): every one here.
    # A visualizer name of its own: mmengine reuses a same-named visualizer (and its
    # save_dir) built earlier in this process.
    config, model = ((SEG_CONFIG, SEG_MODEL + ['default_hooks.visualization.interval=1'])
                     if kind == 'seg' else (DET_CONFIG, DET_MODEL))
    model = model + [f'visualizer.name=vis_{uuid.uuid4().hex[:8]}']
    work, show = tmp_path / 'work', tmp_path / 'drawn'
    run_entry(apis.test, fixture.root, config, fixture.ckpt, mini=True, deploy=True,
              work_dir=work, show_dir=show, options=TEST + model)
    # mmdet draws into work_dir/<timestamp>/<show-dir>, mmseg into <show-dir>/vis_data.
    drawn = glob.glob(str(tmp_path / '**' / '*.png'), recursive=True) + glob.glob(
        str(tmp_path / '**' / '*.jpg'), recursive=True)
    assert len(drawn) == 2, drawn
