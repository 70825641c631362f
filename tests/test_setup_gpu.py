"""The set-up on machines these tests do not run on, simulated: GPUs with a driver older
than torch's CUDA, a CUDA toolkit of another version, no system ninja, containers with
fewer cores or less memory than the host. Fake ``nvidia-smi`` / ``nvcc`` executables go
first on PATH (a PATH without the system's tools where it matters), ``torch.cuda`` is
monkeypatched (in this process, or through a sitecustomize in the processes
tools/bootstrap.sh starts), and tools/bootstrap.sh runs against a stand-in .venv whose
python records pip calls instead of running them. Nothing here needs a GPU or the network,
and the fakes win on a machine that has a GPU."""
import os
import os.path as osp
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils import cpp_extension

from mmrepvgg import env
from mmrepvgg.ops import winograd_kernel

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
VENV_BIN = osp.dirname(sys.executable)
#: What the scripts under test run besides python: linked into a bin folder that stands
#: for a PATH without the system's ninja, nvcc and nvidia-smi.
TOOLS = ('bash', 'sh', 'env', 'cat', 'cp', 'mv', 'rm', 'ln', 'mkdir', 'mktemp', 'touch',
         'ls', 'head', 'tail', 'cut', 'tr', 'sed', 'grep', 'find', 'du', 'sha1sum',
         'dirname', 'basename', 'readlink', 'realpath', 'tar', 'gzip', 'uname')


def executable(path, text):
    os.makedirs(osp.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
        f.write(text)
    os.chmod(path, 0o755)
    return path


@pytest.fixture
def bare_bin(tmp_path):
    """A bin folder with the basic tools but no ninja, nvcc or nvidia-smi."""
    folder = tmp_path / 'bare-bin'
    folder.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        if found:
            os.symlink(found, folder / tool)
    return str(folder)


def fake_nvidia_smi(folder, gpus=8, driver='535.104.05'):
    """nvidia-smi of a machine with ``gpus`` H100s and the given driver."""
    lines = ' '.join(f"'GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08d})'"
                     for i in range(gpus))
    return executable(osp.join(folder, 'nvidia-smi'), textwrap.dedent('''\
        #!/bin/sh
        case "$*" in
          *-L*) printf '%s\\n' LINES ;;
          *driver_version*) for gpu in LINES; do echo DRIVER; done ;;
          *) echo 'NVIDIA-SMI DRIVER  Driver Version: DRIVER' ;;
        esac
        ''').replace('LINES', lines).replace('DRIVER', driver))


def fake_nvcc(toolkit, release, top=None):
    """``toolkit``/bin/nvcc reporting CUDA ``release``; with ``top``, a wrapper script that
    reports that toolkit as its own when asked (as /usr/local/bin/nvcc wrappers do)."""
    verbose = f'echo "#\\$ TOP={top}/bin/.." >&2' if top else 'exit 1'
    return executable(osp.join(toolkit, 'bin', 'nvcc'), textwrap.dedent(f'''\
        #!/bin/sh
        case "$1" in
          --version) echo 'nvcc: NVIDIA (R) Cuda compiler driver'
                     echo 'Cuda compilation tools, release {release}, V{release}.99' ;;
          -v) {verbose} ;;
          *) exit 1 ;;
        esac
        '''))


@pytest.fixture
def old_driver_gpus(monkeypatch, tmp_path):
    """8 GPUs that NVML counts and nvidia-smi lists with a 535 driver, on which torch's
    CUDA 13 runtime does not start."""
    fakes = tmp_path / 'fake-bin'
    fake_nvidia_smi(str(fakes))
    monkeypatch.setenv('PATH', f'{fakes}{os.pathsep}{os.environ["PATH"]}')
    monkeypatch.delenv('CUDA_VISIBLE_DEVICES', raising=False)
    monkeypatch.setattr(env, 'DEVICE_FILES', str(tmp_path / 'dev' / 'nvidia[0-9]*'))
    monkeypatch.setattr(torch.version, 'cuda', '13.0')
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 8)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)

    def no_runtime(*args, **kwargs):
        raise RuntimeError('The NVIDIA driver on your system is too old (found version 12020)')
    monkeypatch.setattr(torch.cuda, 'get_device_capability', no_runtime)
    monkeypatch.setattr(torch.cuda, 'init', no_runtime)


