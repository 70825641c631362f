"""What one reproduction experiment runs: its folder, the options its tools get, the
commands of each step under the chosen launcher (one process, torchrun, or srun), where
its final checkpoint lands, and how the outputs of its steps are read back."""
import argparse
import glob
import json
import os
import os.path as osp
import shlex
import shutil
import subprocess
import sys
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from mmengine.config import Config, DictAction

from ..apis.config import (absent_mini_data, bundled_folder, load_config, resolve_config,
                           scope_of)
from ..checkpoint.publish import publish_checkpoint
from ..deploy.export import config_input_shape
from ..errors import InputError, UsageError
from .experiments import config_stem
from .preflight import CHECK_MARK, data_problems, weight_problems, weight_urls

__all__ = ['Plan', 'plan_experiment', 'preflight', 'check_command', 'check_environment',
           'parse_cfg_options', 'tools_folder']

_TIME_KEYS = ('time', 'data_time', 'step', 'iter', 'epoch')


def tools_folder() -> str:
    """The tools each step runs: the package's (``.mim/tools`` of an installed package,
    the repository's ``tools/`` in a checkout)."""
    return bundled_folder('tools')


def parse_cfg_options(pairs: Sequence[str]) -> Optional[dict]:
    """``key=value`` strings as mmengine's ``DictAction`` reads them on a command line."""
    if not pairs:
        return None
    namespace = argparse.Namespace()
    DictAction(option_strings=[], dest='options')(None, namespace, list(pairs))
    return namespace.options


def _smoke_options(cfg: Config) -> List[str]:
    """A few iterations of training with a checkpoint after each, and a few test images."""
    loop = cfg.train_cfg
    if 'max_iters' in loop:
        train = ['train_cfg.max_iters=2', 'train_cfg.val_interval=2',
                 'default_hooks.checkpoint.by_epoch=False']
    else:  # epoch-based: one epoch over the first four images
        train = ['train_cfg.max_epochs=1', 'train_cfg.val_interval=1',
                 'train_dataloader.dataset.indices=4']
    test = ['test_dataloader.dataset.indices=4']
    # every box kept: a detector two iterations old still gives the evaluator something
    heads = cfg.model.get('test_cfg') or {}
    if 'score_thr' in heads:
        test.append('model.test_cfg.score_thr=0.0')
    if 'score_thr' in (heads.get('rcnn') or {}):
        test.append('model.test_cfg.rcnn.score_thr=0.0')
    return train + test + ['default_hooks.checkpoint.interval=1',
                           'default_hooks.checkpoint.max_keep_ckpts=3',
                           'default_hooks.logger.interval=1']


