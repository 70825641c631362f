"""tools/reproduce.py: one command trains (here with two gloo processes), resumes an
interrupted training, tests unfused and fused, times and tabulates; it checks the data
before anything runs, refuses another batch split unless asked, and skips what is done."""
import json
import os
import os.path as osp
import re
import shutil
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from helpers import (DET_CONFIG, DET_MODEL, FAKE_SRUN, MAX_FLIPPED_PIXELS, ROOT, SEG_CONFIG,
                     SEG_MODEL, TEST, TRAIN, write_executable)
from mmrepvgg.errors import MMRepVGGError
from mmrepvgg.fileio import sha256_file
from mmrepvgg.reproduce.experiments import SUITES, suite_configs
from mmrepvgg.reproduce.plan import Plan, tools_folder
from mmrepvgg.reproduce.results import write_results
from mmrepvgg.reproduce.run import ReproduceOptions, reproduce

TOOL = osp.join(ROOT, 'tools', 'reproduce.py')
SEG = 'pspnet_repvgg_b1g2_cityscapes'
DET = 'faster-rcnn_repvgg-a2_fpn_1x_coco'
RETINANET = osp.join(ROOT, 'configs', 'retinanet_repvgg-a2_fpn_1x_coco.py')
# Two iterations with a checkpoint after each (the first is what a resume starts from).
SEG_RUN = SEG_MODEL + TEST + [
    'train_cfg.max_iters=2', 'train_cfg.val_interval=2', 'default_hooks.checkpoint.interval=1',
    'default_hooks.checkpoint.max_keep_ckpts=3', 'train_dataloader.batch_size=2',
    'randomness.seed=0', 'val_dataloader=None', 'val_cfg=None', 'val_evaluator=None']


def _tool(root, *args):
    proc = subprocess.run([sys.executable, TOOL, *map(str, args)], cwd=str(root),
                          capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))
    return proc.returncode, proc.stdout + proc.stderr


def _result(work, name):
    with open(osp.join(work, name, 'result.json')) as f:
        return json.load(f)


@pytest.fixture(scope='module')
def seg_run(mini_root, tmp_path_factory):
    """The segmentation experiment trained with --launcher pytorch on two processes."""
    work = tmp_path_factory.mktemp('reproduce')
    rc, out = _tool(mini_root, SEG_CONFIG, '--mini', '--work-dir', work, '--steps', 'train',
                    '--launcher', 'pytorch', '--gpus', 2, '--cfg-options', *SEG_RUN)
    assert rc == 0, out[-4000:]
    return SimpleNamespace(root=mini_root, work=work, out=out,
                           train=osp.join(work, SEG, 'train'))


def test_training_on_two_processes_is_published(seg_run):
    assert f'{SEG}: train done' in seg_run.out
    result = _result(seg_run.work, SEG)
    env = result['environment']
    assert (env['processes'], env['launcher'], env['images_per_gpu']) == (2, 'pytorch', 2)
    # the machine it trained on: this one, checked before the experiment
    assert env['host'] == socket.gethostname() and env['torch'] == torch.__version__
    assert env['recorded_by'] == "the train step's machine"
    assert 'environment checked on ' in seg_run.out
    assert result['steps']['train']['status'] == 'done'
    published = result['steps']['train']['outputs']['published']
    # named by its content, in torch hub's convention; the optimizer state dropped
    assert re.fullmatch(rf'{SEG}-[0-9a-f]{{8}}\.pth', osp.basename(published))
    assert osp.basename(published)[-12:-4] == sha256_file(published)[:8]
    state = torch.load(published, map_location='cpu', weights_only=False)
    assert 'state_dict' in state and 'optimizer' not in state
    beside = os.listdir(osp.dirname(published))
    assert f'{SEG}.py' in beside and any(n.endswith('.log') for n in beside)