# ----------------------------------------------------------------------------------------
# In this process: the decisions of mmrepvgg/env.py

def test_the_set_up_stops_on_gpus_whose_driver_is_older_than_torchs_cuda(old_driver_gpus):
    problem = env.setup_gpu_problem()
    assert problem.startswith('nvidia-smi lists 8 GPU(s), driver 535.104.05; ')
    assert 'needs an NVIDIA driver >= 580.65.06, the driver is 535.104.05' in problem
    assert 'TORCH_CUDA=cu128' in problem and 'CUDA_VISIBLE_DEVICES= make setup' in problem


def test_the_set_up_goes_on_with_usable_hidden_or_no_gpus(old_driver_gpus, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_device_capability',
                        lambda i: (9, 0) if i < 4 else (8, 0))
    assert env.setup_gpu_problem() is None
    assert env.gpu_archs() == ['8.0', '9.0']
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '')  # the CPU on purpose
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert env.setup_gpu_problem() is None
    monkeypatch.delenv('CUDA_VISIBLE_DEVICES')
    monkeypatch.setenv('PATH', '/nonexistent')  # no nvidia-smi, no device files: no GPU
    assert env.setup_gpu_problem() is None


def test_the_set_up_stops_where_the_runtime_refuses_gpus_it_counts(old_driver_gpus,
                                                                   monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    problem = env.setup_gpu_problem()
    assert 'counts 8 GPU(s) but cannot query them (The NVIDIA driver on your system is ' \
        'too old' in problem


def test_the_installed_torch_is_checked_against_the_build_asked_for(monkeypatch):
    monkeypatch.setattr(torch.version, 'cuda', '13.0')
    assert env.torch_flavour() == 'cu130'
    assert env.torch_build_mismatch('', 'cu130') is None
    assert env.torch_build_mismatch('cu130', 'cu130') is None
    assert (env.torch_build_mismatch('cu128', 'cu130') ==
            f'torch {torch.__version__} is the cu130 build; TORCH_CUDA=cu128 asks for cu128')
    assert 'asks for cpu' in env.torch_build_mismatch('cpu', 'cu130')
    monkeypatch.setattr(torch.version, 'cuda', '12.8')  # set up with cu128 before
    assert 'installs the cu130 build' in env.torch_build_mismatch('', 'cu130')
    monkeypatch.setattr(torch.version, 'cuda', None)
    assert env.torch_build_mismatch('cpu', 'cu130') is None
    assert 'is a CPU-only build' in env.torch_build_mismatch('cu126', 'cu130')
    with pytest.raises(env.SetupError, match=r"TORCH_CUDA='cuda12'.*cu128 \(CUDA 12\.8\)"):
        env.torch_build_mismatch('cuda12', 'cu130')


def test_what_is_built_against_torch_is_keyed_by_its_build(monkeypatch, tmp_path):
    """mmcv's wheel cache and the Winograd op's build folder differ per torch build, even
    for builds whose version carries no tag: replacing torch rebuilds both."""
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path / 'ext'))
    monkeypatch.setenv('MMREPVGG_WHEEL_CACHE', str(tmp_path / 'wheels'))
    monkeypatch.setenv('FORCE_CUDA', '0')
    monkeypatch.setattr(torch, '__version__', '2.14.1')
    folders, wheels = [], []
    for cuda in ('13.0', '12.8', None):
        monkeypatch.setattr(torch.version, 'cuda', cuda)
        folders.append(winograd_kernel._build_directory())
        wheels.append(env.mmcv_build_plan('2.1.0')['WHEELS'])
    assert [osp.basename(f).split('_torch')[1].rsplit('_', 1)[0] for f in folders] == \
        ['2.14.1_cu130', '2.14.1_cu128', '2.14.1_cpu']
    assert [osp.basename(w) for w in wheels] == [
        f'mmcv-2.1.0-py{sys.version_info[0]}{sys.version_info[1]}-torch2.14.1+{b}-cpu'
        for b in ('cu130', 'cu128', 'cpu')]
    monkeypatch.setattr(torch, '__version__', '2.14.1+cu126')  # PyTorch's indexes tag it
    assert env.torch_build_id() == '2.14.1+cu126'


