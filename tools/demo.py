"""Train PSPNet RepVGG-B1g2 briefly on the synthetic mini Cityscapes, then compare the
untrained, trained (3-branch) and trained-fused (--deploy) models.

    python tools/demo.py [--iters 60] [--seed 0] [--work-dir work_dirs/demo]

The console gets one line per phase, then the table, then the path of one picture: a
val image and the trained model's predictions on it in 3-branch and fused form, drawn as
tools/infer.py draws them (WORK_DIR/prediction.png). Everything else goes to the work
dir: mmengine's log of each training or test run (config, losses, per-class IoU) to
WORK_DIR/<timestamp>/<timestamp>.log, the demo's own log and Python warnings to
WORK_DIR/demo.log. Errors still reach the console, with the path of the log to read.
"""
import argparse
import contextlib
import io
import logging
import os
import os.path as osp
import sys
import time

REPO = osp.dirname(osp.dirname(osp.abspath(__file__)))
CONFIG = osp.join(REPO, 'configs', 'pspnet_repvgg_b1g2_cityscapes.py')
DATA = osp.join('data', 'mini_cityscapes')
RUNNER_TYPE = 'RepVGGDemoRunner'


class WarningCounter(logging.Handler):
    """Counts the warnings logged anywhere in the demo (they go to the logs only)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record):
        self.count += 1


WARNINGS = WarningCounter()


def quiet_console(logger: logging.Logger) -> logging.Logger:
    """Leave only errors on the logger's console handler (its file handler, if any, keeps
    every line) and count its warnings."""
    for handler in logger.handlers:
        # a FileHandler is a StreamHandler too: only the console one is quietened
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(max(handler.level, logging.ERROR))
    if WARNINGS not in logger.handlers:
        logger.addHandler(WARNINGS)
    return logger


def register_runner() -> None:
    """mmengine's Runner with a quiet console, for ``runner_type`` in the configs."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    class QuietConsoleRunner(Runner):
        def build_logger(self, *args, **kwargs):
            return quiet_console(super().build_logger(*args, **kwargs))

        def load_checkpoint(self, *args, **kwargs):
            # mmengine prints (rather than logs) the path it loads: into the log with it
            with contextlib.redirect_stdout(io.StringIO()) as printed:
                checkpoint = super().load_checkpoint(*args, **kwargs)
            for line in printed.getvalue().splitlines():
                self.logger.info(line)
            return checkpoint

    RUNNERS.register_module(name=RUNNER_TYPE, module=QuietConsoleRunner, force=True)


@contextlib.contextmanager
def phase(title: str, demo_log: str):
    """Print '[demo] title ...', then the body's result (the yielded dict's 'result')
    and time; on failure, where the log is."""
    from mmengine.logging import MMLogger
    print(f'[demo] {title} ...', end=' ', flush=True)
    before, start = MMLogger.get_current_instance(), time.time()
    out = {'result': 'done'}

    def log_file():
        current = MMLogger.get_current_instance()
        return current.log_file if current is not before and current.log_file else None

    try:
        yield out
    except BaseException:
        print('FAILED', flush=True)
        print(f'[demo] {title} failed; see {log_file() or demo_log}', file=sys.stderr,
              flush=True)
        raise
    out['seconds'], out['log'] = time.time() - start, log_file()
    print(f'{out["result"]} in {out["seconds"]:.0f} s', flush=True)


def runner_options(seed: int) -> dict:
    return {'runner_type': RUNNER_TYPE, 'randomness.seed': seed}


def evaluate(name: str, checkpoint: str, work_dir: str, seed: int,
             deploy: bool = False) -> dict:
    from mmengine.logging import MessageHub

    from mmrepvgg.apis import test
    # A name of its own keeps each run's message hub (and its timings) apart.
    options = dict(runner_options(seed), experiment_name=f'demo_{name}')
    metrics = test(CONFIG, checkpoint, deploy=deploy, work_dir=work_dir,
                   cfg_options=options, mini=True)
    # IterTimerHook's per-image (batch 1) test times, first one dropped as warm-up.
    times = MessageHub.get_current_instance().get_scalar('test/time').data[0][1:]
    metrics['ms_per_image'] = 1000 * float(times.mean()) if len(times) else float('nan')
    return metrics