def test_interrupted_training_resumes_from_its_last_checkpoint(seg_run):
    # What a kill after the first checkpoint leaves: iter_1 named last, no final file,
    # the step recorded as running.
    os.remove(osp.join(seg_run.train, 'iter_2.pth'))
    with open(osp.join(seg_run.train, 'last_checkpoint'), 'w') as f:
        f.write(osp.join(seg_run.train, 'iter_1.pth'))
    path = osp.join(seg_run.work, SEG, 'result.json')
    result = _result(seg_run.work, SEG)
    result['steps']['train']['status'] = 'running'
    with open(path, 'w') as f:
        json.dump(result, f)
    rc, out = _tool(seg_run.root, SEG_CONFIG, '--mini', '--work-dir', seg_run.work,
                    '--steps', 'train', '--launcher', 'pytorch', '--gpus', 2,
                    '--cfg-options', *SEG_RUN)
    assert rc == 0, out[-4000:]
    assert f'{SEG}: train started, resuming from iter_1.pth' in out
    assert osp.isfile(osp.join(seg_run.train, 'iter_2.pth'))
    with open(osp.join(seg_run.work, SEG, 'train.log')) as f:
        assert re.search(r'resumed', f.read(), re.IGNORECASE)


def test_test_deploy_speed_then_everything_skipped(seg_run):
    rc, out = _tool(seg_run.root, SEG_CONFIG, '--mini', '--work-dir', seg_run.work,
                    '--steps', 'test,deploy,speed', '--cfg-options', *SEG_RUN)
    assert rc == 0, out[-4000:]
    result = _result(seg_run.work, SEG)
    test, deploy = result['metrics']['test'], result['metrics']['deploy']
    assert {'mIoU', 'aAcc'} <= set(test)
    # Fusion moves outputs by ~1e-6: identical predictions give identical metrics; a
    # near-tie may flip a few pixels (at most MAX_FLIPPED_PIXELS of 2 x 256 x 128).
    if deploy['aAcc'] != test['aAcc']:
        assert abs(deploy['aAcc'] - test['aAcc']) <= 100 * MAX_FLIPPED_PIXELS / (2 * 256 * 128)
    else:
        assert deploy == test
    names = {(r['part'], r['name']) for r in result['speed']['rows'] if r['ms'] > 0}
    assert ('backbone', 'RepVGG-A0/fused @eager') in names
    assert ('model', f'{SEG}/fused @eager') in names
    with open(osp.join(seg_run.work, 'results.md')) as f:
        table = f.read()
    assert f'| {SEG} | mIoU | {test["mIoU"]:.2f} |' in table and '| done |' in table

    before = open(osp.join(seg_run.work, SEG, 'result.json')).read()
    rc, out = _tool(seg_run.root, SEG_CONFIG, '--mini', '--work-dir', seg_run.work,
                    '--cfg-options', *SEG_RUN)
    assert rc == 0, out[-4000:]
    assert 'started' not in out
    for step in ('train', 'test', 'deploy', 'speed'):
        assert f'{SEG}: {step} skipped, done before' in out
    assert open(osp.join(seg_run.work, SEG, 'result.json')).read() == before


def test_detector_metrics_keyed_as_its_evaluator(det, tmp_path):
    """The session's trained detector placed as a finished training: test reads the
    evaluator's own keys (coco/...) back from mmengine's log."""
    train = tmp_path / DET / 'train'
    train.mkdir(parents=True)
    shutil.copy(det.ckpt, train / 'iter_1.pth')
    rc, out = _tool(det.root, DET_CONFIG, '--mini', '--work-dir', tmp_path, '--steps', 'test',
                    '--cfg-options', *TRAIN, *DET_MODEL, *TEST)
    assert rc == 0, out[-4000:]
    metrics = _result(tmp_path, DET)['metrics']['test']
    assert 'coco/bbox_mAP' in metrics and 0 <= metrics['coco/bbox_mAP'] <= 1
    with open(tmp_path / 'results.md') as f:
        assert f'| {DET} | coco/bbox_mAP | {100 * metrics["coco/bbox_mAP"]:.2f} |' in f.read()


def _run(configs, tmp_path, **kwargs):
    lines = []
    cwd = os.getcwd()
    os.chdir(tmp_path)  # no data here
    try:
        failed = reproduce(configs, ReproduceOptions(work_dir=str(tmp_path / 'w'), **kwargs),
                           say=lines.append)
    except MMRepVGGError as exit_:
        return '\n'.join(lines), exit_
    finally:
        os.chdir(cwd)
    return '\n'.join(lines), failed


