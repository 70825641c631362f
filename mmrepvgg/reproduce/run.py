"""Reproduction runs (``tools/reproduce.py``): every experiment (a config, and a seed if
asked) goes through train -> test -> deploy -> speed, each step a process of the
project's own tools, and its state is kept in ``DIR/<config stem>/result.json``, so the
same command again skips what is done and resumes an interrupted training."""
import json
import os
import os.path as osp
import shlex
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

from ..apis.config import MINI_NAMES, absent_mini_data, write_mini_data
from ..errors import MachineError, UsageError
from ..fileio import write_text_atomic
from .experiments import DEFAULT_TOLERANCE
from .plan import Plan, plan_experiment, preflight
from .results import (ENVIRONMENT_FILE, environment_summary, git_commit, metrics_line,
                      read_environment, record_environment, write_results)

__all__ = ['STEPS', 'ReproduceOptions', 'reproduce']

STEPS = ('train', 'test', 'deploy', 'speed')


@dataclass
class ReproduceOptions:
    """What ``tools/reproduce.py`` was asked (see its ``--help``)."""
    work_dir: str
    steps: Sequence[str] = STEPS
    gpus: Optional[int] = None
    launcher: str = 'none'
    partition: Optional[str] = None
    gpus_per_node: int = 8
    cpus_per_task: int = 5
    mini: bool = False
    smoke: bool = False
    dry_run: bool = False
    cfg_options: Sequence[str] = ()
    seeds: Sequence[Optional[int]] = (None,)
    scale_lr: bool = False
    force: Sequence[str] = ()
    tolerance: float = DEFAULT_TOLERANCE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _shell(argv: Sequence[str], env: Dict[str, str]) -> str:
    return ' '.join([f'{k}={shlex.quote(v)}' for k, v in env.items()]
                    + [shlex.quote(str(a)) for a in argv])