def draw_predictions(checkpoint: str, work_dir: str) -> str:
    """The first val image, the label maps of ``checkpoint`` as trained (3-branch) and
    fused after loading, drawn by the config's MMSegInferencer side by side into
    WORK_DIR/prediction.png; returns its path."""
    import glob

    import mmcv

    from mmrepvgg.apis.inference import (init_inferencer, predict_image, side_by_side,
                                         write_picture)
    image = mmcv.imread(sorted(glob.glob(osp.join(DATA, 'leftImg8bit', 'val', '*',
                                                  '*.png')))[0])
    pictures = [image[..., ::-1]]
    for deploy in (False, True):
        inferencer, _ = init_inferencer(CONFIG, checkpoint, deploy=deploy, mini=True)
        pictures.append(predict_image(inferencer, image)[2])
    row = side_by_side(pictures, ['input', '3-branch (trained)', 'fused (--deploy)'])
    return write_picture(row, osp.join(work_dir, 'prediction.png'))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--iters', type=int, default=60, help='training iterations')
    parser.add_argument('--seed', type=int, default=0,
                        help='seed of the untrained weights, the data order and the '
                             'augmentation (default 0)')
    parser.add_argument('--work-dir', default=osp.join('work_dirs', 'demo'))
    args = parser.parse_args(argv)
    if args.iters < 1:
        parser.error(f'--iters must be >= 1, got {args.iters}')
    started = time.time()
    os.makedirs(args.work_dir, exist_ok=True)

    # Python warnings (mostly deprecations inside the libraries, some raised on import)
    # go to the demo's log: set up before mmengine and friends are imported.
    demo_log = osp.join(args.work_dir, 'demo.log')
    log_handler = logging.FileHandler(demo_log, mode='w')
    log_handler.setLevel(logging.INFO)
    log_handler.setFormatter(logging.Formatter('%(asctime)s - %(name)s - %(levelname)s - '
                                               '%(message)s'))
    logging.captureWarnings(True)
    py_warnings = logging.getLogger('py.warnings')
    py_warnings.propagate = False
    py_warnings.addHandler(log_handler)
    py_warnings.addHandler(WARNINGS)

    import mmrepvgg  # noqa: F401  registers the plugin's modules
    from mmengine.device import get_device
    from mmengine.logging import MessageHub, MMLogger
    from mmengine.runner import set_random_seed

    from mmrepvgg.apis import train
    from mmrepvgg.convert import build_model_from_config
    from mmrepvgg.fileio import save_atomic
    from mmrepvgg.testing import make_cityscapes
    register_runner()
    # the current logger until the first runner starts (init_weights writes its report there)
    quiet_console(MMLogger.get_instance('mmrepvgg_demo', log_level='INFO')).addHandler(
        log_handler)

    if not osp.isdir(DATA):
        with phase(f'writing the mini Cityscapes to {DATA}', demo_log):
            make_cityscapes(DATA)
    else:
        print(f'[demo] data: {DATA}')

    # An untrained model, saved as a checkpoint, is the floor the trained one must clear.
    untrained = osp.join(args.work_dir, 'untrained.pth')
    with phase(f'initialising an untrained model (seed {args.seed})', demo_log):
        set_random_seed(args.seed)
        _, model = build_model_from_config(
            CONFIG, dict(model=dict(backbone=dict(init_cfg=None), pretrained=None)))
        model.init_weights()
        save_atomic(dict(state_dict=model.state_dict()), untrained)

    schedule = {'train_cfg.max_iters': args.iters, 'train_cfg.val_interval': args.iters,
                'param_scheduler.0.end': args.iters,
                'default_hooks.checkpoint.interval': args.iters}
    with phase(f'training {args.iters} iterations (seed {args.seed})', demo_log) as training:
        train(CONFIG, args.work_dir, dict(schedule, **runner_options(args.seed)), mini=True)
        loss = MessageHub.get_current_instance().get_scalar('train/loss').current()
        training['result'] = f'final loss {loss:.3f}, done'
    trained = osp.join(args.work_dir, f'iter_{args.iters}.pth')

    rows, logs = [], [training['log']]
    for label, name, ckpt, deploy in (
            ('untrained', 'untrained', untrained, False),
            ('trained, 3-branch', 'trained', trained, False),
            ('trained, fused (--deploy)', 'fused', trained, True)):
        with phase(f'testing {label}', demo_log) as testing:
            metrics = evaluate(name, ckpt, args.work_dir, args.seed, deploy)
            testing['result'] = f'mIoU {metrics["mIoU"]:.2f}'
        rows.append((label, metrics))
        logs.append(testing['log'])

    print('[demo] logs (config, losses, per-class IoU): '
          + ', '.join(log for log in logs if log) + f'; Python warnings: {demo_log}'
          + (f'; {WARNINGS.count} warnings in all, none printed here' if WARNINGS.count
             else ''))
    print(f'\n[demo] PSPNet RepVGG-B1g2 (output stride 8), mini Cityscapes, '
          f'{get_device().upper()}, seed {args.seed}; {args.iters} iterations in '
          f'{training["seconds"]:.0f} s; total {time.time() - started:.0f} s')
    print(f'| {"model":<27} | {"mIoU":>6} | {"aAcc":>6} | {"ms / image":>10} |')
    print(f'|{"-" * 29}|{"-" * 8}|{"-" * 8}|{"-" * 12}|')
    for name, m in rows:
        print(f'| {name:<27} | {m["mIoU"]:6.2f} | {m["aAcc"]:6.2f} | '
              f'{m["ms_per_image"]:10.1f} |')

    # One val image as tools/infer.py draws it, from the trained checkpoint in both forms.
    print()
    with phase('drawing the 3-branch and fused predictions on a val image', demo_log):
        picture = draw_predictions(trained, args.work_dir)
    print(f'[demo] picture (input | 3-branch | fused): {picture}')


if __name__ == '__main__':
    main()