def test_mmcv_is_built_for_the_gpus_present_or_the_archs_asked_for(old_driver_gpus,
                                                                   monkeypatch, tmp_path):
    monkeypatch.setenv('MMREPVGG_WHEEL_CACHE', str(tmp_path))
    monkeypatch.delenv('FORCE_CUDA', raising=False)
    monkeypatch.delenv('TORCH_CUDA_ARCH_LIST', raising=False)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda i: (9, 0))
    plan = env.mmcv_build_plan('2.1.0')
    assert (plan['MMCV_CUDA'], plan['TORCH_CUDA_ARCH_LIST'], plan['MMCV_DEVICE']) == \
        ('1', '9.0', 'cuda13.0-sm9_0')
    monkeypatch.setenv('TORCH_CUDA_ARCH_LIST', '8.0;9.0+PTX')
    assert env.mmcv_build_plan('2.1.0')['MMCV_DEVICE'] == 'cuda13.0-sm8_0_9_0_PTX'
    monkeypatch.setenv('FORCE_CUDA', '0')
    assert env.mmcv_build_plan('2.1.0')['MMCV_CUDA'] == '0'
    monkeypatch.setenv('PATH', '/nonexistent')  # no nvidia-smi: CPU ops unless forced
    monkeypatch.delenv('FORCE_CUDA')
    assert env.mmcv_build_plan('2.1.0')['MMCV_DEVICE'] == 'cpu'


@pytest.fixture
def toolkit_search(monkeypatch, tmp_path, bare_bin):
    """No CUDA toolkit anywhere but where a test puts one; torch is a CUDA 13.0 build."""
    monkeypatch.delenv('CUDA_HOME', raising=False)
    monkeypatch.delenv('CUDA_PATH', raising=False)
    monkeypatch.setenv('PATH', bare_bin)
    monkeypatch.setattr(env, 'DEFAULT_CUDA_HOMES', (str(tmp_path / 'usr-local-cuda'),))
    monkeypatch.setattr(torch.version, 'cuda', '13.0')
    return tmp_path


def test_a_toolkit_of_torchs_cuda_version_builds_mmcv(toolkit_search, monkeypatch):
    cuda13 = str(toolkit_search / 'cuda-13.0')
    fake_nvcc(cuda13, '13.0')
    monkeypatch.setenv('PATH', f'{cuda13}/bin{os.pathsep}{os.environ["PATH"]}')
    home, note = env.cuda_toolkit_choice()
    assert home == osp.realpath(cuda13) and 'built with the CUDA 13.0 toolkit' in note
    # a wrapper script on PATH (/usr/local/bin/nvcc): the toolkit is where nvcc says
    wrapper = str(toolkit_search / 'usr-local')
    fake_nvcc(wrapper, '13.0', top=cuda13)
    monkeypatch.setenv('PATH', f'{wrapper}/bin{os.pathsep}{os.environ["PATH"]}')
    assert env.cuda_toolkit_choice()[0] == osp.realpath(cuda13)


def test_another_cuda_version_or_none_builds_with_pips_toolkit(toolkit_search, monkeypatch):
    home, note = env.cuda_toolkit_choice()
    assert home is None
    assert note.startswith('no CUDA toolkit here') and "pip's CUDA 13.0 toolkit" in note
    cuda12 = str(toolkit_search / 'cuda-12.4')
    fake_nvcc(cuda12, '12.4')
    monkeypatch.setenv('CUDA_HOME', cuda12)  # what a cluster's `module load cuda` sets
    home, note = env.cuda_toolkit_choice()
    assert home is None
    assert note == (f'the CUDA toolkit at {cuda12} (from CUDA_HOME) is CUDA 12.4, torch '
                    f'{torch.__version__} is built with CUDA 13.0: mmcv\'s CUDA ops are built '
                    "with pip's CUDA 13.0 toolkit (tools/build_mmcv_cuda.sh) instead")
    monkeypatch.setattr(torch.version, 'cuda', None)
    with pytest.raises(env.SetupError, match='CPU-only build'):
        env.cuda_toolkit_choice()