class Run:
    """One experiment's steps, its ``result.json`` and its console lines."""

    def __init__(self, plan: Plan, options: ReproduceOptions, say: Callable[[str], None],
                 commit: Optional[str], machine: Optional[dict] = None):
        self.plan, self.options, self.say = plan, options, say
        self.path = osp.join(plan.dir, 'result.json')
        self.result = self._read()
        self.commit = commit  # what this invocation runs: recorded with every step it saves
        # the facts of this machine, from the check: the steps a local launcher runs here
        self.machine = machine if plan.launcher != 'slurm' else None
        self.ran: List[str] = []  # steps run in this invocation

    def _step_dir(self, step: str) -> Optional[str]:
        """Where ``step``'s process works, and its machine leaves environment.json."""
        if step == 'train':
            return self.plan.train_dir
        return self.plan.test_dir(step) if step in ('test', 'deploy') else None

    def _environment(self) -> dict:
        """The facts of the machine that trained (as it recorded them), else of the one
        that tested."""
        for step in ('train', 'test', 'deploy'):
            facts = read_environment(self._step_dir(step))
            if facts is not None:
                return environment_summary(self.plan, facts, f'the {step} step\'s machine')
        return environment_summary(self.plan)

    def _read(self) -> dict:
        if osp.isfile(self.path):
            with open(self.path) as f:
                return json.load(f)
        return dict(config=self.plan.config, name=self.plan.name, seed=self.plan.seed,
                    steps={}, metrics={})

    def save(self) -> None:
        if self.options.dry_run:
            return
        self.result.update(config=self.plan.config, commit=self.commit,
                           environment=self._environment())
        os.makedirs(self.plan.dir, exist_ok=True)
        write_text_atomic(self.path, json.dumps(self.result, indent=1, default=str))

    def status(self, step: str) -> Optional[str]:
        return self.result['steps'].get(step, {}).get('status')

    def needed(self, step: str) -> bool:
        """Whether ``step`` runs now: not done, asked again with --force, or fed by a
        training that ran in this invocation."""
        if step in self.options.force or self.status(step) not in ('done', 'skipped'):
            return True
        if step == 'train':
            return not osp.isfile(self.plan.final_checkpoint)
        return 'train' in self.ran

    def command(self, step: str) -> tuple:
        """(argv, extra environment) of ``step``."""
        plan = self.plan
        record = self._record_path(step)
        if step == 'train':
            resume = (osp.isfile(osp.join(plan.train_dir, 'last_checkpoint'))
                      and 'train' not in self.options.force)
            return plan.train_command(resume), plan.launch_env(_free_port(), record)
        if step in ('test', 'deploy'):
            return plan.test_command(step), plan.launch_env(_free_port(), record)
        return plan.speed_commands(), {}

    def _record_path(self, step: str) -> Optional[str]:
        folder = self._step_dir(step)
        return osp.join(folder, ENVIRONMENT_FILE) if folder else None

    def _record_machine(self, step: str) -> None:
        """Leave in ``step``'s work dir the facts of the machine it runs on: this one's,
        checked before the first experiment, for a local launcher; under slurm the first
        task writes its node's (RECORD_ENV), so an older record must not stand in."""
        path = self._record_path(step)
        if path is None:
            return
        if self.machine is not None:
            record_environment(path, dict(self.machine))
        elif osp.isfile(path):
            os.remove(path)

    def run_step(self, step: str) -> bool:
        """Run ``step`` unless done; False when it failed or could not start."""
        plan, say = self.plan, self.say
        if step == 'deploy' and not plan.fusable:
            if self.status(step) != 'skipped':
                self.result['steps'][step] = dict(status='skipped', reason=(
                    'no RepVGG backbone: nothing to fuse, the test metrics stand'))
                self.save()
            say(f'{plan.name}: deploy skipped: no RepVGG backbone, nothing to fuse')
            return True
        if not self.needed(step):
            entry = self.result['steps'][step]
            say(f'{plan.name}: {step} skipped, done before'
                + (f': {metrics_line(self.result["metrics"].get(step))}'
                   if step in ('test', 'deploy') else
                   f' ({entry["outputs"].get("checkpoint", "")})' if step == 'train' else ''))
            return True
        blocker = self._blocked(step)
        if blocker:
            self.result['steps'][step] = dict(status='blocked', reason=blocker)
            self.save()
            say(f'{plan.name}: {step} not run: {blocker}')
            return False
        argv, env = self.command(step)
        log_file = osp.join(plan.dir, f'{step}.log')
        commands = argv if step == 'speed' else [argv]
        if self.options.dry_run:
            for one in commands:
                say(f'{plan.name}: {step}: {_shell(one, env)}')
            return True
        resuming = step == 'train' and '--resume' in argv
        say(f'{plan.name}: {step} started'
            + (f', resuming from {plan.last_checkpoint()}' if resuming else '')
            + f' (log {log_file})')
        self.result['steps'][step] = dict(status='running', log=log_file,
                                          started=time.strftime('%Y-%m-%dT%H:%M:%S'))
        self._record_machine(step)
        self.save()
        start = time.time()
        code = self._execute(commands, env, log_file, append=resuming)
        seconds = round(time.time() - start, 1)
        entry = dict(status='done' if code == 0 else 'failed', seconds=seconds,
                     log=log_file, exit_code=code, outputs={})
        folder = self._step_dir(step)
        machine = read_environment(folder) if folder else None
        if machine is not None:  # where it ran, in brief (the full facts: environment)
            entry['machine'] = dict(host=machine.get('host'), gpu=machine.get('gpu'))
        self.result['steps'][step] = entry
        if code == 0:
            try:
                self._collect(step, entry)
            except (OSError, ValueError, KeyError) as err:
                entry.update(status='failed', reason=str(err))
        self.save()
        self.ran.append(step)
        if entry['status'] != 'done':
            say(f'{plan.name}: {step} FAILED after {seconds:.0f} s'
                + (f' ({entry["reason"]})' if entry.get('reason') else f' (exit {code})')
                + f': read {log_file}')
            return False
        shown = (metrics_line(self.result['metrics'].get(step)) if step in ('test', 'deploy')
                 else entry['outputs'].get('published', '') if step == 'train' else
                 entry['outputs'].get('summary', ''))
        say(f'{plan.name}: {step} done in {seconds:.0f} s: {shown} (log {log_file})')
        return True

    def _blocked(self, step: str) -> Optional[str]:
        if step in ('test', 'deploy') and not osp.isfile(self.plan.final_checkpoint) \
                and not self.options.dry_run:
            return f'no trained checkpoint ({self.plan.final_checkpoint}); train first'
        return None

    def _execute(self, commands: Sequence[Sequence[str]], env: Dict[str, str],
                 log_file: str, append: bool) -> int:
        os.makedirs(osp.dirname(log_file), exist_ok=True)
        with open(log_file, 'a' if append else 'w') as log:
            for argv in commands:
                log.write(f'$ {_shell(argv, env)}\n')
                log.flush()
                code = subprocess.call(list(map(str, argv)), stdout=log,
                                       stderr=subprocess.STDOUT, cwd=os.getcwd(),
                                       env=dict(os.environ, **env))
                if code:
                    return code
        return 0

    def _collect(self, step: str, entry: dict) -> None:
        plan = self.plan
        if step == 'train':
            if not osp.isfile(plan.final_checkpoint):
                raise ValueError(f'training ended without {plan.final_checkpoint}')
            entry['outputs'] = dict(checkpoint=plan.final_checkpoint,
                                    published=plan.publish(),
                                    learning_rate=plan.learning_rate)
        elif step in ('test', 'deploy'):
            work = plan.test_dir(step)
            self.result['metrics'][step] = plan.read_metrics(work)
            entry['outputs'] = dict(work_dir=work)
        else:
            speed = plan.read_speed()
            self.result['speed'] = speed
            entry['outputs'] = dict(files=speed['files'], summary=speed['summary'])


