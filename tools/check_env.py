"""The environment, and whether it can run what a long job needs:

  python tools/check_env.py [--device auto|cuda|cpu]

Prints the environment as mmengine's collect_env reports it, then one verdict a line
(CUDA usable, and if not the driver torch needs; mmcv's ops built for CUDA and working;
NCCL; the number of GPUs; the Winograd op). Exits 1 if a check fails. --device cuda
requires a usable GPU; auto (default) checks one where the machine has one.
"""
import argparse

from mmengine.utils.dl_utils import collect_env

from mmrepvgg.env import environment_checks
from mmrepvgg.errors import run_command
from mmrepvgg.ops.winograd_kernel import winograd_check


def main(argv=None):
    parser = argparse.ArgumentParser(description='Check the environment for a long run')
    parser.add_argument('--device', choices=('auto', 'cuda', 'cpu'), default='auto',
                        help='cuda: a usable GPU is required; cpu: check the CPU path '
                             'only; auto (default): check a GPU where one is present')
    args = parser.parse_args(argv)
    for key, value in collect_env().items():
        print(f'{key}: {value}')
    print()
    checks = environment_checks({'auto': None, 'cuda': True, 'cpu': False}[args.device])
    checks.append(winograd_check())
    width = max(len(c.name) for c in checks)
    for check in checks:
        print(f'{"[ok]" if check.ok else "[FAILED]":<8} {check.name:<{width}}  {check.detail}')
    failed = [c.name for c in checks if not c.ok]
    print('\n' + (f'{len(failed)} check(s) failed: {", ".join(failed)}' if failed else
                  'every check passed'))
    return 1 if failed else 0


if __name__ == '__main__':
    run_command(main)