def test_a_cuda_12_torch_needs_an_installed_cuda_12_toolkit(toolkit_search, monkeypatch):
    """pip's CUDA 12 packages have no nvcc: torch's CUDA 12 builds (TORCH_CUDA=cu128)
    take the installed CUDA 12 toolkit, and without one the set-up stops before building,
    saying what to install."""
    monkeypatch.setattr(torch.version, 'cuda', '12.8')
    cuda12 = str(toolkit_search / 'cuda-12.4')
    fake_nvcc(cuda12, '12.4')
    monkeypatch.setenv('CUDA_HOME', cuda12)
    assert env.cuda_toolkit_choice()[0] == cuda12  # same major version: it builds
    monkeypatch.delenv('CUDA_HOME')
    with pytest.raises(env.SetupError) as refused:
        env.cuda_toolkit_choice()
    assert str(refused.value).startswith(
        'no CUDA toolkit here (no CUDA_HOME, no nvcc on PATH, no '
        f'{toolkit_search}/usr-local-cuda), and pip has no CUDA 12 nvcc '
        '(nvidia-cuda-nvcc-cu12 holds ptxas and NVVM only)')
    assert 'set CUDA_HOME to it' in str(refused.value)
    # the set-up stops on it before building anything, where no wheel is cached
    monkeypatch.setenv('MMREPVGG_WHEEL_CACHE', str(toolkit_search / 'wheels'))
    monkeypatch.setenv('FORCE_CUDA', '1')
    monkeypatch.setenv('TORCH_CUDA_ARCH_LIST', '9.0')
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '')
    assert env.setup_decisions('cu128', 'cu130', '2.1.0') == {'STOP': str(refused.value)}
    plan = env.mmcv_build_plan('2.1.0')
    os.makedirs(plan['WHEELS'])
    wheel = osp.join(plan['WHEELS'], 'mmcv-2.1.0-cp311-cp311-linux_x86_64.whl')
    open(wheel, 'w').close()  # a cached wheel needs no toolkit
    decided = env.setup_decisions('cu128', 'cu130', '2.1.0')
    assert decided['MMCV_WHEEL'] == wheel and 'STOP' not in decided


def _cgroup(root, files):
    for name, text in files.items():
        os.makedirs(osp.dirname(osp.join(root, name)), exist_ok=True)
        with open(osp.join(root, name), 'w') as f:
            f.write(text)


def test_compile_jobs_fit_the_cores_and_the_memory(monkeypatch, tmp_path):
    monkeypatch.delenv('MAX_JOBS', raising=False)
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(16)))
    meminfo = tmp_path / 'meminfo'
    meminfo.write_text(f'MemTotal: {64 << 20} kB\nMemAvailable: {8 << 20} kB\n')
    none = str(tmp_path / 'no-cgroup')
    # 16 cores, 8 GiB free: nvcc jobs take ~3 GiB each, the C++ compiler's 1.5
    assert env.build_jobs(True, str(meminfo), none)[0] == 2
    assert env.build_jobs(False, str(meminfo), none)[0] == 5
    # a cgroup v2 container: 4 CPUs of quota, 4 GiB limit with 3.5 in use of which 1.5 is
    # page cache: 2 GiB of room
    v2 = str(tmp_path / 'v2')
    _cgroup(v2, {'cpu.max': '400000 100000\n', 'memory.max': f'{4 * env.GIB}\n',
                 'memory.current': f'{7 * env.GIB // 2}\n',
                 'memory.stat': f'anon 1\ninactive_file {3 * env.GIB // 2}\n'})
    assert env.usable_cores(v2) == 4
    assert env.available_memory(str(meminfo), v2) == 2 * env.GIB
    jobs, why = env.build_jobs(True, str(meminfo), v2)
    assert jobs == 1 and why == '4 usable core(s), 2.0 GiB free at 3 GiB a nvcc job'
    assert env.build_jobs(False, str(meminfo), v2)[0] == 1
    # cgroup v1: 3 CPUs of quota, no memory limit (a number near 2**63)
    v1 = str(tmp_path / 'v1')
    _cgroup(v1, {'cpu,cpuacct/cpu.cfs_quota_us': '300000\n',
                 'cpu,cpuacct/cpu.cfs_period_us': '100000\n',
                 'memory/memory.limit_in_bytes': '9223372036854771712\n',
                 'memory/memory.usage_in_bytes': '4985475072\n'})
    assert env.build_jobs(False, str(meminfo), v1)[0] == 3
    assert env.available_memory(str(meminfo), v1) == 8 * env.GIB
    monkeypatch.setenv('MAX_JOBS', '7')  # the user's choice stands
    assert env.build_jobs(True, str(meminfo), v2) == (7, 'MAX_JOBS set')


