"""Whether this machine can run what it is asked to: CUDA, mmcv's CUDA ops, NCCL, the
Winograd op. ``tools/check_env.py`` prints these checks; the tools refuse to fall back to
the CPU silently on a machine whose GPU torch cannot use."""
import os
import re
import subprocess
from typing import FrozenSet, List, NamedTuple, Optional, Tuple

import torch

__all__ = ['Check', 'environment_checks', 'gpu_present', 'driver_version',
           'cuda_unusable_reason', 'cpu_info']

# The oldest NVIDIA driver (Linux) each CUDA major version's builds run on: CUDA 12 builds
# run on any CUDA 12 driver (minor-version compatibility), CUDA 13 ones need a 580 driver.
MIN_DRIVER = {11: '450.80.02', 12: '525.60.13', 13: '580.65.06'}


class Check(NamedTuple):
    name: str
    ok: bool
    detail: str


def cpu_info() -> Tuple[Optional[str], FrozenSet[str]]:
    """This CPU's model name and feature flags (``avx2``, ``avx512f``, ``amx_tile``, ...)
    from /proc/cpuinfo; None and no flags where it cannot be read."""
    model, flags = None, frozenset()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                key, _, value = line.partition(':')
                if key.strip() == 'model name' and model is None:
                    model = value.strip()
                elif key.strip() == 'flags' and not flags:
                    flags = frozenset(value.split())
                if model is not None and flags:
                    break
    except OSError:
        pass
    return model, flags


def gpu_hidden() -> bool:
    """CUDA_VISIBLE_DEVICES empty or -1: the user chose the CPU."""
    return os.environ.get('CUDA_VISIBLE_DEVICES', None) in ('', '-1')


def driver_version() -> Optional[str]:
    """The NVIDIA kernel driver's version, None without one."""
    try:
        with open('/proc/driver/nvidia/version') as f:
            found = re.search(r'Kernel Module\s+(?:for \S+\s+)?([\d.]+)', f.read())
        if found:
            return found.group(1)
    except OSError:
        pass
    try:
        out = subprocess.run(['nvidia-smi', '--query-gpu=driver_version',
                              '--format=csv,noheader'], capture_output=True, text=True,
                             timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def gpu_present() -> bool:
    """An NVIDIA GPU is on this machine (and not hidden), usable by torch or not."""
    return not gpu_hidden() and (os.path.exists('/dev/nvidia0') or driver_version()
                                 is not None)


def cuda_unusable_reason() -> Optional[str]:
    """Why torch cannot use the GPU this machine has; None when it can or there is none."""
    if not gpu_present() or torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return (f'this machine has an NVIDIA GPU, but torch {torch.__version__} is a '
                'CPU-only build: install a CUDA build')
    major = int(torch.version.cuda.split('.')[0])
    need = MIN_DRIVER.get(major, 'a newer one')
    have = driver_version() or 'unknown'
    return (f'this machine has an NVIDIA GPU, but torch {torch.__version__} (CUDA '
            f'{torch.version.cuda}) cannot use it: it needs an NVIDIA driver >= {need}, '
            f'the driver is {have}. Update the driver, or set up with another torch CUDA '
            'build (TORCH_CUDA=cu128 bash tools/bootstrap.sh for CUDA 12 drivers)')


def _mmcv_checks(need_cuda: bool, cuda: bool) -> List[Check]:
    try:
        from mmcv.ops import get_compiling_cuda_version, nms, roi_align
    except ImportError as err:
        return [Check('mmcv ops', False, f'mmcv.ops does not import: {err}')]
    compiled = get_compiling_cuda_version()
    checks = [Check('mmcv ops built for CUDA', compiled != 'not available' or not need_cuda,
                    f'CUDA {compiled}' if compiled != 'not available' else
                    'no (CPU ops only' + ('; detectors need NMS and RoIAlign on the GPU: '
                                          'set up again on a GPU machine, or with '
                                          'FORCE_CUDA=1)' if need_cuda else ')'))]
    for device in ['cpu'] + (['cuda'] if cuda else []):
        try:
            boxes = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.],
                                  [20., 20., 30., 30.]], device=device)
            kept = nms(boxes, torch.tensor([.9, .8, .7], device=device), .5)[1].tolist()
            pooled = roi_align(torch.ones(1, 1, 8, 8, device=device),
                               torch.tensor([[0., 0., 0., 4., 4.]], device=device), (2, 2))
            ok = kept == [0, 2] and bool((pooled == 1).all())
            detail = 'run' if ok else f'wrong results (kept {kept})'
        except Exception as err:  # noqa: BLE001 - an op missing for the device
            ok, detail = False, f'{type(err).__name__}: {str(err)[:200]}'
        checks.append(Check(f'mmcv NMS and RoIAlign on {device}', ok, detail))
    return checks


def environment_checks(want_cuda: Optional[bool] = None,
                       winograd: bool = True) -> List[Check]:
    """The verdicts a user needs before a long run. ``want_cuda``: True requires a usable
    GPU, False checks the CPU only, None (default) checks a GPU where one is present.
    ``winograd``: also whether the C++ Winograd op loads."""
    checks = []
    unusable = cuda_unusable_reason()
    cuda = torch.cuda.is_available()
    if want_cuda or (want_cuda is None and (cuda or unusable)):
        if cuda:
            names = sorted({torch.cuda.get_device_name(i)
                            for i in range(torch.cuda.device_count())})
            checks.append(Check('CUDA usable', True, f'{torch.cuda.device_count()} GPU(s): '
                                f'{", ".join(names)}; driver {driver_version()}'))
        else:
            checks.append(Check('CUDA usable', False, unusable or (
                'no NVIDIA GPU is visible on this machine' if not gpu_hidden() else
                'CUDA_VISIBLE_DEVICES hides every GPU')))
        import torch.distributed as dist
        nccl = dist.is_available() and dist.is_nccl_available()
        checks.append(Check('NCCL available', nccl, 'torch.distributed with NCCL ' +
                            ('.'.join(map(str, torch.cuda.nccl.version())) if nccl and cuda
                             else 'present' if nccl else 'missing')))
    checks += _mmcv_checks(bool(want_cuda or cuda or unusable), cuda)
    if not winograd:
        return checks
    from .ops.winograd_kernel import load_error, load_kernel
    built = load_kernel()
    checks.append(Check('Winograd op built', built, 'loaded' if built else (
        f'{load_error()}; Winograd convs fall back to torch ops')))
    return checks