def test_missing_data_is_named_with_the_command_that_prepares_it(tmp_path):
    out, exit_ = _run([SEG_CONFIG, DET_CONFIG], tmp_path, steps=['test'])
    assert isinstance(exit_, MMRepVGGError) and 'nothing was run' in str(exit_)
    assert 'CityscapesDataset data missing: data/cityscapes/leftImg8bit/val/' in out
    assert 'dataset_converters/cityscapes.py" data/cityscapes' in out
    assert 'CocoDataset data missing: data/coco/annotations/instances_val2017.json' in out
    assert 'download_dataset.py" --dataset-name coco2017' in out
    assert not osp.exists(tmp_path / 'w')


def test_mini_writes_its_data_where_absent_and_says_where(tmp_path):
    """--mini in a folder without data: a dry run says what it would write and writes
    nothing; a run writes the synthetic data (the test step then has no checkpoint), and
    the next run finds it there; an incomplete folder is named with the way to redo it."""
    data = tmp_path / 'data' / 'mini_cityscapes'
    out, failed = _run([SEG_CONFIG], tmp_path, steps=['test'], mini=True, dry_run=True)
    assert failed == 0 and 'check failed' not in out, out
    assert f'--mini: would write the synthetic mini Cityscapes to {data}' in out
    assert not osp.exists(tmp_path / 'data')

    out, failed = _run([SEG_CONFIG], tmp_path, steps=['test'], mini=True)
    assert (f'--mini: wrote the synthetic mini Cityscapes (24 train + 8 val images) to '
            f'{data}') in out
    assert 'check failed' not in out and failed == 1  # blocked: nothing trained yet
    assert f'{SEG}: test not run: no trained checkpoint' in out
    assert len(list(data.glob('leftImg8bit/*/*/*.png'))) == 32
    assert [p.name for p in data.parent.iterdir()] == ['mini_cityscapes']  # no leftovers

    out, _ = _run([SEG_CONFIG], tmp_path, steps=['test'], mini=True)
    assert '--mini: wrote' not in out and 'check failed' not in out

    shutil.rmtree(data / 'gtFine')
    out, exit_ = _run([SEG_CONFIG], tmp_path, steps=['test'], mini=True)
    assert isinstance(exit_, MMRepVGGError), out
    assert ('CityscapesDataset data missing: data/mini_cityscapes/gtFine/val/; it is not '
            'the whole synthetic dataset: remove data/mini_cityscapes (--mini then writes it '
            'again) or write it again with: python tools/make_mini_data.py cityscapes '
            'data/mini_cityscapes --force') in out


def test_suites_and_tools_are_the_packages_own():
    """In a checkout (this test's), the suites name the repository's configs and the
    steps run its tools; an installed wheel's .mim folders are checked in
    tests/test_packaging.py."""
    # (an editable install links .mim/configs/repvgg and .mim/tools to these folders)
    assert [osp.realpath(c) for c in suite_configs('smoke')] == [
        osp.realpath(osp.join(ROOT, 'configs', f'{stem}.py')) for stem in SUITES['smoke']]
    assert osp.realpath(tools_folder()) == osp.realpath(osp.join(ROOT, 'tools'))
    with pytest.raises(MMRepVGGError, match="unknown suite 'cocoa'; valid: cityscapes"):
        suite_configs('cocoa')


