"""tools/check_env.py (mmrepvgg.env.environment_checks, and what the tool prints) and the
refusal to run on the CPU of a machine whose GPU torch cannot use (a driver older than
the torch build needs, GPU device files this process may not open): the GPU is simulated,
as these machines have none."""
import errno
import os

import pytest
import torch

from helpers import SEG_CONFIG, SEG_MODEL, TRAIN, run_entry, run_tools
from mmrepvgg import apis, env
from mmrepvgg.ops.winograd_kernel import winograd_check
from mmrepvgg.errors import MMRepVGGError


@pytest.fixture
def old_driver(monkeypatch):
    """A GPU that answers nvidia-smi with a CUDA 12 driver; torch is a CUDA 13 build."""
    monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)
    monkeypatch.setattr(env, 'driver_version', lambda: '535.104.05')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.version, 'cuda', '13.0')


def test_an_unusable_gpu_says_which_driver_torch_needs(old_driver):
    reason = env.cuda_unusable_reason()
    assert '>= 580.65.06' in reason and 'the driver is 535.104.05' in reason
    assert 'TORCH_CUDA=cu128' in reason


@pytest.fixture
def gpu_device_files(monkeypatch, tmp_path):
    """Eight GPU device files (stand-ins, which open) and /dev/nvidiactl beside them."""
    for name in [f'nvidia{i}' for i in range(8)] + ['nvidiactl']:
        (tmp_path / name).touch()
    monkeypatch.setattr(env, 'DEVICE_FILES', str(tmp_path / 'nvidia[0-9]*'))
    return tmp_path


def test_gpus_not_allotted_to_this_process_are_said_so_not_blamed_on_the_driver(
        old_driver, gpu_device_files, monkeypatch):
    """A slurm job given no GPU on a GPU node: the device files are there, its cgroup
    refuses to open them, the driver is new enough."""
    monkeypatch.setattr(env, 'driver_version', lambda: '580.95.05')

    def refused(path):
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), path)
    monkeypatch.setattr(env, '_open_device', refused)
    reason = env.cuda_unusable_reason()
    assert reason.startswith(
        f'this machine has NVIDIA GPU device files ({gpu_device_files}/nvidia0 to '
        f'{gpu_device_files}/nvidia7), but this process may not open them (Operation not '
        'permitted): no GPU is allotted to it (under slurm, ask for GPUs with --gres=gpu:N')
    assert reason.endswith('hide the GPUs (CUDA_VISIBLE_DEVICES= before the command)')
    assert 'driver' not in reason
    assert _verdicts(env.environment_checks(None))['CUDA usable'] == \
        (False, reason)


def test_a_driver_new_enough_for_torch_is_not_blamed(old_driver, gpu_device_files,
                                                     monkeypatch):
    monkeypatch.setattr(env, 'driver_version', lambda: '580.95.05')
    monkeypatch.setattr(env, '_cuda_start_error',
                        lambda: 'CUDA driver initialization failed, you might not have a '
                                'CUDA gpu.')
    reason = env.cuda_unusable_reason()
    assert reason.startswith(f'this machine has an NVIDIA GPU and driver 580.95.05, new '
                             f'enough for torch {torch.__version__} (CUDA 13.0 needs >= '
                             '580.65.06), but CUDA does not start: CUDA driver '
                             'initialization failed')
    assert 'Update the driver' not in reason
    monkeypatch.setattr(env, 'driver_version', lambda: '535.104.05')  # the files open
    assert 'needs an NVIDIA driver >= 580.65.06, the driver is 535.104.05' in \
        env.cuda_unusable_reason()


def _verdicts(checks):
    return {check.name: (check.ok, check.detail) for check in checks}


def test_check_env_fails_where_cuda_is_requested_or_unusable(old_driver):
    # tools/check_env.py without --device: want_cuda None; it exits 1 on a failed check
    checks = _verdicts(env.environment_checks(None))
    assert not all(ok for ok, _ in checks.values())
    ok, detail = checks['CUDA usable']
    assert not ok and '>= 580.65.06' in detail
    assert not checks['mmcv ops built for CUDA'][0]  # this machine's wheel has CPU ops
    assert checks['mmcv NMS and RoIAlign on cpu'] == (True, 'run')


def test_check_env_passes_on_a_cpu_machine(monkeypatch):
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '')  # no GPU, whatever this machine has
    checks = _verdicts(env.environment_checks(False) + [winograd_check()])  # --device cpu
    assert all(ok for ok, _ in checks.values()), checks
    assert 'Winograd op built' in checks
    assert 'CUDA usable' not in checks
    checks = _verdicts(env.environment_checks(True))  # --device cuda
    assert checks['CUDA usable'] == (False, 'CUDA_VISIBLE_DEVICES hides every GPU')


def test_check_env_tool_prints_the_environment_and_one_verdict_a_line(tmp_path):
    """What tools/check_env.py prints and its exit status, on this machine with its GPUs
    hidden: every check passes for --device cpu; --device cuda fails."""
    hidden = dict(os.environ, CUDA_VISIBLE_DEVICES='')
    cpu, cuda = run_tools(('check_env', '--device', 'cpu'), ('check_env', '--device', 'cuda'),
                          cwd=tmp_path, env=hidden)
    assert cpu.returncode == 0, (cpu.stdout + cpu.stderr)[-5000:]
    assert 'TorchVision' in cpu.stdout  # mmengine's collect_env first
    assert '[ok]     mmcv NMS and RoIAlign on cpu' in cpu.stdout
    assert 'every check passed' in cpu.stdout and 'CUDA usable' not in cpu.stdout
    assert cuda.returncode == 1, (cuda.stdout + cuda.stderr)[-5000:]
    assert 'TorchVision' in cuda.stdout
    assert '[FAILED] CUDA usable' in cuda.stdout
    assert 'CUDA_VISIBLE_DEVICES hides every GPU' in cuda.stdout
    assert '[FAILED] mmcv ops built for CUDA' in cuda.stdout  # this machine's wheel: CPU ops
    assert '[ok]     mmcv NMS and RoIAlign on cpu' in cuda.stdout
    assert 'check(s) failed: CUDA usable' in cuda.stdout


def test_training_refuses_to_fall_back_to_the_cpu(old_driver, mini_root, tmp_path):
    work = tmp_path / 'work'
    with pytest.raises(MMRepVGGError, match=r'cannot use it: it needs an NVIDIA driver >= '
                                         r'580\.65\.06.*CUDA_VISIBLE_DEVICES='):
        run_entry(apis.train, mini_root, SEG_CONFIG, mini=True, work_dir=work,
                  options=TRAIN + SEG_MODEL)
    assert not any(work.glob('**/*.pth'))
