"""Whether this machine can run what it is asked to: CUDA, mmcv's CUDA ops, NCCL, the
Winograd op. ``tools/check_env.py`` prints these checks; the tools refuse to fall back to
the CPU silently on a machine whose GPU torch cannot use.

It also takes the set-up's decisions (``tools/bootstrap.sh`` and the mmcv build scripts
call ``python mmrepvgg/env.py COMMAND``; see ``main``): whether the GPUs can be used before
anything is built, whether the installed torch is the CUDA build asked for, which CUDA
toolkit compiles mmcv's ops, how many compile jobs fit and where ninja is. This module
imports only torch and the standard library, so it runs before the package's own
dependencies are installed.
"""
import errno
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
from contextlib import contextmanager
from typing import Dict, FrozenSet, Iterator, List, NamedTuple, Optional, Tuple

import torch

__all__ = ['Check', 'environment_checks', 'gpu_present', 'driver_version',
           'cuda_unusable_reason', 'cpu_info', 'setup_gpu_problem', 'torch_flavour',
           'torch_build_id', 'torch_build_mismatch', 'cuda_toolkit_choice', 'build_jobs',
           'tool_path', 'tools_on_path', 'mmcv_build_plan', 'setup_decisions']

# The oldest NVIDIA driver (Linux) each CUDA major version's builds run on: CUDA 12 builds
# run on any CUDA 12 driver (minor-version compatibility), CUDA 13 ones need a 580 driver.
MIN_DRIVER = {11: '450.80.02', 12: '525.60.13', 13: '580.65.06'}
#: The GPU device files (one per GPU; /dev/nvidiactl and the others are not counted).
DEVICE_FILES = '/dev/nvidia[0-9]*'
#: Where torch's extension builder looks for a CUDA toolkit after CUDA_HOME and nvcc on PATH.
DEFAULT_CUDA_HOMES = ('/usr/local/cuda',)
#: The archs torch 2.14.1's CUDA build itself targets (Turing to Blackwell, data centre and
#: desktop): mmcv's ops are built for these where no usable GPU says which.
DEFAULT_CUDA_ARCHS = '7.5;8.0;8.6;9.0;10.0;12.0'
#: CUDA major versions whose toolkit pip holds whole, nvcc included (tools/build_mmcv_cuda.sh
#: installs it). pip's CUDA 12 packages (nvidia-cuda-nvcc-cu12, 12.6 to 12.9) hold ptxas,
#: the NVVM library and nvcc's headers, but no nvcc.
PIP_TOOLKITS = (13,)
GIB = 1 << 30
#: Memory one compile job may take: nvcc on mmcv's kernels 2-4 GB, the C++ compiler on
#: torch's headers about 1 GB.
JOB_MEMORY = {'cuda': 3 * GIB, 'cpu': 3 * GIB // 2}


class SetupError(Exception):
    """A set-up decision that cannot be taken: the message says what to change."""


def _version_tuple(text: str) -> Tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r'\d+', text))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0][:300] if text else '') or type(err).__name__


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