def test_dry_run_prints_every_command_and_writes_nothing(tmp_path):
    configs = [osp.join(ROOT, 'configs', n) for n in sorted(os.listdir(
        osp.join(ROOT, 'configs'))) if n.endswith('.py')]
    out, failed = _run(configs, tmp_path, gpus=8, dry_run=True)
    assert failed == 0 and not osp.exists(tmp_path / 'w')
    for config in configs:
        stem = osp.splitext(osp.basename(config))[0]
        assert re.search(rf'{re.escape(stem)}: train: .*dist_run\.sh 8 train\.py '
                         rf'{re.escape(config)} ', out), stem
        assert f'{stem}: test: ' in out and f'{stem}: speed: ' in out
    # GPUs asked for: nccl as the configs say, timings on CUDA; no empty option lists
    assert 'gloo' not in out and '--device cuda --precision fp32,fp16' in out
    assert not any(line.rstrip().endswith('--cfg-options') for line in out.splitlines())
    # 2 nodes x 8 GPUs keep the batch of 16 with one image per GPU
    out, _ = _run(configs[:1], tmp_path, gpus=16, launcher='slurm', partition='gpu',
                  dry_run=True, cfg_options=['train_dataloader.batch_size=1'])
    assert re.search(r'GPUS=16 GPUS_PER_NODE=8 .*slurm_train\.sh gpu ', out)
    # the environment check: on one GPU of the partition, before the first experiment
    assert re.search(r'environment check: srun -p gpu --job-name=mmrepvgg-check '
                     r'--gres=gpu:1 --ntasks=1 --kill-on-bad-exit=1 \S+ -m '
                     r'mmrepvgg\.reproduce\.preflight --check --device cuda --detection\n', out)
    assert re.search(r'RECORD_ENV=\S+/train/environment\.json \S*bash \S+slurm_train', out)
    assert 'srun -p gpu' in out and 'slurm_test.sh gpu' in out


def test_another_batch_split_needs_scale_lr(tmp_path):
    options = ReproduceOptions(work_dir=str(tmp_path), gpus=4)
    with pytest.raises(MMRepVGGError, match=r'batch of 16 \(8 GPUs x 2 images\).*--scale-lr'):
        Plan(SEG_CONFIG, None, options)
    plan = Plan(SEG_CONFIG, None, ReproduceOptions(work_dir=str(tmp_path), gpus=4,
                                                   scale_lr=True))
    assert plan.learning_rate == pytest.approx(0.01 * 8 / 16)
    assert 'auto_scale_lr.enable=True' in plan.cfg_options


def test_table_sets_reproduced_gaps_beside_the_papers(tmp_path):
    plans = [SimpleNamespace(stem='pspnet_r101_cityscapes', scope='mmseg'),
             SimpleNamespace(stem='pspnet_repvgg_b2_cityscapes', scope='mmseg'),
             SimpleNamespace(stem='pspnet_repvgg_b2_cityscapes', scope='mmseg')]
    done = dict(status='done')
    results = [dict(steps=dict(test=done), metrics=dict(test=dict(mIoU=78.2))),
               dict(steps=dict(test=done), metrics=dict(test=dict(mIoU=80.0),
                                                        deploy=dict(mIoU=80.0))),
               dict(steps=dict(test=dict(status='failed', log='x.log')),
                    metrics=dict(test=dict(mIoU=81.0)))]
    tables = write_results(str(tmp_path), results, plans, tolerance=0.5)
    rows = tables['mmseg']['rows']
    assert rows['pspnet_r101_cityscapes']['difference'] == pytest.approx(78.2 - 78.51)
    assert rows['pspnet_r101_cityscapes']['within_tolerance'] is True
    assert rows['pspnet_repvgg_b2_cityscapes']['mean_unfused'] == pytest.approx(80.5)
    assert rows['pspnet_repvgg_b2_cityscapes']['within_tolerance'] is True
    assert rows['pspnet_repvgg_b2_cityscapes']['status'] == 'test failed: x.log'
    gap = tables['mmseg']['gaps'][0]
    assert gap['reproduced'] == pytest.approx(80.5 - 78.2)
    assert gap['published'] == pytest.approx(80.57 - 78.51)
    text = open(tmp_path / 'results.md').read()
    assert '80.50 ± 0.71 (n=2)' in text and '| +2.30 | +2.06 |' in text
    assert json.load(open(tmp_path / 'results.json'))['tolerance'] == 0.5


def test_each_seed_is_an_experiment_of_its_own(tmp_path):
    plan = Plan(SEG_CONFIG, 1, ReproduceOptions(work_dir=str(tmp_path), mini=True))
    assert plan.name == f'{SEG}@seed1'
    assert plan.dir == osp.join(str(tmp_path), SEG, 'seed1')
    assert 'randomness.seed=1' in plan.cfg_options and plan.cfg.randomness.seed == 1
    assert plan.final_checkpoint == osp.join(plan.dir, 'train', 'iter_200.pth')