def test_builds_find_the_environments_ninja_without_a_system_one(monkeypatch, bare_bin):
    assert osp.isfile(osp.join(VENV_BIN, 'ninja')), 'the set-up installs ninja into .venv/bin'
    monkeypatch.setenv('PATH', bare_bin)
    assert not cpp_extension.is_ninja_available()  # as torch looks: on PATH only
    assert env.tool_path().split(os.pathsep) == [VENV_BIN, bare_bin]
    with env.tools_on_path() as ninja:
        assert ninja == osp.join(VENV_BIN, 'ninja')
        assert cpp_extension.is_ninja_available()
    assert os.environ['PATH'] == bare_bin
    assert env.tool_path(f'{VENV_BIN}{os.pathsep}/bin') == f'{VENV_BIN}{os.pathsep}/bin'


def test_the_winograd_op_builds_with_the_environments_ninja(monkeypatch, tmp_path, bare_bin):
    """The op's build (first use, or a rebuild at import after its source changed) runs
    torch's builder with ninja found, on a PATH that has none."""
    monkeypatch.setenv('PATH', bare_bin)
    monkeypatch.setenv('TORCH_EXTENSIONS_DIR', str(tmp_path / 'ext'))  # nothing built
    monkeypatch.setattr(winograd_kernel, '_state', dict(loaded=False, error=None))
    seen = {}

    def load(**kwargs):
        seen.update(ninja=cpp_extension.is_ninja_available(), path=os.environ['PATH'],
                    folder=kwargs['build_directory'])
        raise RuntimeError('stopped before compiling')
    monkeypatch.setattr(cpp_extension, 'load', load)
    assert not winograd_kernel.load_kernel()
    assert winograd_kernel.load_error() == 'RuntimeError: stopped before compiling'
    assert seen['ninja'] and seen['path'].split(os.pathsep)[0] == VENV_BIN
    assert seen['folder'].startswith(str(tmp_path / 'ext'))
    assert os.environ['PATH'] == bare_bin


# ----------------------------------------------------------------------------------------
# The scripts: tools/bootstrap.sh against a stand-in .venv, tools/build_mmcv.sh

SITECUSTOMIZE = '''\
"""Makes this process's torch another build or another machine's: FAKE_TORCH_CUDA names a
file holding torch.version.cuda (the version's tag follows, as PyTorch's indexes tag
it); FAKE_GPUS GPUs that NVML counts and the CUDA runtime cannot start on (a driver older
than torch's CUDA)."""
import os
if os.environ.get('FAKE_TORCH_CUDA') or os.environ.get('FAKE_GPUS'):
    import torch
    if os.path.exists(os.environ.get('FAKE_TORCH_CUDA', '')):
        with open(os.environ['FAKE_TORCH_CUDA']) as f:
            torch.version.cuda = f.read().strip() or None
        tag = 'cu' + torch.version.cuda.replace('.', '') if torch.version.cuda else 'cpu'
        torch.__version__ = torch.__version__.split('+')[0] + '+' + tag
    if os.environ.get('FAKE_GPUS'):
        def _no_runtime(*args, **kwargs):
            raise RuntimeError('The NVIDIA driver on your system is too old '
                               '(found version 12020)')
        torch.cuda.device_count = lambda: int(os.environ['FAKE_GPUS'])
        torch.cuda.is_available = lambda: False
        torch.cuda.get_device_capability = torch.cuda.init = _no_runtime
'''


#: The torch the stand-in .venv's processes see (FAKE_TORCH_CUDA: 13.0), whatever this one is.
PINNED = torch.__version__.split('+')[0] + '+cu130'