def _write_mini_data(plans: Sequence[Plan], dry_run: bool,
                     say: Callable[[str], None]) -> None:
    """The synthetic data of ``--mini`` written where absent, before anything checks it
    (the steps' own tools then find it); a dry run says what it would write."""
    said = set()
    for plan in plans:
        if not dry_run:
            write_mini_data(plan.cfg, say)
            continue
        for layout, root in absent_mini_data(plan.cfg):
            if root not in said:
                said.add(root)
                say(f'--mini: would write the synthetic mini {MINI_NAMES[layout]} to '
                    f'{osp.abspath(root)}')


def reproduce(configs: Sequence[str], options: ReproduceOptions,
              say: Callable[[str], None] = print) -> int:
    """Run (or with ``dry_run`` print) every step of every experiment; write the tables
    after each step. Returns the number of experiments with a failed or blocked step."""
    prefix = '[dry-run] ' if options.dry_run else '[reproduce] '
    shout = lambda msg: say(prefix + msg)  # noqa: E731
    plans = [plan_experiment(config, seed, options) for config in configs
             for seed in options.seeds]
    names = [p.name for p in plans]
    if len(set(names)) != len(names):
        raise UsageError('two experiments share a name (the config file stem): '
                         + ', '.join(sorted({n for n in names if names.count(n) > 1})))
    if options.mini:
        _write_mini_data(plans, options.dry_run, shout)
    problems, machine = preflight(plans, options, shout)
    for problem in problems:
        shout(f'check failed: {problem}')
    if problems and not options.dry_run:
        raise MachineError(f'{len(problems)} check(s) failed before any training; nothing '
                         'was run')
    commit = None if options.dry_run else git_commit()
    runs = [Run(plan, options, shout, commit, machine) for plan in plans]
    failed = set()
    for run in runs:
        for step in STEPS:
            if step not in options.steps:
                continue
            if not run.run_step(step):
                failed.add(run.plan.name)
                if step == 'train':
                    break  # nothing to test; the other experiments go on
            if not options.dry_run:
                write_results(options.work_dir, [r.result for r in runs], [r.plan for r in runs],
                              options.tolerance)
    if not options.dry_run:
        write_results(options.work_dir, [r.result for r in runs], [r.plan for r in runs],
                      options.tolerance)
        shout(f'tables: {osp.join(options.work_dir, "results.md")} and results.json')
    if failed:
        shout(f'{len(failed)} experiment(s) failed: {", ".join(sorted(failed))}')
    return len(failed)
