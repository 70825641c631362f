"""tools/check_env.py and the refusal to run on the CPU of a machine whose GPU torch cannot
use (a driver older than the torch build needs): the GPU is simulated, as these machines
have none."""
import pytest
import torch

from mmrepvgg import env
from test_tools import SEG_CONFIG, SEG_MODEL, TRAIN, _run
from tools.check_env import main as check_env_main
from tools.train import main as train_main


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


def test_check_env_fails_where_cuda_is_requested_or_unusable(old_driver, capsys):
    assert check_env_main([]) == 1
    out = capsys.readouterr().out
    assert 'TorchVision' in out  # mmengine's collect_env first
    assert '[FAILED] CUDA usable' in out and '>= 580.65.06' in out
    assert '[FAILED] mmcv ops built for CUDA' in out  # this machine's wheel has CPU ops
    assert '[ok]     mmcv NMS and RoIAlign on cpu' in out


def test_check_env_passes_on_a_cpu_machine(monkeypatch, capsys):
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '')  # no GPU, whatever this machine has
    assert check_env_main(['--device', 'cpu']) == 0
    out = capsys.readouterr().out
    assert 'every check passed' in out and 'CUDA usable' not in out
    assert check_env_main(['--device', 'cuda']) == 1
    assert 'CUDA_VISIBLE_DEVICES hides every GPU' in capsys.readouterr().out


def test_training_refuses_to_fall_back_to_the_cpu(old_driver, mini_root, tmp_path):
    work = tmp_path / 'work'
    with pytest.raises(SystemExit, match=r'cannot use it: it needs an NVIDIA driver >= '
                                         r'580\.65\.06.*CUDA_VISIBLE_DEVICES='):
        _run(train_main, mini_root, [SEG_CONFIG, '--mini', '--work-dir', work],
             TRAIN + SEG_MODEL)
    assert not any(work.glob('**/*.pth'))
