"""tools/dist_*.sh and tools/slurm_*.sh on a machine where nothing is activated: they run
the repository's .venv python (python3 with a message when there is none), and under
slurm every task of a job agrees on a rendezvous port derived from the job (two jobs on
one node get two ports) while the first task records its node's environment.

Nothing here needs a GPU or slurm: the scripts are copied into a folder of their own
beside a fake .venv/bin/python, and a fake ``srun`` on PATH records its arguments and
runs the task command once per task, with the SLURM_* variables a real one sets. Both
fakes append one JSON line per call to a log."""
import json
import os
import os.path as osp
import shutil
import subprocess
import sys

import pytest

from helpers import FAKE_SRUN, ROOT, write_executable

BASH = shutil.which('bash')
SCRIPTS = ('dist_run.sh', 'dist_train.sh', 'dist_test.sh', 'slurm_run.sh',
           'slurm_train.sh', 'slurm_test.sh', 'find_python.sh')

# A Python that records how it was called (argv, and what a task's environment says)
FAKE_PYTHON = f"""#!{sys.executable}
import json, os, sys
with open(os.environ['FAKE_LOG'], 'a') as f:
    f.write(json.dumps(dict(tool=sys.argv[0], argv=sys.argv[1:],
        env={{k: os.environ.get(k) for k in ('MASTER_PORT', 'SLURM_PROCID',
                                            'RECORD_ENV')}})) + '\\n')
"""


@pytest.fixture
def repo(tmp_path):
    """A checkout's tools/ with a fake .venv python, a PATH of fakes and system folders
    (no venv, no activated environment), and the log the fakes write."""
    root = tmp_path / 'repo'
    (root / 'tools').mkdir(parents=True)
    for name in SCRIPTS:
        shutil.copy(osp.join(ROOT, 'tools', name), root / 'tools' / name)
    write_executable(root / '.venv' / 'bin' / 'python', FAKE_PYTHON)
    bin_dir = tmp_path / 'bin'
    write_executable(bin_dir / 'srun', FAKE_SRUN)
    write_executable(bin_dir / 'python3', FAKE_PYTHON)  # the fallback, when there is no venv
    log = tmp_path / 'calls.jsonl'
    env = {k: v for k, v in os.environ.items()
           if k not in ('PYTHON', 'MASTER_PORT', 'VIRTUAL_ENV', 'PORT', 'RECORD_ENV')}
    env.update(PATH=f'{bin_dir}:/usr/bin:/bin', FAKE_LOG=str(log))

    def run(script, *args, **extra):
        proc = subprocess.run([BASH, str(root / 'tools' / script), *map(str, args)],
                              env=dict(env, **extra), capture_output=True, text=True,
                              timeout=60)
        calls = ([json.loads(line) for line in log.read_text().splitlines()]
                 if log.exists() else [])
        log.unlink(missing_ok=True)
        return proc, calls

    return root, run


@pytest.mark.parametrize('script, args, tool', [
    ('dist_train.sh', ['cfg.py', '2', '--amp'], ['train.py', 'cfg.py', '--amp']),
    ('dist_test.sh', ['cfg.py', 'c.pth', '2', '--deploy'],
     ['test.py', 'cfg.py', 'c.pth', '--deploy'])])
def test_dist_scripts_run_the_venv_python(repo, script, args, tool):
    root, run = repo
    proc, calls = run(script, *args)
    assert proc.returncode == 0 and proc.stderr == '', proc.stderr
    (call,) = calls
    assert call['tool'] == str(root / '.venv' / 'bin' / 'python')
    assert call['argv'][:2] == ['-m', 'torch.distributed.run']
    assert '--nproc_per_node=2' in call['argv'] and '--master_port=29500' in call['argv']
    start = call['argv'].index(str(root / 'tools' / tool[0]))
    assert call['argv'][start + 1:] == tool[1:] + ['--launcher', 'pytorch']


