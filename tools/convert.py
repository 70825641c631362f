"""Write a deploy (fused) checkpoint, or map a release file onto this project's layout.

  python tools/convert.py CONFIG CHECKPOINT OUTPUT          # trained model -> fused model
                                                            # (backbone file -> fused backbone)
  python tools/convert.py --release RELEASE.pth OUTPUT      # official/mmpretrain -> ours

CHECKPOINT and RELEASE may be URLs (downloaded once into torch's cache, as mmengine does).
"""
import argparse

from mmengine.config import DictAction

from mmrepvgg.convert import convert_release, fuse_checkpoint
from mmrepvgg.errors import run_command
from mmrepvgg.reparam import format_report


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('paths', nargs='+', metavar='PATH',
                        help='CONFIG CHECKPOINT OUTPUT, or with --release: RELEASE OUTPUT')
    parser.add_argument('--release', action='store_true',
                        help='convert an official/mmpretrain/timm release file')
    parser.add_argument('--no-probe', action='store_true',
                        help='skip checking the fused outputs on a probe input')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries before building the model')
    args = parser.parse_args(argv)
    expected = 2 if args.release else 3
    if len(args.paths) != expected:
        parser.error(f'expected {"RELEASE OUTPUT" if args.release else "CONFIG CHECKPOINT OUTPUT"}'
                     f', got {len(args.paths)} paths')
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.release:
            info = convert_release(*args.paths)
            print(f'{args.paths[0]}: {info["layout"]} layout, '
                  f'{"deploy" if info["deploy"] else "training"} form; dropped '
                  f'{len(info["dropped"])} head keys; wrote {args.paths[1]}')
        else:
            report = fuse_checkpoint(*args.paths, probe=not args.no_probe,
                                     cfg_options=args.cfg_options)
            print(f'{format_report(report)}; wrote {args.paths[2]}')
    except (OSError, ValueError, KeyError) as err:  # missing or failed download, bad file
        raise SystemExit(f'error: {err}')


if __name__ == '__main__':
    run_command(main)
