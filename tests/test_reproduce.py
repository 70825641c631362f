"""tools/reproduce.py: one command trains (here with two gloo processes), resumes an
interrupted training, tests unfused and fused, times and tabulates; it checks the data
before anything runs, refuses another batch split unless asked, and skips what is done."""
import json
import os
import os.path as osp
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from mmrepvgg.apis.reproduce import ReproduceOptions, reproduce
from mmrepvgg.apis.reproduce_plan import Plan
from mmrepvgg.apis.results import write_results
from mmrepvgg.fileio import sha256_file
from test_tools import (DET_CONFIG, DET_MODEL, MAX_FLIPPED_PIXELS, ROOT, SEG_CONFIG,
                        SEG_MODEL, TEST, TRAIN)

TOOL = osp.join(ROOT, 'tools', 'reproduce.py')
SEG = 'pspnet_repvgg_b1g2_cityscapes'
DET = 'faster-rcnn_repvgg-a2_fpn_1x_coco'
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
    except SystemExit as exit_:
        return '\n'.join(lines), exit_
    finally:
        os.chdir(cwd)
    return '\n'.join(lines), failed


def test_missing_data_is_named_with_the_command_that_prepares_it(tmp_path):
    out, exit_ = _run([SEG_CONFIG, DET_CONFIG], tmp_path, steps=['test'])
    assert isinstance(exit_, SystemExit) and 'nothing was run' in str(exit_)
    assert 'CityscapesDataset data missing: data/cityscapes/leftImg8bit/val/' in out
    assert 'dataset_converters/cityscapes.py" data/cityscapes' in out
    assert 'CocoDataset data missing: data/coco/annotations/instances_val2017.json' in out
    assert 'download_dataset.py" --dataset-name coco2017' in out
    assert not osp.exists(tmp_path / 'w')
    out, _ = _run([SEG_CONFIG], tmp_path, steps=['test'], mini=True)
    assert 'make_mini_data.py cityscapes data/mini_cityscapes' in out


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
    assert 'srun -p gpu' in out and 'slurm_test.sh gpu' in out


def test_another_batch_split_needs_scale_lr(tmp_path):
    options = ReproduceOptions(work_dir=str(tmp_path), gpus=4)
    with pytest.raises(SystemExit, match=r'batch of 16 \(8 GPUs x 2 images\).*--scale-lr'):
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