class Plan:
    """The fixed facts of one experiment, read from its config once."""

    def __init__(self, config: str, seed: Optional[int], options):
        self.config, self.seed, self.options = osp.abspath(config), seed, options
        self.stem = config_stem(config)
        self.name = self.stem if seed is None else f'{self.stem}@seed{seed}'
        self.dir = osp.join(options.work_dir, self.stem if seed is None else
                            osp.join(self.stem, f'seed{seed}'))
        self.train_dir = osp.join(self.dir, 'train')
        # --mini's data is written by reproduce() itself, which says so in its own lines
        cfg = load_config(config, cfg_options=parse_cfg_options(options.cfg_options),
                          mini=options.mini, write_mini=False)
        extra = _smoke_options(cfg) if options.smoke else []
        if seed is not None:
            extra.append(f'randomness.seed={seed}')
        self.scope = scope_of(cfg)
        # GPUs: this machine's, or those asked for (a slurm job's nodes, not the login node)
        self.cuda = not options.mini and (torch.cuda.is_available() or bool(options.gpus)
                                          or options.launcher == 'slurm')
        self.per_gpu = int(cfg.train_dataloader.batch_size)
        base = (cfg.get('auto_scale_lr') or {}).get('base_batch_size')
        config_gpus = max(1, base // self.per_gpu) if base else None
        self.procs = options.gpus or (config_gpus if self.cuda and config_gpus else 1)
        # SyncBN (the segmentation configs) needs a process group even on one GPU.
        self.launcher = options.launcher if options.launcher != 'none' else (
            'pytorch' if self.procs > 1 or (self.cuda and self.scope == 'mmseg') else 'none')
        if self.launcher != 'none' and not self.cuda:
            extra.append('env_cfg.dist_cfg.backend=gloo')  # nccl needs CUDA
        self.base_lr = cfg.optim_wrapper.get('optimizer', {}).get('lr')
        self.learning_rate = self._check_batch(base)
        if options.scale_lr:
            extra.append('auto_scale_lr.enable=True')
        self.cfg_options = list(options.cfg_options) + extra
        if extra:  # over the user's options, as the tools merge them (config read once)
            cfg.merge_from_dict(parse_cfg_options(extra))
        self.cfg = cfg
        loop = cfg.train_cfg
        backbone = cfg.model.get('backbone') or {}
        self.fusable = 'RepVGG' in str(backbone.get('type', ''))
        self.final_checkpoint = osp.join(self.train_dir, f'iter_{loop.max_iters}.pth'
                                         if 'max_iters' in loop else
                                         f'epoch_{loop.max_epochs}.pth')

    def _check_batch(self, base: Optional[int]) -> Optional[float]:
        """The learning rate the run uses; a batch split other than the config's is
        refused unless --scale-lr asks mmengine's auto_scale_lr to follow it."""
        total = self.procs * self.per_gpu
        if self.options.mini or not base or total == base or \
                'train' not in self.options.steps:
            return self.base_lr
        if not self.options.scale_lr:
            raise UsageError(
                f'{self.stem} trains with a batch of {base} ({base // self.per_gpu} GPUs x '
                f'{self.per_gpu} images); {self.procs} GPU(s) x {self.per_gpu} make {total}. '
                f'Give --gpus {base // self.per_gpu}, keep {base} with --cfg-options '
                f'train_dataloader.batch_size={max(1, base // self.procs)}, or add --scale-lr '
                f'to scale the learning rate with the batch (mmengine\'s auto_scale_lr)')
        return None if self.base_lr is None else self.base_lr * total / base

    # ------------------------------------------------------------------ commands
    def _python(self, tool: str, args: Sequence[str]) -> List[str]:
        return [sys.executable, osp.join(tools_folder(), tool), *args]

    def _launch(self, tool: str, args: Sequence[str], name: str) -> List[str]:
        """``tools/<tool>.py args`` under the experiment's launcher."""
        if self.launcher == 'none':
            return self._python(tool + '.py', args)
        if self.launcher == 'pytorch':
            return ['bash', osp.join(tools_folder(), 'dist_run.sh'), str(self.procs),
                    tool + '.py',
                    *args]
        return ['bash', osp.join(tools_folder(), f'slurm_{tool}.sh'),
                self.options.partition or '',
                name, *args]

    def launch_env(self, port: int, record: Optional[str] = None) -> Dict[str, str]:
        """The launch scripts' settings: the Python to run, a port per job (torchrun),
        the GPUs, GPUs per node and CPUs per task (srun), and under srun the file the
        first task writes its node's environment to (``record``)."""
        if self.launcher == 'pytorch':
            return dict(PYTHON=sys.executable, PORT=str(port))
        if self.launcher == 'slurm':
            env = dict(PYTHON=sys.executable, GPUS=str(self.procs),
                       GPUS_PER_NODE=str(min(self.procs, self.options.gpus_per_node)),
                       CPUS_PER_TASK=str(self.options.cpus_per_task))
            return dict(env, RECORD_ENV=record) if record else env
        return {}

    def _options(self) -> List[str]:
        return ['--cfg-options', *self.cfg_options] if self.cfg_options else []

    def train_command(self, resume: bool) -> List[str]:
        args = [self.config, '--work-dir', self.train_dir] + (['--resume'] if resume else [])
        args += ['--mini'] if self.options.mini else []
        return self._launch('train', args + self._options(), f'{self.stem}-train')

    def test_dir(self, step: str) -> str:
        return osp.join(self.dir, step)

    def test_command(self, step: str) -> List[str]:
        args = [self.config, self.final_checkpoint, '--work-dir', self.test_dir(step)]
        args += ['--deploy'] if step == 'deploy' else []
        args += ['--mini'] if self.options.mini else []
        return self._launch('test', args + self._options(), f'{self.stem}-{step}')

    def speed_commands(self) -> List[List[str]]:
        """Two runs of tools/benchmark.py: the backbone (RepVGG fused and not, or the
        ResNet) at the paper's setting (GPU: batch 128, 224x224, fp32 and fp16) or a small
        CPU one, and the whole model at the config's test size, batch 1."""
        backbone = self.cfg.model.get('backbone', {})
        kind = str(backbone.get('type', ''))
        if self.fusable and isinstance(backbone.get('arch'), str):
            rows = ['--archs', backbone['arch'], '--resnets', 'none']
        elif 'ResNet' in kind:
            rows = ['--archs', 'none', '--resnets', str(backbone.get('depth'))]
        else:
            rows = None
        if self.cuda:
            timing = ['--device', 'cuda', '--precision', 'fp32,fp16', '--repeats', '20']
            size, batch = ['224', '224'], '128'
        else:
            small = self.options.mini
            timing = ['--device', 'cpu', '--precision', 'fp32', '--repeats',
                      '2' if small else '10', '--warmup', '1' if small else '3']
            timing += ['--no-memory'] if small else []
            size, batch = (['64', '64'] if small else ['224', '224']), '1'
        commands = []
        if rows:
            commands.append(self._python('benchmark.py', [
                *rows, '--batch-size', batch, '--input-size', *size, '--modes', 'eager',
                *timing, '--json', osp.join(self.dir, 'speed_backbone.json')]))
        shape = config_input_shape(self.cfg) or [512, 512]
        commands.append(self._python('benchmark.py', [
            '--archs', 'none', '--resnets', 'none', '--config', self.config,
            '--batch-size', '1', '--input-size', *map(str, shape), '--modes', 'eager',
            *timing, '--json', osp.join(self.dir, 'speed_model.json'),
            *self._options()]))
        if self.launcher == 'slurm':  # on a GPU node, one task
            srun = _srun(self.options, f'{self.stem}-speed', gpu=True)
            commands = [srun + c for c in commands]
        return commands

    # ------------------------------------------------------------------ outputs
    def last_checkpoint(self) -> str:
        """The checkpoint mmengine's resume starts from (``last_checkpoint`` names it)."""
        with open(osp.join(self.train_dir, 'last_checkpoint')) as f:
            return osp.basename(f.read().strip())

    def publish(self) -> str:
        """The final checkpoint without optimizer state, named by its sha256 prefix, beside
        the config mmengine dumped and the training log."""
        folder = osp.join(self.dir, 'publish')
        path = publish_checkpoint(self.final_checkpoint, folder, self.stem)
        dumped = osp.join(self.train_dir, osp.basename(self.config))
        logs = sorted(glob.glob(osp.join(self.train_dir, '*', '*.log')))
        for src in ([dumped] if osp.isfile(dumped) else []) + logs[-1:]:
            shutil.copy2(src, osp.join(folder, osp.basename(src)))
        return path

    def read_metrics(self, work_dir: str) -> Dict[str, float]:
        """The metrics of the newest test run in ``work_dir``, as mmengine's LoggerHook
        dumped them (``<timestamp>/<timestamp>.json``), keyed as the evaluator names them."""
        found = sorted(glob.glob(osp.join(work_dir, '*', '*.json')))
        if not found:
            raise ValueError(f'the test wrote no metrics under {work_dir}')
        with open(found[-1]) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        metrics = {k: v for k, v in lines[-1].items()
                   if isinstance(v, (int, float)) and k not in _TIME_KEYS}
        if not metrics:
            raise ValueError('the evaluator gave no metrics (e.g. a detector that found no '
                             'box): see the log')
        return metrics

    def read_speed(self) -> dict:
        """Median ms per batch of each timed row, with the device and its settings."""
        out = dict(files=[], rows=[])
        for part in ('backbone', 'model'):
            path = osp.join(self.dir, f'speed_{part}.json')
            if not osp.isfile(path):
                continue
            with open(path) as f:
                data = json.load(f)
            out['files'].append(path)
            env = data['environment']
            out['device'] = env.get('gpu') or env.get('cpu') or env.get('device')
            args = data['args']
            for row in data['candidates']:
                out['rows'].append(dict(part=part, name=row['name'],
                                        precision=row.get('precision'),
                                        ms=row.get('median_ms'),
                                        batch=args['batch_size'],
                                        input=list(args['input_size'])))
        fused = [r for r in out['rows'] if r['ms'] and '/train' not in r['name']]
        out['summary'] = ', '.join(f'{r["part"]} {r["name"]} {r["precision"]} '
                                   f'{r["ms"]:.1f} ms' for r in fused[:4])
        return out


def plan_experiment(config: str, seed: Optional[int], options) -> Plan:
    """The plan of ``config`` (a file, or ``pkg::folder/name.py``) with ``seed``."""
    config = resolve_config(config)
    if not osp.isfile(config):
        raise InputError(f'config file not found: {config}')
    return Plan(config, seed, options)


def _srun(options, job_name: str, gpu: bool) -> List[str]:
    """srun for one task on the partition (with ``SRUN_ARGS``, as the launch scripts)."""
    return ['srun', '-p', options.partition or '', f'--job-name={job_name}',
            *(['--gres=gpu:1'] if gpu else []), '--ntasks=1', '--kill-on-bad-exit=1',
            *shlex.split(os.environ.get('SRUN_ARGS', ''))]


def check_command(plans: Sequence[Plan], options) -> List[str]:
    """The environment check (``python -m mmrepvgg.reproduce.preflight --check``) as it runs
    on the machine that trains: here, or under slurm on one GPU of the partition. It
    requires CUDA where an experiment uses it (and mmcv's CUDA ops where a detector
    does); otherwise a GPU only where the machine has one."""
    cuda = [p for p in plans if p.cuda]
    device = 'cpu' if options.mini else 'cuda' if cuda else 'auto'
    argv = [sys.executable, '-m', 'mmrepvgg.reproduce.preflight', '--check', '--device', device]
    argv += ['--detection'] if any(p.scope == 'mmdet' for p in cuda) else []
    if options.launcher == 'slurm':
        return _srun(options, 'mmrepvgg-check', gpu=bool(cuda)) + argv
    return argv


def check_environment(plans: Sequence[Plan], options, say: Callable[[str], None]
                      ) -> Tuple[List[str], Optional[dict]]:
    """(failed checks, the facts of the machine checked) from :func:`check_command`, run
    in a process of its own (a check that touches the GPU holds no memory of it here)."""
    argv = check_command(plans, options)
    slurm = options.launcher == 'slurm'
    where = f'a node of partition {options.partition}' if slurm else 'this machine'
    if slurm:
        if options.dry_run:
            say('environment check: ' + ' '.join(map(shlex.quote, argv)))
            return [], None
        say(f'checking the environment on {where} (srun, waits for an allocation)')
    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    except OSError as err:
        return [f'the environment check could not start ({err})'], None
    report = None
    for line in proc.stdout.splitlines():
        _, mark, payload = line.partition(CHECK_MARK)  # srun may prefix task labels
        if mark:
            try:
                report = json.loads(payload)
            except ValueError:
                pass
    if report is None:
        tail = ' | '.join(proc.stdout.strip().splitlines()[-6:]) or 'no output'
        return [f'the environment check did not run on {where} (exit {proc.returncode}): '
                f'{tail}'], None
    machine = report.get('machine') or {}
    host = machine.get('host') or 'unknown host'
    problems = [f'on {host}: {p}' if slurm else p for p in report.get('problems', [])]
    if not problems:
        say(f'environment checked on {host}: ' + _describe(machine))
    return problems, machine


def _describe(machine: dict) -> str:
    gpus = (f'{machine.get("gpus_visible")} x {machine["gpu"]}, driver '
            f'{machine.get("driver")}' if machine.get('gpu') else 'no GPU')
    return (f'torch {machine.get("torch")} (CUDA {machine.get("torch_cuda_build")}), {gpus}, '
            f'mmcv {machine.get("mmcv")} (ops: CUDA {machine.get("mmcv_ops_cuda")})')


def preflight(plans: Sequence[Plan], options, say: Callable[[str], None] = print
              ) -> Tuple[List[str], Optional[dict]]:
    """Every problem found before anything runs, and the facts of the machine checked:
    data, pretrained weights (one check per URL), the slurm options, and the environment
    checks on the machine that trains (under slurm: run there once the rest passed, as
    getting a node may wait in the queue)."""
    problems: List[str] = []
    if any(s in options.steps for s in ('train', 'test', 'deploy')):
        seen = set()
        checked: Dict[str, Optional[str]] = {}
        # a dry run writes no --mini data: what it would write is not missing
        pending = {root for plan in plans for _, root in absent_mini_data(plan.cfg)} \
            if options.mini and options.dry_run else set()
        for plan in plans:
            for problem in data_problems(plan.cfg, options.mini, skip_roots=pending):
                if problem not in seen:
                    seen.add(problem)
                    problems.append(f'{plan.name}: {problem}')
            if 'train' in options.steps and not options.dry_run:
                problems += [f'{plan.name}: {p}' for p in
                             weight_problems(weight_urls(plan.cfg), checked)]
    if options.launcher == 'slurm' and not options.partition:
        problems.append('--launcher slurm needs --partition')
    if options.launcher == 'slurm' and shutil.which('srun') is None and not options.dry_run:
        problems.append('--launcher slurm: srun is not on PATH')
    if options.launcher == 'slurm' and problems and not options.dry_run:
        say('environment check on a GPU node not run yet: fix the problems below first')
        return problems, None
    found, machine = check_environment(plans, options, say)
    return problems + found, machine
