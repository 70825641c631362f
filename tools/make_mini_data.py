"""Write a tiny synthetic dataset in the on-disk layout of Cityscapes or COCO, for
``--mini`` runs of the tools (the data of the demo and the tests). ``--mini`` writes it
itself where its folder (data/mini_cityscapes, data/mini_coco) is absent; this tool
writes it elsewhere, at another size or count, or again (--force).

    python tools/make_mini_data.py cityscapes data/mini_cityscapes
    python tools/make_mini_data.py coco data/mini_coco --num-train 24 --num-val 8
"""
import argparse
import sys

from mmrepvgg.errors import run_command
from mmrepvgg.testing.mini_data import (DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL, DEFAULT_SIZES,
                                        OutDirNotEmpty, make_cityscapes, make_coco)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip())
    p.add_argument('kind', choices=sorted(DEFAULT_SIZES), help='which layout to write')
    p.add_argument('out_dir', help='dataset root to create (use it as data_root)')
    p.add_argument('--num-train', type=int, default=DEFAULT_NUM_TRAIN)
    p.add_argument('--num-val', type=int, default=DEFAULT_NUM_VAL)
    p.add_argument('--size', type=int, nargs=2, metavar=('WIDTH', 'HEIGHT'),
                   help='image size (default: cityscapes 256 128, coco 256 192)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--force', action='store_true',
                   help='replace out_dir if it is not empty (only once the new one is done)')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    size = tuple(args.size) if args.size else DEFAULT_SIZES[args.kind]
    make = make_cityscapes if args.kind == 'cityscapes' else make_coco
    try:
        path = make(args.out_dir, args.num_train, args.num_val, size, args.seed,
                    args.force)
    except OutDirNotEmpty as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(f'wrote {args.kind} mini dataset: {args.num_train} train + {args.num_val} val '
          f'images ({size[0]}x{size[1]}, seed {args.seed}) to {path}')
    return 0


if __name__ == '__main__':
    run_command(main)