@pytest.fixture
def stand_in(tmp_path, bare_bin):
    """A checkout whose tools/ and mmrepvgg/ are this one's and whose .venv's python runs
    this environment's, except pip: its calls are recorded in pip.log (one that reinstalls
    torch makes torch the build FAKE_REINSTALLED_CUDA names)."""
    root = tmp_path / 'checkout'
    root.mkdir()
    for name in ('tools', 'mmrepvgg'):
        os.symlink(osp.join(REPO, name), root / name)
    executable(str(root / '.venv' / 'bin' / 'python'), textwrap.dedent(f'''\
        #!/bin/sh
        if [ "$1" = -m ] && [ "$2" = pip ]; then
          shift 2
          echo "$*" >> "{tmp_path}/pip.log"
          case " $* " in *" --force-reinstall "*)
            [ -z "$FAKE_REINSTALLED_CUDA" ] || echo "$FAKE_REINSTALLED_CUDA" > "$FAKE_TORCH_CUDA"
          esac
          exit 0
        fi
        exec "{sys.executable}" "$@"
        '''))
    (tmp_path / 'site').mkdir()
    (tmp_path / 'site' / 'sitecustomize.py').write_text(SITECUSTOMIZE)
    fakes = tmp_path / 'fake-bin'
    fakes.mkdir()
    environ = {k: v for k, v in os.environ.items()
               if k not in ('CUDA_HOME', 'CUDA_PATH', 'CUDA_VISIBLE_DEVICES', 'FORCE_CUDA',
                            'TORCH_CUDA', 'TORCH_CUDA_ARCH_LIST', 'MAX_JOBS', 'PYTHON')}
    environ.update(PATH=f'{fakes}{os.pathsep}{bare_bin}', PYTHONPATH=str(tmp_path / 'site'),
                   MMREPVGG_WHEEL_CACHE=str(tmp_path / 'wheels'),
                   FAKE_TORCH_CUDA=str(tmp_path / 'torch-cuda'))
    (tmp_path / 'torch-cuda').write_text('13.0')  # the pinned build, whatever this one is

    def run(script, **extra):
        out = subprocess.run(['bash', '-c', script], cwd=root, env=dict(environ, **extra),
                             capture_output=True, text=True, timeout=120)
        pip = tmp_path / 'pip.log'
        return out, pip.read_text().splitlines() if pip.exists() else []
    run.root, run.fakes, run.tmp = root, fakes, tmp_path
    return run


def test_bootstrap_stops_before_any_build_on_an_old_driver(stand_in):
    fake_nvidia_smi(str(stand_in.fakes))
    out, pip = stand_in('bash tools/bootstrap.sh', FAKE_GPUS='8')
    assert out.returncode == 1, out.stdout + out.stderr
    assert '[bootstrap] stopped before building anything: nvidia-smi lists 8 GPU(s), ' \
        'driver 535.104.05; this machine has an NVIDIA GPU, but torch ' in out.stderr
    assert 'needs an NVIDIA driver >= 580.65.06, the driver is 535.104.05' in out.stderr
    assert 'Traceback' not in out.stderr and 'FAILED' not in out.stderr
    assert 'build mmcv' not in out.stdout and 'mmengine' not in ' '.join(pip)
    assert not (stand_in.tmp / 'wheels').exists()


def test_bootstrap_replaces_a_torch_of_another_cuda_build(stand_in):
    """TORCH_CUDA=cu128 on a .venv holding the CUDA 13 torch: pip's "already satisfied"
    is not taken for an answer, and every step after torch runs again."""
    out, pip = stand_in(
        'source tools/bootstrap.sh; touch "$VENV/.stamp-base-$STACK_ID" '
        '"$VENV/.stamp-mmcv-cpu-$STACK_ID" "$VENV/.stamp-project-$STACK_ID" '
        '"$VENV/.stamp-mm-0123456789ab"; install_torch; ls -A "$VENV"',
        TORCH_CUDA='cu128', FAKE_REINSTALLED_CUDA='12.8')
    assert out.returncode == 0, out.stdout + out.stderr
    index = '--index-url https://download.pytorch.org/whl/cu128'
    assert pip == [
        '--disable-pip-version-check install -q --force-reinstall --no-deps torch==2.14.1 '
        f'torchvision==0.29.1 {index}',
        f'--disable-pip-version-check install -q torch==2.14.1 torchvision==0.29.1 {index}']
    assert (f'[bootstrap] replace torch and torchvision: torch {PINNED} is the cu130 '
            'build; TORCH_CUDA=cu128 asks for cu128') in out.stdout
    stamps = [line for line in out.stdout.splitlines() if line.startswith('.stamp-')]
    assert len(stamps) == 1 and stamps[0].startswith('.stamp-base-')