def test_without_a_venv_python3_is_used_and_said(repo, tmp_path):
    root, run = repo
    shutil.rmtree(root / '.venv')
    for script, args in (('dist_train.sh', ['cfg.py', '1']),
                         ('slurm_train.sh', ['gpu', 'job', 'cfg.py'])):
        proc, calls = run(script, *args, GPUS='1')
        assert proc.returncode == 0, proc.stderr
        assert f'no {root}/.venv/bin/python (make setup creates it); using ' in proc.stderr
        assert f'{tmp_path}/bin/python3. Set PYTHON=' in proc.stderr
        assert calls[-1]['tool'] == str(tmp_path / 'bin' / 'python3')
    # and no python3 either (a PATH with bash and dirname only): what to do, not a shell
    # error
    (tmp_path / 'coreutils').mkdir()
    for tool in ('bash', 'dirname'):
        os.symlink(shutil.which(tool), tmp_path / 'coreutils' / tool)
    proc, _ = run('dist_train.sh', 'cfg.py', '1', PATH=str(tmp_path / 'coreutils'))
    assert proc.returncode == 1
    assert 'no python3 on PATH: run make setup, or set PYTHON=' in proc.stderr


def test_python_given_is_used(repo, tmp_path):
    root, run = repo
    mine = write_executable(tmp_path / 'mine' / 'bin' / 'python', FAKE_PYTHON)
    proc, calls = run('dist_train.sh', 'cfg.py', '1', PYTHON=str(mine))
    assert proc.returncode == 0 and proc.stderr == ''
    assert [c['tool'] for c in calls] == [str(mine)]
    assert calls[0]['argv'][:2] == ['-m', 'torch.distributed.run']


def test_slurm_tasks_share_a_port_of_their_job_and_the_first_records(repo, tmp_path):
    root, run = repo
    record = tmp_path / 'train' / 'environment.json'
    proc, calls = run('slurm_train.sh', 'gpu', 'exp-train', 'cfg.py', '--resume',
                      GPUS='2', RECORD_ENV=str(record), FAKE_JOB_ID='4242')
    assert proc.returncode == 0, proc.stderr
    srun, *tasks = calls
    assert srun['options'] == {'-p': 'gpu', '--job-name': 'exp-train', '--gres': 'gpu:2',
                               '--ntasks': '2', '--ntasks-per-node': '2',
                               '--cpus-per-task': '5', '--kill-on-bad-exit': '1'}
    # rank 0 records its node first, then every rank runs the tool with the same port
    venv = str(root / '.venv' / 'bin' / 'python')
    assert [(c['tool'], c['env']['SLURM_PROCID']) for c in tasks] == [
        (venv, '0'), (venv, '0'), (venv, '1')]
    assert tasks[0]['argv'] == ['-m', 'mmrepvgg.reproduce.preflight', '--record', str(record)]
    for task in tasks[1:]:
        assert task['argv'] == ['-u', str(root / 'tools' / 'train.py'), 'cfg.py',
                                '--resume', '--launcher', 'slurm']
    ports = {c['env']['MASTER_PORT'] for c in tasks}
    assert ports == {str(10000 + 4242 % 2000 * 10)}

    # another job on the node: another port; a port the user set: that one
    _, calls = run('slurm_train.sh', 'gpu', 'exp-train', 'cfg.py', GPUS='2',
                   FAKE_JOB_ID='4243')
    assert {c['env']['MASTER_PORT'] for c in calls[1:]} == {str(10000 + 4243 % 2000 * 10)}
    assert [c['argv'][0] for c in calls[1:]] == ['-u', '-u']  # no record asked for
    _, calls = run('slurm_test.sh', 'gpu', 'exp-test', 'cfg.py', 'c.pth', GPUS='1',
                   MASTER_PORT='23456')
    assert [c['env']['MASTER_PORT'] for c in calls[1:]] == ['23456']
    assert calls[1]['argv'][1:3] == [str(root / 'tools' / 'test.py'), 'cfg.py']


def test_slurm_record_failure_does_not_stop_the_training(repo, tmp_path):
    root, run = repo
    # a python whose record fails (e.g. the work dir not writable from the node)
    write_executable(root / '.venv' / 'bin' / 'python', FAKE_PYTHON + (
        "if sys.argv[1:3] == ['-m', 'mmrepvgg.reproduce.preflight']:\n    sys.exit(1)\n"))
    proc, calls = run('slurm_train.sh', 'gpu', 'job', 'cfg.py', GPUS='1',
                      RECORD_ENV=str(tmp_path / 'nowhere' / 'environment.json'))
    assert proc.returncode == 0
    assert "could not write this node's environment to" in proc.stderr
    assert calls[-1]['argv'][:2] == ['-u', str(root / 'tools' / 'train.py')]
