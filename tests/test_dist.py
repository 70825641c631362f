"""Two-process CPU training and --deploy testing through tools/dist_train.sh and
tools/dist_test.sh (torchrun, gloo backend), on the SyncBN PSPNet RepVGG config."""
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, 'configs', 'pspnet_repvgg_b1g2_cityscapes.py')
A0 = ['model.backbone.arch=A0', 'model.decode_head.in_channels=1280',
      'model.auxiliary_head.in_channels=192', 'test_dataloader.dataset.indices=2',
      'env_cfg.dist_cfg.backend=gloo']
METRIC = re.compile(r'Iter\((val|test)\) \[\d+/\d+\]\s+aAcc: ([\d.]+)\s+mIoU: ([\d.]+)'
                    r'\s+mAcc: ([\d.]+)')

pytestmark = pytest.mark.skipif(sys.platform == 'win32', reason='bash launch scripts')


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


# These runs test the CPU path (gloo, SyncBN falling back to per-process BN); on a CUDA
# machine the GPUs are hidden from them, so two ranks never contend for one device.
CPU_ONLY = dict(CUDA_VISIBLE_DEVICES='')


def _run(script, args, cwd):
    env = dict(os.environ, PYTHON=sys.executable, PORT=str(_free_port()),
               MASTER_ADDR='127.0.0.1', OMP_NUM_THREADS='1', **CPU_ONLY)
    start = time.perf_counter()
    proc = subprocess.run(['bash', os.path.join(ROOT, 'tools', script)] + args, cwd=cwd,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=420)
    wall = time.perf_counter() - start
    output = proc.stdout
    assert proc.returncode == 0, f'{script} failed (rc {proc.returncode}):\n{output[-6000:]}'
    return output, wall


def _png(path):
    return np.array(Image.open(path))


def _metrics(output, kind):
    found = [m.groups()[1:] for m in METRIC.finditer(output) if m.group(1) == kind]
    assert found, f'no {kind} metrics in the output:\n{output[-4000:]}'
    return tuple(float(v) for v in found[-1])


def test_two_process_gloo_train_then_deploy_test(mini_root, tmp_path):
    work_dir = str(tmp_path / 'dist')
    train_out, train_wall = _run('dist_train.sh', [
        CONFIG, '2', '--mini', '--work-dir', work_dir, '--cfg-options',
        'train_cfg.max_iters=2', 'train_dataloader.batch_size=2', 'randomness.seed=0'] + A0,
        mini_root)
    tail = train_out[-6000:]
    assert 'Distributed training: True' in train_out, tail
    assert os.path.isfile(os.path.join(work_dir, 'iter_2.pth')), tail
    # torch's SyncBatchNorm refuses CPU modules; the tools fall back to per-process BN.
    assert 'SyncBN does not run on CPU' in train_out, tail
    _metrics(train_out, 'val')  # validation at the last iteration ran

    test_out, test_wall = _run('dist_test.sh', [
        CONFIG, os.path.join(work_dir, 'iter_2.pth'), '2', '--deploy', '--mini',
        '--work-dir', work_dir, '--out', str(tmp_path / 'maps_dist'), '--cfg-options'] + A0,
        mini_root)
    print(f'\nDDP (2 processes, gloo, CPU) wall time: dist_train.sh {train_wall:.1f} s, '
          f'dist_test.sh --deploy {test_wall:.1f} s, total {train_wall + test_wall:.1f} s')
    fused = re.search(r'ReparamHook: fused (\d+) blocks; parameters ([\d,]+) -> ([\d,]+); '
                      r'max output difference on a probe input \S+, (.*?) \(', test_out)
    assert fused, f'no ReparamHook line in the test output:\n{test_out[-4000:]}'
    assert int(fused.group(1)) == 22, fused.group(0)  # A0: stem + 2 + 4 + 14 + 1 blocks
    assert int(fused.group(3).replace(',', '')) < int(fused.group(2).replace(',', ''))
    assert fused.group(4) == 'within fp32 rounding', fused.group(0)
    test = _metrics(test_out, 'test')

    # The same checkpoint in training form, one process, no --deploy: same scores.
    # (Not the validation of the training run: with per-process BN each rank kept its
    # own running statistics there, while the checkpoint holds rank 0's.)
    # On the CPU too, in a process of its own (as the distributed ranks ran).
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, 'tools', 'test.py'), CONFIG,
         os.path.join(work_dir, 'iter_2.pth'), '--mini', '--work-dir', str(tmp_path / 'single'),
         '--out', str(tmp_path / 'maps_single'), '--cfg-options'] + A0[:-1],
        cwd=mini_root, env=dict(os.environ, **CPU_ONLY), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-6000:]
    single = _metrics(proc.stdout, 'test')
    # Both processes wrote their image's predicted map: the same maps as one process.
    names = sorted(os.listdir(tmp_path / 'maps_single'))
    assert len(names) == 2 and sorted(os.listdir(tmp_path / 'maps_dist')) == names
    flipped = sum(int((_png(tmp_path / 'maps_dist' / n) != _png(tmp_path / 'maps_single' / n))
                      .sum()) for n in names)
    # Fusion moves outputs by ~1e-6: only a pixel whose two best classes tie that closely
    # could flip (the seeded training makes that rare); identical maps, identical scores.
    assert flipped <= 8, f'{flipped} pixels differ'
    if flipped == 0:
        assert test == single, f'2-process --deploy {test} vs 1 process {single}'
    else:
        assert all(abs(a - b) <= 0.05 for a, b in zip(test, single)), (test, single)


def test_nccl_on_cpu_is_refused_with_a_hint():
    import torch
    from mmengine.config import Config

    from mmrepvgg.apis.runner import prepare_cpu_distributed
    if torch.cuda.is_available():
        pytest.skip('only meaningful without CUDA')
    cfg = Config(dict(launcher='pytorch', env_cfg=dict(dist_cfg=dict(backend='nccl')),
                      model=dict(type='X')))
    with pytest.raises(SystemExit, match='env_cfg.dist_cfg.backend=gloo'):
        prepare_cpu_distributed(cfg)
    # Single-process runs are left alone.
    cfg = Config(dict(launcher='none', model=dict(norm_cfg=dict(type='SyncBN'))))
    assert prepare_cpu_distributed(cfg).model.norm_cfg.type == 'SyncBN'


@pytest.mark.parametrize('variable', ['OMPI_COMM_WORLD_LOCAL_RANK', 'MPI_LOCALRANKID'])
def test_mpi_launcher_takes_the_local_rank_from_mpirun(variable, monkeypatch):
    from mmrepvgg.apis.config import load_config
    monkeypatch.setenv('LOCAL_RANK', '0')  # recorded, so the test leaves it as it was
    monkeypatch.delenv('LOCAL_RANK')
    monkeypatch.setenv(variable, '3')
    assert load_config(CONFIG, launcher='mpi', local_rank=0).launcher == 'mpi'
    assert os.environ['LOCAL_RANK'] == '3'
    monkeypatch.delenv('LOCAL_RANK')
    monkeypatch.delenv(variable)
    with pytest.raises(SystemExit, match='not started by mpirun'):
        load_config(CONFIG, launcher='mpi', local_rank=0)
