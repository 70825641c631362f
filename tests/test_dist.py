"""Two-process CPU training and --deploy testing through tools/dist_train.sh and
tools/dist_test.sh (torchrun, gloo backend), on the SyncBN PSPNet RepVGG config; and
two-process runs of the backbone alone (torch.multiprocessing, gloo)."""
import itertools
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from helpers import ROOT, SEG_CONFIG, SEG_MODEL, TEST, TINY
from mmrepvgg.errors import MMRepVGGError

A0 = SEG_MODEL + TEST + ['env_cfg.dist_cfg.backend=gloo']
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
        SEG_CONFIG, '2', '--mini', '--work-dir', work_dir, '--cfg-options',
        'train_cfg.max_iters=2', 'train_dataloader.batch_size=2', 'randomness.seed=0'] + A0,
        mini_root)
    tail = train_out[-6000:]
    assert 'Distributed training: True' in train_out, tail
    assert os.path.isfile(os.path.join(work_dir, 'iter_2.pth')), tail
    # torch's SyncBatchNorm refuses CPU modules; the tools fall back to per-process BN.
    assert 'SyncBN does not run on CPU' in train_out, tail
    _metrics(train_out, 'val')  # validation at the last iteration ran

    test_out, test_wall = _run('dist_test.sh', [
        SEG_CONFIG, os.path.join(work_dir, 'iter_2.pth'), '2', '--deploy', '--mini',
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
        [sys.executable, os.path.join(ROOT, 'tools', 'test.py'), SEG_CONFIG,
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
    with pytest.raises(MMRepVGGError, match='env_cfg.dist_cfg.backend=gloo'):
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
    assert load_config(SEG_CONFIG, launcher='mpi', local_rank=0).launcher == 'mpi'
    assert os.environ['LOCAL_RANK'] == '3'
    monkeypatch.delenv('LOCAL_RANK')
    monkeypatch.delenv(variable)
    with pytest.raises(MMRepVGGError, match='not started by mpirun'):
        load_config(SEG_CONFIG, launcher='mpi', local_rank=0)


# --- The backbone alone in two processes (torch.multiprocessing.spawn, gloo, CPU) ---------


def _spawn(worker, *args):
    """Run ``worker(rank, init_file, *args)`` in 2 processes; a failure in either raises
    here with its traceback."""
    import tempfile

    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(worker, args=(os.path.join(folder, 'init'),) + args, nprocs=2)


def _join(rank, init_file):
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)  # two processes on the machine's cores
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank,
                            world_size=2)


def _ddp_worker(rank, init_file, out_indices, result_file):
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from mmrepvgg import RepVGG
    _join(rank, init_file)
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(RepVGG(TINY, out_indices=out_indices),
                                        find_unused_parameters=False)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(1 + rank)  # each process its own batch
        for _ in range(2):  # a parameter without gradient fails the second iteration
            loss = sum(out.square().mean() for out in model(torch.randn(2, 3, 32, 32)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        params = {k: v.detach().clone() for k, v in model.module.named_parameters()}
        torch.save(params, f'{result_file}.{rank}')
    finally:
        dist.destroy_process_group()


def test_ddp_without_unused_parameter_detection_trains_with_early_out_indices(tmp_path):
    """DDP with find_unused_parameters=False (mmengine's default) trains 2 iterations with
    out_indices=(0, 1, 2): stage 4, which no output needs, is not built."""
    import torch
    result = str(tmp_path / 'params')
    _spawn(_ddp_worker, (0, 1, 2), result)
    ranks = [torch.load(f'{result}.{rank}') for rank in range(2)]
    assert ranks[0] and not any(k.startswith('stage4.') for k in ranks[0])
    assert ranks[0].keys() == ranks[1].keys()
    # averaged gradients, same steps: the replicas stay equal
    assert all(torch.equal(v, ranks[1][k]) for k, v in ranks[0].items())


def _synchronized_bn_classes():
    """Batch norms synchronized over processes, in torch ops so they run on CPU with gloo
    (torch's SyncBatchNorm and mmcv's need GPUs): one a torch SyncBatchNorm, one an mmcv
    SyncBatchNorm (no torch _BatchNorm), as the backbone meets them. Built on first use,
    in the process that needs them."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from mmcv.ops import SyncBatchNorm as MMSyncBN
    from torch import nn

    class SumOverProcesses(torch.autograd.Function):
        """All-reduce sum; its gradient is the sum of the processes' gradients."""

        @staticmethod
        def forward(ctx, x):
            x = x.clone()
            dist.all_reduce(x)
            return x

        @staticmethod
        def backward(ctx, grad):
            grad = grad.clone()
            dist.all_reduce(grad)
            return grad

    def forward(self, x):
        """Normalizes with the batch statistics of all processes (biased variance),
        tracks the unbiased one; communicates in forward and in backward."""
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                self.bias, False, 0.0, self.eps)
        self.num_batches_tracked.add_(1)
        count = SumOverProcesses.apply(x.new_tensor([x.numel() / x.shape[1]]))
        mean = SumOverProcesses.apply(x.sum((0, 2, 3))) / count
        centred = x - mean[:, None, None]
        var = SumOverProcesses.apply(centred.square().sum((0, 2, 3))) / count
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * count / (count - 1), self.momentum)
        scale = self.weight * torch.rsqrt(var + self.eps)
        return centred * scale[:, None, None] + self.bias[:, None, None]

    class TorchSyncBN(nn.SyncBatchNorm):
        pass

    class MmcvSyncBN(MMSyncBN):
        pass

    TorchSyncBN.forward = MmcvSyncBN.forward = forward
    return TorchSyncBN, MmcvSyncBN


def _with_synchronized_bn(module, cls):
    from torch import nn
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            norm = cls(child.num_features, child.eps, child.momentum)
            norm.load_state_dict(child.state_dict())
            setattr(module, name, norm)
        else:
            _with_synchronized_bn(child, cls)
    return module


def _checkpoint_sync_bn_worker(rank, init_file, result_file):
    import torch
    import torch.distributed as dist
    from torch.utils._python_dispatch import TorchDispatchMode

    from mmrepvgg import RepVGG, RepVGGBlock

    class CountCollectives(TorchDispatchMode):
        """Collectives that reach the process group (a replayed one does not)."""
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func.namespace == 'c10d'
            return func(*args, **(kwargs or {}))

    _join(rank, init_file)
    try:
        result = {}
        for norm_cls in _synchronized_bn_classes():
            torch.manual_seed(0)
            plain = _with_synchronized_bn(RepVGG(TINY), norm_cls)
            # (an mmcv SyncBatchNorm holds its process group: no deepcopy)
            ckpt = _with_synchronized_bn(RepVGG(TINY, with_cp=True), norm_cls)
            ckpt.load_state_dict(plain.state_dict())
            torch.manual_seed(1 + rank)
            x = torch.randn(2, 3, 32, 32)
            for name, model in (('plain', plain), ('ckpt', ckpt)):
                blocks = [m for m in model.modules() if isinstance(m, RepVGGBlock)]
                calls = [0]
                for block in blocks:
                    block.register_forward_pre_hook(
                        lambda *_: calls.__setitem__(0, calls[0] + 1))
                model.train()
                with CountCollectives() as forward:
                    loss = sum(out.square().mean() for out in model(x))
                with CountCollectives() as backward:
                    loss.backward()
                result[norm_cls.__name__, name] = dict(
                    block_calls=calls[0] / len(blocks), forward=forward.count,
                    backward=backward.count,
                    norms=sum(isinstance(m, norm_cls) for m in model.modules()),
                    stats={k: v.clone() for k, v in model.state_dict().items()
                           if 'running' in k or 'num_batches' in k},
                    grads={k: p.grad.clone() for k, p in model.named_parameters()})
        torch.save(result, f'{result_file}.{rank}')
    finally:
        dist.destroy_process_group()


def test_checkpointing_with_synchronized_bn_communicates_and_counts_once(tmp_path):
    """with_cp and a batch norm synchronized over 2 processes: backward recomputes every
    block, but no collective reruns there (the recomputation replays the forward's
    synchronized statistics), the running statistics are those of a step without
    checkpointing (updated once), and so are the gradients. For a torch SyncBatchNorm
    and for an mmcv SyncBatchNorm (which is no torch _BatchNorm)."""
    import torch
    result = str(tmp_path / 'result')
    _spawn(_checkpoint_sync_bn_worker, result)
    for rank, norm in itertools.product(range(2), ('TorchSyncBN', 'MmcvSyncBN')):
        plain, ckpt = (torch.load(f'{result}.{rank}')[norm, k] for k in ('plain', 'ckpt'))
        assert plain['block_calls'] == 1 and ckpt['block_calls'] == 2
        # 3 all-reduces per norm in forward (count, mean, variance), 2 in backward
        norms = plain['norms']
        assert norms > 0 and plain['forward'] == 3 * norms and plain['backward'] == 2 * norms
        assert (ckpt['forward'], ckpt['backward']) == (plain['forward'], plain['backward'])
        for key, value in plain['stats'].items():
            # the same computation (the forward) produced both: equal, not merely close
            assert torch.equal(value, ckpt['stats'][key]), key
            if key.endswith('num_batches_tracked'):
                assert value.item() == 1, key
        # the recomputation repeats the same fp32 operations on the same values: at most
        # fp32 rounding apart (torch's fp32 tolerance, ~10 ulp)
        for key, grad in plain['grads'].items():
            torch.testing.assert_close(ckpt['grads'][key], grad, msg=key)