# ------------------------------------------------------- the environment, checked and recorded
# A check process's verdicts, decided by the test: this sitecustomize (on PYTHONPATH)
# replaces mmrepvgg.env.environment_checks in every Python the test starts while
# FAKE_CHECKS is set, and writes where each call was asked for CUDA.
FAKE_CHECKS_SITE = """
import json, os
if os.environ.get('FAKE_CHECKS'):
    import mmrepvgg.env as env

    def environment_checks(want_cuda=None):
        with open(os.environ['FAKE_CHECKS_LOG'], 'a') as f:
            f.write(json.dumps(want_cuda) + '\\n')
        return [env.Check(*c) for c in json.loads(os.environ['FAKE_CHECKS'])]
    env.environment_checks = environment_checks
"""
CUDA_OK = ('CUDA usable', True, '8 GPU(s): NVIDIA H100 80GB HBM3; driver 580.65.06')
NCCL_OK = ('NCCL available', True, 'torch.distributed with NCCL 2.27.3')
CPU_ONLY_MMCV = [
    ('mmcv ops built for CUDA', False, 'no (CPU ops only; detectors need NMS and RoIAlign '
     'on the GPU: set up again on a GPU machine, or with FORCE_CUDA=1)'),
    ('mmcv NMS and RoIAlign on cpu', True, 'run'),
    ('mmcv NMS and RoIAlign on cuda', False, "NotImplementedError: nms_impl: implementation "
     "for device cuda:0 not found.")]