def test_bootstrap_says_which_toolkit_builds_mmcv_before_building(stand_in):
    """A CUDA 12.4 toolkit in front of torch's CUDA 13: pip's toolkit, said in one line."""
    fake_nvcc(str(stand_in.tmp / 'cuda-12.4'), '12.4')
    os.symlink(stand_in.tmp / 'cuda-12.4' / 'bin' / 'nvcc', stand_in.fakes / 'nvcc')
    out, pip = stand_in('source tools/bootstrap.sh; decide; check_gpus; '
                        'echo "MMCV_CUDA=$MMCV_CUDA CUDA_HOME=[$CUDA_HOME] WHEEL=[$MMCV_WHEEL]"',
                        FORCE_CUDA='1', TORCH_CUDA_ARCH_LIST='9.0')
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines() == [
        f'[bootstrap] the CUDA toolkit at {stand_in.tmp}/cuda-12.4 (from nvcc on PATH '
        f'({stand_in.fakes}/nvcc)) is CUDA 12.4, torch {PINNED} is built with CUDA 13.0: '
        "mmcv's CUDA ops are built with pip's CUDA 13.0 toolkit "
        '(tools/build_mmcv_cuda.sh) instead',
        'MMCV_CUDA=1 CUDA_HOME=[] WHEEL=[]']
    assert pip == []


FAKE_BUILD_PYTHON = '''\
#!/bin/sh
# pip download writes an mmcv source archive; pip wheel records what the build would run
# with and writes a wheel; anything else runs in this environment's python
if [ "$1" = -m ] && [ "$2" = pip ]; then
  for arg; do last="$arg"; done
  case "$*" in
    *" download "*) mkdir -p "$last/mmcv-2.1.0"
                    echo "flags = ['-std=c++17']" > "$last/mmcv-2.1.0/setup.py"
                    tar -czf "$last/mmcv-2.1.0.tar.gz" -C "$last" mmcv-2.1.0 ;;
    *" wheel "*) { echo "ninja=$(command -v ninja)"; echo "MAX_JOBS=$MAX_JOBS"
                   echo "FORCE_CUDA=$FORCE_CUDA"; grep -c 'c++20' setup.py; } > "$RECORD"
                 mkdir -p "$last" && touch "$last/mmcv-2.1.0-cp311-cp311-linux_x86_64.whl" ;;
  esac
  exit 0
fi
exec "%s" "$@"
'''


def test_build_mmcv_compiles_with_ninja_and_jobs_that_fit(tmp_path, bare_bin):
    python = executable(str(tmp_path / 'venv' / 'bin' / 'python'),
                        FAKE_BUILD_PYTHON % sys.executable)
    record = tmp_path / 'record'
    environ = {k: v for k, v in os.environ.items() if k != 'MAX_JOBS'}
    environ.update(PATH=bare_bin, MMCV_CUDA='1', RECORD=str(record))
    out = subprocess.run(['bash', osp.join(REPO, 'tools', 'build_mmcv.sh'), python, '2.1.0',
                          str(tmp_path / 'out')], env=environ, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    line, = out.stdout.splitlines()
    jobs = int(line.split()[1])
    assert 1 <= jobs <= env.usable_cores()
    assert line.startswith(f'[build_mmcv] {jobs} compile job(s) (') and ' GiB a nvcc job' in line
    assert line.endswith(f'; ninja: {VENV_BIN}/ninja')
    assert record.read_text().splitlines() == [
        f'ninja={VENV_BIN}/ninja', f'MAX_JOBS={jobs}', 'FORCE_CUDA=1', '1']
    assert os.listdir(tmp_path / 'out') == ['mmcv-2.1.0-cp311-cp311-linux_x86_64.whl']
