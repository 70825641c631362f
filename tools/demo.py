"""The main job: train PSPNet RepVGG-B1g2 briefly on CPU on the synthetic mini Cityscapes,
then compare untrained, trained (3-branch) and trained-fused (--deploy) models.

    python tools/demo.py [--iters 60] [--work-dir work_dirs/demo]
"""
import argparse
import os
import os.path as osp
import sys
import time

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, REPO)  # run from a checkout

import mmrepvgg  # noqa: E402,F401  registers the plugin's modules
from mmrepvgg.convert import build_model_from_config, save_atomic  # noqa: E402
from tools import test as test_tool  # noqa: E402
from tools import train as train_tool  # noqa: E402
from tools.make_mini_data import make_cityscapes  # noqa: E402

CONFIG = osp.join(REPO, 'configs', 'pspnet_repvgg_b1g2_cityscapes.py')
DATA = osp.join('data', 'mini_cityscapes')


def evaluate(name: str, checkpoint: str, work_dir: str, deploy: bool = False) -> dict:
    # A name of its own keeps each run's message hub (and its timings) apart.
    argv = [CONFIG, checkpoint, '--mini', '--work-dir', work_dir,
            '--cfg-options', f'experiment_name=demo_{name}']
    metrics = test_tool.main(argv + (['--deploy'] if deploy else []))
    from mmengine.logging import MessageHub
    # IterTimerHook's per-image (batch 1) test times, first one dropped as warm-up.
    times = MessageHub.get_current_instance().get_scalar('test/time').data[0][1:]
    metrics['ms_per_image'] = 1000 * float(times.mean()) if len(times) else float('nan')
    return metrics


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--iters', type=int, default=60, help='training iterations')
    parser.add_argument('--work-dir', default=osp.join('work_dirs', 'demo'))
    args = parser.parse_args(argv)
    started = time.time()
    os.makedirs(args.work_dir, exist_ok=True)
    if not osp.isdir(DATA):
        make_cityscapes(DATA)
    print(f'[demo] data: {DATA}')

    # An untrained model, saved as a checkpoint, is the floor the trained one must clear.
    untrained = osp.join(args.work_dir, 'untrained.pth')
    _, model = build_model_from_config(
        CONFIG, dict(model=dict(backbone=dict(init_cfg=None), pretrained=None)))
    model.init_weights()
    save_atomic(dict(state_dict=model.state_dict()), untrained)

    schedule = [f'train_cfg.max_iters={args.iters}', f'train_cfg.val_interval={args.iters}',
                f'param_scheduler.0.end={args.iters}',
                f'default_hooks.checkpoint.interval={args.iters}']
    train_start = time.time()
    train_tool.main([CONFIG, '--mini', '--work-dir', args.work_dir,
                     '--cfg-options'] + schedule)
    train_time = time.time() - train_start
    trained = osp.join(args.work_dir, f'iter_{args.iters}.pth')

    rows = [('untrained', evaluate('untrained', untrained, args.work_dir)),
            ('trained, 3-branch', evaluate('trained', trained, args.work_dir)),
            ('trained, fused (--deploy)',
             evaluate('fused', trained, args.work_dir, deploy=True))]
    print(f'\n[demo] PSPNet RepVGG-B1g2 (output stride 8), mini Cityscapes, CPU; '
          f'{args.iters} iterations in {train_time:.0f} s')
    print(f'| {"model":<27} | {"mIoU":>6} | {"aAcc":>6} | {"ms / image":>10} |')
    print(f'|{"-" * 29}|{"-" * 8}|{"-" * 8}|{"-" * 12}|')
    for name, m in rows:
        print(f'| {name:<27} | {m["mIoU"]:6.2f} | {m["aAcc"]:6.2f} | '
              f'{m["ms_per_image"]:10.1f} |')
    print(f'[demo] total wall time {time.time() - started:.0f} s')


if __name__ == '__main__':
    main()