@pytest.fixture
def fake_checks(tmp_path, monkeypatch):
    """``set(checks)``: what the environment check of every process started from now
    finds; ``asked()``: the want_cuda of each check made so far."""
    site = tmp_path / 'fake_site'
    site.mkdir()
    (site / 'sitecustomize.py').write_text(FAKE_CHECKS_SITE)
    log = tmp_path / 'checks.jsonl'
    monkeypatch.setenv('PYTHONPATH', os.pathsep.join(
        [str(site)] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
    monkeypatch.setenv('FAKE_CHECKS_LOG', str(log))

    def set_checks(checks):
        monkeypatch.setenv('FAKE_CHECKS', json.dumps(checks))

    def asked():
        return ([json.loads(line) for line in log.read_text().splitlines()]
                if log.exists() else [])
    return SimpleNamespace(set=set_checks, asked=asked)


@pytest.fixture
def gpu_machine(monkeypatch):
    """This process sees a GPU (the plans use CUDA by default, as on a GPU machine)."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)


def test_a_cpu_only_mmcv_stops_the_suite_before_its_first_experiment(
        tmp_path, fake_checks, gpu_machine):
    """A GPU machine, no --gpus: PSPNet then RetinaNet. The check runs first (on CUDA,
    with the detector's ops) and stops everything, not RetinaNet's first NMS."""
    fake_checks.set([CUDA_OK, NCCL_OK, *CPU_ONLY_MMCV])
    out, exit_ = _run([SEG_CONFIG, RETINANET], tmp_path, steps=['speed'])
    assert isinstance(exit_, MMRepVGGError) and 'nothing was run' in str(exit_), out
    assert fake_checks.asked() == [True]
    assert ('check failed: mmcv ops built for CUDA: no (CPU ops only; detectors need NMS '
            'and RoIAlign on the GPU') in out
    assert 'check failed: mmcv NMS and RoIAlign on cuda: NotImplementedError' in out
    assert not osp.exists(tmp_path / 'w')


def test_segmentation_alone_needs_no_mmcv_cuda_ops(tmp_path, fake_checks, gpu_machine):
    fake_checks.set([CUDA_OK, NCCL_OK, *CPU_ONLY_MMCV])
    out, failed = _run([SEG_CONFIG], tmp_path, steps=['speed'], dry_run=True)
    assert failed == 0 and 'check failed' not in out, out
    assert fake_checks.asked() == [True]
    assert re.search(r'environment checked on \S+: torch ', out), out
    # a machine that cannot use its GPU stops it too
    fake_checks.set([('CUDA usable', False, 'this machine has an NVIDIA GPU, but torch '
                      'cannot use it: it needs an NVIDIA driver >= 580.65.06')])
    out, exit_ = _run([SEG_CONFIG], tmp_path, steps=['speed'])
    assert isinstance(exit_, MMRepVGGError), out
    assert 'check failed: CUDA usable: this machine has an NVIDIA GPU' in out


def test_check_tool_prints_verdicts_and_this_machines_facts(monkeypatch, capsys, tmp_path):
    from mmrepvgg import env
    from mmrepvgg.reproduce import preflight
    monkeypatch.setattr(env, 'environment_checks', lambda want_cuda=None: [
        env.Check(*c) for c in [CUDA_OK, *CPU_ONLY_MMCV]])
    monkeypatch.setenv('SLURMD_NODENAME', 'gpu-node-7')  # as slurm sets it in a task
    monkeypatch.setenv('SLURM_JOB_ID', '4242')
    assert preflight.main(['--check', '--device', 'cuda', '--detection']) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f'[ok]     CUDA usable: {CUDA_OK[2]}'
    assert lines[1].startswith('[FAILED] mmcv ops built for CUDA: no (CPU ops only')
    report = json.loads(lines[-1].split(preflight.CHECK_MARK)[1])
    assert len(report['problems']) == 2
    machine = report['machine']
    assert machine['host'] == 'gpu-node-7' and machine['slurm']['slurm_job_id'] == '4242'
    assert machine['torch'] == torch.__version__
    # no detector: mmcv's CUDA ops are not needed, and said so
    assert preflight.main(['--check', '--device', 'cuda']) == 0
    out = capsys.readouterr().out
    assert '[-]      mmcv ops built for CUDA: no (CPU ops only' in out
    assert 'not needed: no detector runs here' in out
    # --record: the facts alone, whole
    path = tmp_path / 'train' / 'environment.json'
    assert preflight.main(['--record', str(path)]) == 0
    recorded = json.loads(path.read_text())
    assert recorded['host'] == 'gpu-node-7'
    assert {'torch', 'cuda', 'gpu', 'driver', 'mmcv', 'mmcv_ops_cuda', 'cpu'} <= set(recorded)


def _slurm_bin(tmp_path, fail=False):
    """A PATH folder with a fake srun (helpers.FAKE_SRUN) and scontrol (mmengine's slurm
    launcher asks it for the first node's address)."""
    folder = tmp_path / 'slurm_bin'
    write_executable(folder / 'srun', FAKE_SRUN if not fail else
                     '#!/bin/sh\necho "srun: error: invalid partition specified: gpu" >&2\n'
                     'exit 1\n')
    write_executable(folder / 'scontrol', '#!/bin/sh\necho 127.0.0.1\n')
    return folder


def _calls(log):
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_under_slurm_the_check_runs_on_a_node_before_anything(tmp_path, fake_checks,
                                                              monkeypatch):
    monkeypatch.setenv('PATH', f'{_slurm_bin(tmp_path)}{os.pathsep}{os.environ["PATH"]}')
    monkeypatch.setenv('FAKE_LOG', str(tmp_path / 'srun.jsonl'))
    monkeypatch.setenv('SRUN_ARGS', '--account=vision')
    fake_checks.set([CUDA_OK, NCCL_OK, *CPU_ONLY_MMCV])
    out, exit_ = _run([SEG_CONFIG, RETINANET], tmp_path, steps=['speed'], launcher='slurm',
                      partition='gpu', gpus=8)
    assert isinstance(exit_, MMRepVGGError), out
    assert 'checking the environment on a node of partition gpu' in out
    assert 'check failed: on gpu-node-7: mmcv ops built for CUDA: no (CPU ops only' in out
    (srun,) = _calls(tmp_path / 'srun.jsonl')  # the check, and nothing after it
    assert srun['options'] == {'-p': 'gpu', '--job-name': 'mmrepvgg-check',
                               '--gres': 'gpu:1', '--ntasks': '1',
                               '--kill-on-bad-exit': '1', '--account': 'vision'}
    assert srun['command'][1:] == ['-m', 'mmrepvgg.reproduce.preflight', '--check', '--device',
                                   'cuda', '--detection']
    assert fake_checks.asked() == [True]

    # srun that cannot start a job: its own words
    monkeypatch.setenv('PATH', f'{_slurm_bin(tmp_path / "x", fail=True)}{os.pathsep}'
                       f'{os.environ["PATH"]}')
    out, exit_ = _run([SEG_CONFIG], tmp_path, steps=['speed'], launcher='slurm',
                      partition='gpu', gpus=8)
    assert isinstance(exit_, MMRepVGGError), out
    assert ('check failed: the environment check did not run on a node of partition gpu '
            '(exit 1): srun: error: invalid partition specified: gpu') in out


# What tools/train.py leaves (the final checkpoint, last_checkpoint), from a fake that
# says where and how it ran: a real training cannot start mmengine's slurm launcher on a
# machine without CUDA (it calls torch.cuda.set_device).
FAKE_TRAIN = """
import os, sys, torch
args = sys.argv[1:]
work = args[args.index('--work-dir') + 1]
iters = next(int(a.split('=')[1]) for a in args if a.startswith('train_cfg.max_iters='))
os.makedirs(work, exist_ok=True)
path = os.path.join(work, f'iter_{iters}.pth')
torch.save(dict(meta=dict(), state_dict=dict(w=torch.zeros(1))), path)
with open(os.path.join(work, 'last_checkpoint'), 'w') as f:
    f.write(path)
print('trained on', os.environ['SLURMD_NODENAME'], 'rank', os.environ['SLURM_PROCID'],
      'port', os.environ['MASTER_PORT'], 'with', ' '.join(args[-2:]))
"""


def test_slurm_training_records_the_node_that_trained(mini_root, tmp_path, monkeypatch):
    """tools/reproduce.py --launcher slurm, a fake srun running two tasks: the check and
    the training go through srun, the real launch scripts give both tasks the job's port,
    the first task records its node, and result.json holds that node's facts, not this
    machine's."""
    from mmrepvgg.reproduce import plan as reproduce_plan
    tools = tmp_path / 'tools'
    tools.mkdir()
    for name in os.listdir(osp.join(ROOT, 'tools')):  # the launch scripts, as they are
        if name.endswith('.sh'):
            shutil.copy(osp.join(ROOT, 'tools', name), tools / name)
    (tools / 'train.py').write_text(FAKE_TRAIN)
    monkeypatch.setattr(reproduce_plan, 'tools_folder', lambda: str(tools))
    monkeypatch.setenv('PATH', f'{_slurm_bin(tmp_path)}{os.pathsep}{os.environ["PATH"]}')
    monkeypatch.setenv('FAKE_LOG', str(tmp_path / 'srun.jsonl'))
    monkeypatch.setenv('FAKE_JOB_ID', '4242')
    monkeypatch.delenv('MASTER_PORT', raising=False)
    lines = []
    monkeypatch.chdir(mini_root)
    failed = reproduce([SEG_CONFIG], ReproduceOptions(
        work_dir=str(tmp_path / 'w'), steps=['train'], launcher='slurm', partition='gpu',
        gpus=2, mini=True, cfg_options=SEG_RUN), say=lines.append)
    out = '\n'.join(lines)
    log = open(tmp_path / 'w' / SEG / 'train.log').read()
    assert failed == 0, out + log
    assert 'environment checked on gpu-node-7: torch ' in out
    check, train = _calls(tmp_path / 'srun.jsonl')
    assert check['options']['--job-name'] == 'mmrepvgg-check'
    assert train['options']['--job-name'] == f'{SEG}-train'
    assert train['options']['--ntasks'] == '2'
    port = 10000 + 4242 % 2000 * 10
    for rank in (0, 1):
        assert f'trained on gpu-node-7 rank {rank} port {port} with --launcher slurm' in log
    result = _result(tmp_path / 'w', SEG)
    env = result['environment']
    assert env['host'] == 'gpu-node-7' != socket.gethostname()
    assert env['slurm']['slurm_job_id'] == '4242'
    assert env['recorded_by'] == "the train step's machine"
    assert env['launcher'] == 'slurm' and env['processes'] == 2
    assert env['torch'] == torch.__version__
    assert result['steps']['train']['machine']['host'] == 'gpu-node-7'
