"""Reproduce the bundled experiments (or any config) in one command: train, test unfused
and fused (--deploy), time, and tabulate against the published numbers, resumably.

  python tools/reproduce.py --suite paper --work-dir work_dirs/paper          # 8 GPUs
  python tools/reproduce.py --suite paper --work-dir W --launcher slurm --partition gpu \\
      --gpus 16 --cfg-options train_dataloader.batch_size=1                    # 2 nodes
  python tools/reproduce.py --suite smoke --mini --work-dir W                  # CPU check
  python tools/reproduce.py configs/my_config.py --mini --work-dir W --dry-run

Suites: cityscapes (the five PSPNet configs), coco (the eight detection configs), paper
(both), smoke (one RepVGG config of each task, a few iterations), as the installed package
carries them (a CONFIG may name one as mmrepvgg::repvgg/<name>.py). Before the first
experiment it checks the data, the pretrained weights and the environment of the machine
that trains (this one, or under slurm a node of the partition through srun: CUDA, NCCL,
mmcv's ops on CUDA where a detector trains). Each experiment works in W/<config stem>/
(W/<stem>/seed<k>/ with --seeds) and keeps its state in result.json, with the facts of the
machine that trained it: the same command again skips what is done and resumes an
interrupted training. W/results.md and W/results.json are rewritten after every step.
"""
import argparse
import warnings

from mmrepvgg.errors import run_command
from mmrepvgg.reproduce.experiments import DEFAULT_TOLERANCE, SUITES, suite_configs
from mmrepvgg.reproduce.run import STEPS, ReproduceOptions, reproduce


def _csv(kind, valid=None):
    def parse(text):
        items = [kind(v) for v in text.split(',') if v]
        bad = [v for v in items if valid and v not in valid]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f'{text!r}: comma-separated, from {", ".join(map(str, valid))}' if valid
                else f'{text!r}: comma-separated values')
        return items
    return parse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('configs', nargs='*', metavar='CONFIG', help='config files')
    parser.add_argument('--suite', choices=SUITES, help='bundled experiments to add')
    parser.add_argument('--work-dir', required=True, help='where everything goes')
    parser.add_argument('--steps', type=_csv(str, STEPS), default=list(STEPS),
                        help=f'comma-separated, from {",".join(STEPS)} (default all)')
    parser.add_argument('--gpus', type=int,
                        help='GPUs (processes) per experiment; default: the config\'s '
                             'split (its batch / images per GPU) on a GPU machine, 1 on CPU')
    parser.add_argument('--launcher', choices=('none', 'pytorch', 'slurm'), default='none',
                        help='none: one process, or torchrun where several are needed '
                             '(segmentation always on GPUs: SyncBN); pytorch: torchrun; '
                             'slurm: srun')
    parser.add_argument('--partition', help='slurm partition')
    parser.add_argument('--gpus-per-node', type=int, default=8, help='slurm (default 8)')
    parser.add_argument('--cpus-per-task', type=int, default=5, help='slurm (default 5)')
    parser.add_argument('--mini', action='store_true',
                        help='on CPU, on the synthetic mini data (written where absent, to '
                             'the data roots of the mini configs: data/mini_cityscapes, '
                             'data/mini_coco of the working directory)')
    parser.add_argument('--seeds', type=_csv(int),
                        help='run each experiment once per seed, e.g. 0,1,2 (the table '
                             'gives mean and spread)')
    parser.add_argument('--scale-lr', action='store_true',
                        help='allow another batch split than the config\'s, scaling the '
                             'learning rate with the batch (mmengine\'s auto_scale_lr)')
    parser.add_argument('--force', type=_csv(str, STEPS), default=[],
                        help='run these steps again although they are done')
    parser.add_argument('--tolerance', type=float, default=DEFAULT_TOLERANCE,
                        help=f'allowed |metric - published| (default {DEFAULT_TOLERANCE})')
    parser.add_argument('--dry-run', action='store_true',
                        help='print every command, run nothing, write nothing')
    parser.add_argument('--cfg-options', nargs='+', default=[], metavar='KEY=VALUE',
                        help='override config entries of every experiment')
    args = parser.parse_args(argv)
    if not args.configs and not args.suite:
        parser.error('give CONFIG files, --suite, or both')
    if args.gpus is not None and args.gpus < 1:
        parser.error(f'--gpus must be >= 1, got {args.gpus}')
    return args


def main(argv=None):
    # mmengine imports pkg_resources once per config it reads: its deprecation note only
    warnings.filterwarnings('ignore', message='pkg_resources is deprecated')
    args = parse_args(argv)
    configs = list(args.configs) + (suite_configs(args.suite) if args.suite else [])
    options = ReproduceOptions(
        work_dir=args.work_dir, steps=args.steps, gpus=args.gpus, launcher=args.launcher,
        partition=args.partition, gpus_per_node=args.gpus_per_node,
        cpus_per_task=args.cpus_per_task, mini=args.mini, smoke=args.suite == 'smoke',
        dry_run=args.dry_run, cfg_options=args.cfg_options,
        seeds=args.seeds or [None], scale_lr=args.scale_lr, force=args.force,
        tolerance=args.tolerance)
    return 1 if reproduce(list(dict.fromkeys(configs)), options) else 0


if __name__ == '__main__':
    run_command(main)