def _nvidia_smi(*args: str) -> Optional[str]:
    """nvidia-smi's output, None where it is missing or fails."""
    try:
        out = subprocess.run(['nvidia-smi', *args], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def driver_version() -> Optional[str]:
    """The NVIDIA kernel driver's version, None without one."""
    # nvidia-smi first: it is what the user sees, and what a container or a test puts
    # in place; the kernel module's file answers where nvidia-smi finds no GPU (a job
    # given none).
    out = _nvidia_smi('--query-gpu=driver_version', '--format=csv,noheader')
    if out and out.strip():
        return out.split()[0]
    try:
        with open('/proc/driver/nvidia/version') as f:
            found = re.search(r'Kernel Module\s+(?:for \S+\s+)?([\d.]+)', f.read())
        if found:
            return found.group(1)
    except OSError:
        pass
    return None


def nvidia_smi_gpus() -> int:
    """The GPUs ``nvidia-smi -L`` lists (NVML counts them whether or not the CUDA runtime
    can start on them); 0 where nvidia-smi is missing or fails."""
    out = _nvidia_smi('-L')
    return sum(line.startswith('GPU ') for line in out.splitlines()) if out else 0


def device_files() -> List[str]:
    """The GPU device files present (/dev/nvidia0, ...), in GPU order."""
    return sorted(glob.glob(DEVICE_FILES), key=_version_tuple)


def _open_device(path: str) -> None:
    os.close(os.open(path, os.O_RDWR))


def device_files_error() -> Optional[OSError]:
    """The error opening the GPU device files gave when none of them opens (a slurm job
    given no GPU sees them all, but its cgroup refuses them); None when one opens or there
    are none."""
    error = None
    for path in device_files():
        try:
            _open_device(path)
            return None
        except OSError as err:
            error = err
    return error


def gpu_present() -> bool:
    """An NVIDIA GPU is on this machine (and not hidden), usable by torch or not."""
    return not gpu_hidden() and (bool(device_files()) or driver_version() is not None)


def _cuda_start_error() -> Optional[str]:
    """What CUDA says when torch starts it here; None when it starts."""
    try:
        torch.cuda.init()
    except Exception as err:  # noqa: BLE001 - any failure is the answer
        return _first_line(err)
    return None


def _span(files: List[str]) -> str:
    return files[0] if len(files) == 1 else f'{files[0]} to {files[-1]}'


def cuda_unusable_reason() -> Optional[str]:
    """Why torch cannot use the GPU this machine has; None when it can or there is none.
    It says what it found: device files this process may not open, a driver older than
    torch's CUDA needs, or a driver new enough with the error CUDA gives."""
    if not gpu_present() or torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return (f'this machine has an NVIDIA GPU, but torch {torch.__version__} is a '
                'CPU-only build: install a CUDA build')
    hide = ('to run on the CPU on purpose, hide the GPUs (CUDA_VISIBLE_DEVICES= before '
            'the command)')
    blocked = device_files_error()
    if blocked is not None:
        files = _span(device_files())
        if blocked.errno in (errno.EPERM, errno.EACCES):
            return (f'this machine has NVIDIA GPU device files ({files}), but this process '
                    f'may not open them ({blocked.strerror}): no GPU is allotted to it '
                    '(under slurm, ask for GPUs with --gres=gpu:N or --gpus=N; in a '
                    f'container, pass them in); {hide}')
        return (f'this machine has NVIDIA GPU device files ({files}), but they do not open '
                f'({blocked.strerror or blocked}): check that nvidia-smi lists the GPUs '
                f'here; {hide}')
    major = int(torch.version.cuda.split('.')[0])
    need = MIN_DRIVER.get(major)
    have = driver_version()
    if need and have and _version_tuple(have) >= _version_tuple(need):
        why = _cuda_start_error()
        return (f'this machine has an NVIDIA GPU and driver {have}, new enough for torch '
                f'{torch.__version__} (CUDA {torch.version.cuda} needs >= {need}), but '
                f'CUDA does not start{": " + why if why else ""}. Check that nvidia-smi '
                f'lists the GPUs here and that CUDA_VISIBLE_DEVICES names them; {hide}')
    return (f'this machine has an NVIDIA GPU, but torch {torch.__version__} (CUDA '
            f'{torch.version.cuda}) cannot use it: it needs an NVIDIA driver >= '
            f'{need or "a newer one"}, the driver is {have or "unknown"}. Update the driver, '
            'or set up with another torch CUDA build (TORCH_CUDA=cu128 bash '
            'tools/bootstrap.sh for CUDA 12 drivers)')


# ----------------------------------------------------------------------------------------
# The set-up's decisions

def gpu_archs() -> List[str]:
    """The compute capabilities of the GPUs torch sees ('8.0', '9.0', ...)."""
    return sorted({'%d.%d' % torch.cuda.get_device_capability(i)
                   for i in range(torch.cuda.device_count())}, key=_version_tuple)


def setup_gpu_problem() -> Optional[str]:
    """Why the set-up must stop before it builds anything: this machine has GPUs the
    installed torch cannot use (NVML may count them while the CUDA runtime does not
    start). None when they work, when there are none or when CUDA_VISIBLE_DEVICES hides
    them."""
    reason = cuda_unusable_reason()
    if reason is None and torch.cuda.is_available():
        try:
            gpu_archs()
        except Exception as err:  # noqa: BLE001 - the runtime refuses the GPUs it counts
            reason = (f'torch {torch.__version__} counts {torch.cuda.device_count()} '
                      f'GPU(s) but cannot query them ({_first_line(err)}). Check that '
                      'nvidia-smi lists them here')
    if reason is None:
        return None
    count = nvidia_smi_gpus()
    found = (f'nvidia-smi lists {count} GPU(s), driver {driver_version() or "unknown"}; '
             if count else '')
    return (f'{found}{reason}. To set up for the CPU only on this machine: '
            'CUDA_VISIBLE_DEVICES= make setup')


def torch_flavour() -> str:
    """The installed torch's build as PyTorch's indexes name it: 'cu130', 'cu128',
    'rocm6.4', 'cpu'."""
    cuda, hip = torch.version.cuda, getattr(torch.version, 'hip', None)
    if cuda:
        major, minor = _version_tuple(cuda)[:2]
        return f'cu{major}{minor}'
    if hip:
        return 'rocm' + '.'.join(map(str, _version_tuple(hip)[:2]))
    return 'cpu'


def torch_build_id() -> str:
    """torch's version with its build: '2.14.1+cu130'. PyTorch's own indexes tag every
    build; one without a tag gets it here, so that what was compiled against one build of
    a version (mmcv's wheel, the Winograd op) is never taken for another's."""
    version = torch.__version__
    return version if '+' in version else f'{version}+{torch_flavour()}'


def torch_build_mismatch(wanted: str, default: str) -> Optional[str]:
    """How the installed torch differs from the build TORCH_CUDA asks for (``wanted``:
    'cu128', 'cpu', 'rocm6.4'; empty: the pinned build, ``default``); None when it is that
    build. pip takes torch==X as satisfied by any build of X, so this decides whether the
    set-up must reinstall it."""
    asked = wanted or default
    if not re.fullmatch(r'cpu|cu\d{3,}|rocm\d+\.\d+', asked):
        raise SetupError(f'TORCH_CUDA={wanted!r}: expected a build name of '
                         'https://download.pytorch.org/whl/ such as cu128 (CUDA 12.8), '
                         'cu126, cu130, rocm6.4 or cpu')
    have = torch_flavour()
    if have == asked:
        return None
    what = 'a CPU-only build' if have == 'cpu' else f'the {have} build'
    return (f'torch {torch.__version__} is {what}; '
            + (f'TORCH_CUDA={wanted} asks for {asked}' if wanted else
               f'the set-up installs the {asked} build unless TORCH_CUDA names another'))


def nvcc_release(nvcc: str) -> Optional[str]:
    """The CUDA release nvcc reports ('12.4'), None where it does not run."""
    try:
        out = subprocess.run([nvcc, '--version'], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r'release (\d+\.\d+)', out)
    return found.group(1) if found else None


def _toolkit_home(nvcc: str) -> str:
    """The toolkit an nvcc belongs to, as nvcc reports it (on PATH it may be a wrapper
    script elsewhere, e.g. /usr/local/bin/nvcc: torch's guess from its folder is wrong)."""
    try:
        out = subprocess.run([nvcc, '-v', '-x', 'cu', '/dev/null', '-E'],
                             capture_output=True, text=True, timeout=60)
        top = re.search(r'^#\$ TOP=(.+)$', out.stdout + out.stderr, re.M)
        if top and os.path.isdir(top.group(1).strip()):
            return os.path.realpath(top.group(1).strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def find_cuda_toolkit() -> Tuple[Optional[str], Optional[str], str]:
    """The CUDA toolkit torch's extension builder would take, in its order (CUDA_HOME or
    CUDA_PATH, nvcc on PATH, /usr/local/cuda): (its folder, nvcc's release, where it was
    found). The folder is None without a toolkit; the release None where nvcc does not
    run."""
    home = os.environ.get('CUDA_HOME') or os.environ.get('CUDA_PATH')
    if home:
        nvcc = os.path.join(home, 'bin', 'nvcc')
        return home, nvcc_release(nvcc) if os.path.isfile(nvcc) else None, 'CUDA_HOME'
    nvcc = shutil.which('nvcc')
    if nvcc:
        return _toolkit_home(nvcc), nvcc_release(nvcc), f'nvcc on PATH ({nvcc})'
    for home in DEFAULT_CUDA_HOMES:
        nvcc = os.path.join(home, 'bin', 'nvcc')
        if os.path.isfile(nvcc):
            return os.path.realpath(home), nvcc_release(nvcc), home
    return None, None, ''


def cuda_toolkit_choice() -> Tuple[Optional[str], str]:
    """The CUDA toolkit mmcv's CUDA ops are compiled with: the one installed when its
    major version is torch's (torch's builder refuses another), else None: pip's toolkit
    of torch's CUDA version (tools/build_mmcv_cuda.sh). With one line saying which. Raises
    SetupError where neither can be had (pip has no CUDA 12 nvcc)."""
    cuda = torch.version.cuda
    if cuda is None:
        raise SetupError(f'torch {torch.__version__} is a CPU-only build: mmcv\'s CUDA ops '
                         'need a CUDA build of torch (TORCH_CUDA=cu128 or cu130, or unset)')
    home, release, where = find_cuda_toolkit()
    if home is None:
        found = ('no CUDA toolkit here (no CUDA_HOME, no nvcc on PATH, no '
                 f'{" or ".join(DEFAULT_CUDA_HOMES)})')
    elif release is None:
        found = f'the CUDA toolkit at {home} (from {where}) has no working nvcc'
    elif _version_tuple(release)[0] != _version_tuple(cuda)[0]:
        found = (f'the CUDA toolkit at {home} (from {where}) is CUDA {release}, torch '
                 f'{torch.__version__} is built with CUDA {cuda}')
    else:
        return home, (f'mmcv\'s CUDA ops are built with the CUDA {release} toolkit at {home} '
                      f'(from {where}; torch is built with CUDA {cuda})')
    major = _version_tuple(cuda)[0]
    if major not in PIP_TOOLKITS:
        raise SetupError(
            f'{found}, and pip has no CUDA {major} nvcc (nvidia-cuda-nvcc-cu{major} holds '
            f'ptxas and NVVM only) to build mmcv\'s CUDA ops with: install a CUDA {major} '
            f'toolkit and set CUDA_HOME to it (NVIDIA\'s installer, conda install -c nvidia '
            f'cuda-nvcc={cuda}, or a cluster\'s module load cuda/{major}), or set up with the '
            'pinned CUDA 13.0 torch (TORCH_CUDA unset; NVIDIA driver >= 580), whose '
            'toolkit pip has')
    return None, (f'{found}: mmcv\'s CUDA ops are built with pip\'s CUDA {cuda} toolkit '
                  '(tools/build_mmcv_cuda.sh)' + (' instead' if release else ''))


# ----------------------------------------------------------------------------------------
# Build resources: compile jobs and ninja

def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _cgroup_dirs(root: str, controller: str) -> List[str]:
    """Where this process's cgroup files for a v1 ``controller`` (or v2: '') may be, most
    specific first: its own cgroup's folder, then the hierarchy's root (what a container
    sees as its own)."""
    relative = '/'
    for line in (_read('/proc/self/cgroup') or '').splitlines():
        _, controllers, path = line.split(':', 2)
        if (controller in controllers.split(',')) if controller else controllers == '':
            relative = path
    if not controller:
        bases = [root]
    else:  # v1 mounts cpu as cpu or cpu,cpuacct
        names = [controller] + (['cpu,cpuacct'] if controller == 'cpu' else [])
        bases = [os.path.join(root, name) for name in names
                 if os.path.isdir(os.path.join(root, name))]
    return [folder for base in bases
            for folder in (os.path.join(base, relative.lstrip('/')), base)]


def usable_cores(cgroup_root: str = '/sys/fs/cgroup') -> int:
    """The cores this process may use: its CPU affinity (not the host's count, which nproc
    reports in some containers), capped by a cgroup CPU quota."""
    cores = len(os.sched_getaffinity(0))
    quota = None
    for folder in _cgroup_dirs(cgroup_root, ''):
        text = _read(os.path.join(folder, 'cpu.max'))  # v2: "quota period" or "max period"
        if text:
            limit, period = text.split()[:2]
            quota = None if limit == 'max' else int(limit) / int(period)
            break
    else:
        for folder in _cgroup_dirs(cgroup_root, 'cpu'):
            limit = _read(os.path.join(folder, 'cpu.cfs_quota_us'))  # v1: -1 for none
            period = _read(os.path.join(folder, 'cpu.cfs_period_us'))
            if limit and period:
                quota = None if int(limit) <= 0 else int(limit) / int(period)
                break
    if quota is not None:
        cores = min(cores, max(1, int(quota + 0.5)))
    return cores


def _cgroup_memory_room(cgroup_root: str) -> Optional[int]:
    """Bytes left under this process's cgroup memory limit, its reclaimable page cache
    counted as free; None without a limit."""
    for folders, limit_file, usage_file, cache_key in (
            (_cgroup_dirs(cgroup_root, ''), 'memory.max', 'memory.current', 'inactive_file'),
            (_cgroup_dirs(cgroup_root, 'memory'), 'memory.limit_in_bytes',
             'memory.usage_in_bytes', 'total_inactive_file')):
        for folder in folders:
            limit = _read(os.path.join(folder, limit_file))
            usage = _read(os.path.join(folder, usage_file))
            if not limit or not usage:
                continue
            # v2 writes "max" and v1 a number near 2**63 for no limit (here; a folder
            # above may still set one)
            if limit == 'max' or int(limit) >= 1 << 60:
                continue
            stat = _read(os.path.join(folder, 'memory.stat')) or ''
            cache = re.search(rf'^{cache_key} (\d+)$', stat, re.M)
            return int(limit) - int(usage) + (int(cache.group(1)) if cache else 0)
    return None


def available_memory(meminfo: str = '/proc/meminfo',
                     cgroup_root: str = '/sys/fs/cgroup') -> Optional[int]:
    """Bytes a build may still take: the machine's MemAvailable, capped by the room left
    under a cgroup memory limit; None where neither is known."""
    known = []
    found = re.search(r'^MemAvailable:\s+(\d+) kB', _read(meminfo) or '', re.M)
    if found:
        known.append(int(found.group(1)) * 1024)
    room = _cgroup_memory_room(cgroup_root)
    if room is not None:
        known.append(room)
    return max(0, min(known)) if known else None


def build_jobs(cuda: bool, meminfo: str = '/proc/meminfo',
               cgroup_root: str = '/sys/fs/cgroup') -> Tuple[int, str]:
    """MAX_JOBS for a build (where MAX_JOBS is not set): one job per usable core, and no
    more than the free memory holds (``JOB_MEMORY``: nvcc takes 2-4 GB a job). With the
    reason, for the log."""
    if os.environ.get('MAX_JOBS', '').strip().isdigit() and int(os.environ['MAX_JOBS']) > 0:
        return int(os.environ['MAX_JOBS']), 'MAX_JOBS set'
    cores = usable_cores(cgroup_root)
    memory = available_memory(meminfo, cgroup_root)
    per_job = JOB_MEMORY['cuda' if cuda else 'cpu']
    if memory is None:
        return cores, f'{cores} usable core(s)'
    jobs = max(1, min(cores, memory // per_job))
    return jobs, (f'{cores} usable core(s), {memory / GIB:.1f} GiB free at '
                  f'{per_job / GIB:g} GiB a {"nvcc" if cuda else "C++"} job')


def tool_path(path: Optional[str] = None) -> str:
    """PATH (default: this process's) with this interpreter's folder first: a virtual
    environment's bin/ holds the ninja the set-up installed, and is on PATH only while the
    environment is activated; torch's extension builder looks for ninja only on PATH
    (without it, it compiles one file at a time, or not at all)."""
    path = os.environ.get('PATH', '') if path is None else path
    here = os.path.dirname(sys.executable) if sys.executable else ''
    parts = [p for p in path.split(os.pathsep) if p]
    if not here or (parts and os.path.abspath(parts[0]) == os.path.abspath(here)):
        return path
    return os.pathsep.join([here] + [p for p in parts
                                     if os.path.abspath(p) != os.path.abspath(here)])


@contextmanager
def tools_on_path() -> Iterator[str]:
    """Within the block, PATH is ``tool_path()`` (for a build in this process); yields
    where ninja is, '' where there is none."""
    previous = os.environ.get('PATH')
    os.environ['PATH'] = tool_path()
    try:
        yield shutil.which('ninja') or ''
    finally:
        if previous is None:
            del os.environ['PATH']
        else:
            os.environ['PATH'] = previous


def build_environment(cuda: bool) -> Tuple[Dict[str, str], str]:
    """PATH and MAX_JOBS for a build started by this interpreter, and a line for the log."""
    path = tool_path()
    jobs, why = build_jobs(cuda)
    ninja = shutil.which('ninja', path=path)
    note = (f'{jobs} compile job(s) ({why}); ' +
            (f'ninja: {ninja}' if ninja else 'no ninja beside python nor on PATH: files '
             'compile one at a time (pip install ninja)'))
    return {'PATH': path, 'MAX_JOBS': str(jobs)}, note


def mmcv_build_plan(mmcv_version: str) -> Dict[str, str]:
    """What mmcv's wheel is built for and where it is cached: MMCV_CUDA (1: with its
    CUDA ops, where nvidia-smi lists a GPU or FORCE_CUDA=1; FORCE_CUDA=0 or a hidden GPU:
    CPU ops only), TORCH_CUDA_ARCH_LIST (given, else the GPUs', else DEFAULT_CUDA_ARCHS),
    MMCV_DEVICE, and WHEELS: the cache folder, named by Python, torch build and device, so
    a wheel is only ever installed for the torch and device it was built for."""
    force = os.environ.get('FORCE_CUDA', '')
    cuda = force == '1' or (force != '0' and not gpu_hidden() and nvidia_smi_gpus() > 0)
    plan = {'MMCV_CUDA': '1' if cuda else '0'}
    if cuda:
        if torch.version.cuda is None:
            raise SetupError(f'torch {torch.__version__} is a CPU-only build: mmcv\'s CUDA '
                             'ops need a CUDA build (unset TORCH_CUDA, or FORCE_CUDA=0 for '
                             'CPU ops only)')
        archs = os.environ.get('TORCH_CUDA_ARCH_LIST', '').strip()
        if not archs:
            archs = ';'.join(gpu_archs()) if torch.cuda.is_available() else ''
        archs = archs or DEFAULT_CUDA_ARCHS
        plan['TORCH_CUDA_ARCH_LIST'] = archs
        plan['MMCV_DEVICE'] = f'cuda{torch.version.cuda}-sm{re.sub(r"[;. +]", "_", archs)}'
    else:
        plan['MMCV_DEVICE'] = 'cpu'
    cache = os.environ.get('MMREPVGG_WHEEL_CACHE') or os.path.join(
        os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache'),
        'mmrepvgg', 'wheels')
    python = f'py{sys.version_info[0]}{sys.version_info[1]}'
    plan['WHEELS'] = os.path.join(cache, f'mmcv-{mmcv_version}-{python}-torch'
                                         f'{torch_build_id()}-{plan["MMCV_DEVICE"]}')
    return plan


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


def environment_checks(want_cuda: Optional[bool] = None) -> List[Check]:
    """The verdicts a user needs before a long run. ``want_cuda``: True requires a usable
    GPU, False checks the CPU only, None (default) checks a GPU where one is present.
    (Whether the C++ Winograd op builds is ``mmrepvgg.ops.winograd_kernel.winograd_check``:
    the op's loader stands on this module.)"""
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
    return checks


def setup_decisions(wanted: str, default: str, mmcv_version: str) -> Dict[str, str]:
    """tools/bootstrap.sh's decisions once torch is installed, in the order they are
    taken: TORCH_MISMATCH (torch is not the build TORCH_CUDA asks for: reinstall it and
    ask again), else STOP (why the set-up cannot go on: GPUs torch cannot use, no toolkit
    to be had; it stops before building anything), else mmcv's plan (``mmcv_build_plan``)
    with MMCV_WHEEL (the cached wheel, empty: to build) and, for a CUDA build, CUDA_HOME
    (empty: pip's toolkit) and TOOLKIT_NOTE."""
    try:
        mismatch = torch_build_mismatch(wanted, default)
        if mismatch:
            return {'TORCH_MISMATCH': mismatch}
        problem = setup_gpu_problem()
        if problem:
            return {'STOP': problem}
        plan = mmcv_build_plan(mmcv_version)
        wheels = sorted(glob.glob(os.path.join(glob.escape(plan['WHEELS']),
                                               f'mmcv-{mmcv_version}-*.whl')))
        plan['MMCV_WHEEL'] = wheels[0] if wheels else ''
        if not wheels and plan['MMCV_CUDA'] == '1':
            home, note = cuda_toolkit_choice()
            plan.update(CUDA_HOME=home or '', TOOLKIT_NOTE=note)
    except SetupError as err:
        return {'STOP': str(err)}
    return plan


def _shell(values: Dict[str, str]) -> str:
    return ''.join(f'{key}={shlex.quote(value)}\n' for key, value in values.items())


def main(argv: Optional[List[str]] = None) -> int:
    """The set-up's decisions as shell assignments, for the scripts
    (``python mmrepvgg/env.py COMMAND``):

    set-up WANTED DEFAULT VERSION   ``setup_decisions`` (tools/bootstrap.sh)
    mmcv-plan VERSION               ``mmcv_build_plan``
    cuda-toolkit                    CUDA_HOME (empty: pip's) and TOOLKIT_NOTE
    build-env [--cuda]              PATH, MAX_JOBS and BUILD_NOTE for a build

    Exits 2 with the reason on stderr where a decision cannot be taken."""
    args = sys.argv[1:] if argv is None else argv
    command, rest = (args[0], args[1:]) if args else ('', [])
    try:
        if command == 'set-up' and len(rest) == 3:
            values = setup_decisions(*rest)
        elif command == 'mmcv-plan' and len(rest) == 1:
            values = mmcv_build_plan(rest[0])
        elif command == 'cuda-toolkit' and not rest:
            home, note = cuda_toolkit_choice()
            values = {'CUDA_HOME': home or '', 'TOOLKIT_NOTE': note}
        elif command == 'build-env' and rest in ([], ['--cuda']):
            values, note = build_environment(cuda=bool(rest))
            values = dict(values, BUILD_NOTE=note)
        else:
            print(main.__doc__, file=sys.stderr)
            return 2
    except SetupError as err:
        print(err, file=sys.stderr)
        return 2
    print(_shell(values), end='')
    return 0


if __name__ == '__main__':
    sys.exit(main())
