"""What the test modules share: the mini-data runs of the package's entry points (as the
tools run them, in-process, with the session's mini data folder as the working
directory), the trainings behind the session fixtures ``seg`` and ``det``
(tests/conftest.py), the comparisons of their predictions, the release key layouts and
the fakes of the launcher tests.

Test modules import from here (``from helpers import ...``: pytest puts tests/ on
sys.path), never from each other.
"""
import argparse
import contextlib
import glob
import hashlib
import os
import os.path as osp
import pickle
import re
import subprocess
import sys
import uuid
from types import SimpleNamespace

import numpy as np
import torch
from mmengine.config import DictAction
from PIL import Image

from mmrepvgg import RepVGG, apis, load_file, reparameterize
from mmrepvgg.apis.deploy import export
from mmrepvgg.convert import convert_release, fuse_checkpoint
from mmrepvgg.ops.winograd import error_growth
from mmrepvgg.reparam import rounding_errors

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
SEG_CONFIG = osp.join(ROOT, 'configs', 'pspnet_repvgg_b1g2_cityscapes.py')
DET_CONFIG = osp.join(ROOT, 'configs', 'faster-rcnn_repvgg-a2_fpn_1x_coco.py')
A0_BLOCKS = 22  # stem + 2 + 4 + 14 + 1

# RepVGG-A0 stage channels are (48, 96, 192, 1280).
SEG_MODEL = ['model.backbone.arch=A0', 'model.decode_head.in_channels=1280',
             'model.auxiliary_head.in_channels=192']
DET_MODEL = ['model.backbone.arch=A0', 'model.neck.in_channels=[48,96,192,1280]',
             # every box kept, so the predictions compared are not empty; 100 proposals
             # instead of 1000 keep the CPU NMS fast
             'model.test_cfg.rcnn.score_thr=0.0', 'model.test_cfg.rpn.max_per_img=100']
TEST = ['test_dataloader.dataset.indices=2']
# One iteration, batch 2, no validation at the end (the tests run the test entry point).
TRAIN = ['train_cfg.max_iters=1', 'train_dataloader.batch_size=2', 'randomness.seed=0',
         'val_dataloader=None', 'val_cfg=None', 'val_evaluator=None']

# A few blocks of every kind (identity or not, grouped), for tests that run in seconds.
TINY = dict(num_blocks=(1, 2, 1, 1), width_factors=(0.25,) * 4, groups={2: 2})


# ------------------------------------------------------------- the entry points, in-process
@contextlib.contextmanager
def working_dir(path):
    old = os.getcwd()
    os.chdir(str(path))
    try:
        yield
    finally:
        os.chdir(old)


def parse_options(pairs):
    """'key=value' strings (SEG_MODEL, TRAIN, ...) as the cfg_options dict the tools'
    --cfg-options makes of them (mmengine's DictAction parses them)."""
    namespace = argparse.Namespace()
    DictAction(option_strings=[], dest='options')(None, namespace, [str(p) for p in pairs])
    return namespace.options


def _str(value):
    return str(value) if isinstance(value, os.PathLike) else value


def run_entry(fn, root, *args, options=(), **kwargs):
    """A package entry point (``apis.train``, ``apis.test``, ``export``, ``quantize``)
    with `root` as cwd. ``options`` ('key=value' strings) are merged over ``cfg_options``
    (a dict), after a unique experiment name (runners built in the same second would
    otherwise share mmengine's logger instance). Paths may be given as Path objects."""
    cfg_options = dict(kwargs.pop('cfg_options', None) or {})
    cfg_options.update(parse_options([f'experiment_name=t{uuid.uuid4().hex[:8]}',
                                      *options]))
    args = [_str(a) for a in args]
    kwargs = {k: _str(v) for k, v in kwargs.items()}
    with working_dir(root):
        return fn(*args, cfg_options=cfg_options, **kwargs)


def run_convert(root, config, checkpoint, output, options=(), probe=True):
    """What tools/convert.py CONFIG CHECKPOINT OUTPUT does, with `root` as cwd: the
    fusion report (tools/convert.py prints its format_report)."""
    with working_dir(root):
        return fuse_checkpoint(str(config), str(checkpoint), str(output), probe=probe,
                               cfg_options=parse_options(options) or None)


def run_convert_release(root, checkpoint, output):
    """What tools/convert.py --release RELEASE OUTPUT does, with `root` as cwd."""
    with working_dir(root):
        return convert_release(str(checkpoint), str(output))


def run_test(fixture, config, ckpt, work, out, model_args, **kwargs):
    """apis.test (tools/test.py) on mini data, ``kwargs`` its further arguments
    (deploy, backend, precision): (metrics, work dir)."""
    metrics = run_entry(apis.test, fixture.root, config, ckpt, mini=True, work_dir=work,
                        out=out, options=TEST + model_args, **kwargs)
    return metrics, work


def run_export(fixture, config, ckpt, out, model_args, **kwargs):
    """apis.deploy.export (tools/export.py) on mini data, ``kwargs`` its further
    arguments (part, format, winograd, dynamic, check, ...): the report."""
    return run_entry(export, fixture.root, config, ckpt, out, mini=True, options=model_args,
                     **kwargs)


def run_tools(*commands, cwd=ROOT, env=None, timeout=300):
    """tools/NAME.py ARGS... for each (NAME, *ARGS) of ``commands``, as processes started
    side by side (each spends seconds importing): their (returncode, stdout, stderr)."""
    procs = [subprocess.Popen([sys.executable, osp.join(ROOT, 'tools', f'{name}.py'),
                               *map(str, args)], cwd=str(cwd), env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, *args in commands]
    results = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
        results.append(SimpleNamespace(returncode=proc.returncode, stdout=stdout,
                                       stderr=stderr))
    return results


# ------------------------------------------------------------------ what a run leaves
def log_text(work_dir):
    files = glob.glob(osp.join(str(work_dir), '*', '*.log'))
    assert files, f'no log file under {work_dir}'
    return '\n'.join(open(f).read() for f in files)


def fingerprint(path):
    st = os.stat(path)
    with open(path, 'rb') as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return st.st_size, st.st_mtime_ns, digest


def load_state(path):
    return load_file(str(path))  # weights_only=True with mmengine's types allowed


def assert_no_temporary_files(folder):
    left = [n for n in os.listdir(folder) if n.startswith('.')]
    assert not left, f'temporary files left behind: {left}'


def assert_resumed_from_iter_1(work):
    """The training in `work` resumed after iteration 1 of 2 and wrote iteration 2."""
    assert load_state(work / 'iter_2.pth')['meta']['iter'] == 2
    log = log_text(work)
    assert 'resumed epoch: 0, iter: 1' in log
    assert 'Iter(train) [1/2]' not in log and 'Iter(train) [2/2]' in log


# ------------------------------------------- what the session fixtures of conftest.py train
def train_one_iteration(mini_root, work, config, model_args):
    """apis.train (tools/train.py --mini) of `config` for one iteration (TRAIN), writing
    into `work`: the checkpoint."""
    run_entry(apis.train, mini_root, config, mini=True, work_dir=work,
              options=TRAIN + model_args)
    return work / 'iter_1.pth'


def train_seg(mini_root, tmp_path_factory):
    """PSPNet RepVGG-A0 after one training iteration, and its fused conversion (the
    session's ``seg`` fixture, tests/conftest.py)."""
    work = tmp_path_factory.mktemp('seg_train')
    ckpt = train_one_iteration(mini_root, work, SEG_CONFIG, SEG_MODEL)
    out_dir = tmp_path_factory.mktemp('seg_fused')
    fused = out_dir / 'fused.pth'
    report = run_convert(mini_root, SEG_CONFIG, ckpt, fused, SEG_MODEL)
    return SimpleNamespace(root=mini_root, work=work, ckpt=ckpt, fused=fused,
                           out_dir=out_dir, report=report)


# A QAT fine-tune: two iterations with a validation after each (it logs and evaluates
# as a training does).
QAT_TRAIN = ['train_cfg.max_iters=2', 'train_cfg.val_interval=1', 'train_dataloader.batch_size=2',
             'optim_wrapper.optimizer.lr=0.001', 'param_scheduler.0.end=2', 'randomness.seed=0',
             'val_dataloader.dataset.indices=2', 'default_hooks.checkpoint.interval=2']


def train_qat(seg, tmp_path_factory):
    """A QAT fine-tune of the ``seg`` checkpoint (calibrated on 2 images), and its INT8
    ONNX file with the export report (the session's ``qat``)."""
    work = tmp_path_factory.mktemp('qat_train')
    run_entry(apis.train, seg.root, SEG_CONFIG, mini=True, work_dir=work, qat=str(seg.ckpt),
              calib=2, options=QAT_TRAIN + SEG_MODEL)
    onnx_file = work / 'qat.onnx'
    report = run_entry(export, seg.root, SEG_CONFIG, work / 'iter_2.pth', onnx_file,
                       mini=True, options=SEG_MODEL)
    return SimpleNamespace(work=work, ckpt=work / 'iter_2.pth', onnx=onnx_file, report=report)


def train_det(mini_root, tmp_path_factory):
    """Faster R-CNN RepVGG-A0 after one training iteration (the session's ``det``)."""
    work = tmp_path_factory.mktemp('det_train')
    ckpt = train_one_iteration(mini_root, work, DET_CONFIG, DET_MODEL)
    return SimpleNamespace(root=mini_root, work=work, ckpt=ckpt)


# ------------------------------------------------------ predictions of two forms compared
def seg_maps(folder):
    names = sorted(os.listdir(folder))
    assert len(names) == 2 and all(n.endswith('.png') for n in names), names
    return {n: np.array(Image.open(osp.join(folder, n))) for n in names}


MAX_FLIPPED_PIXELS = 8  # of 2 x 256 x 128


def assert_same_segmentation(ref_maps, maps, ref_metrics, metrics):
    """The fused model predicts the same label maps, hence the same metrics.

    Fusion changes outputs by ~1e-6, so a pixel whose two best classes tie to that
    precision may flip; the training seed makes this rare, and any flip is bounded here.
    With identical maps the metrics must be identical.
    """
    assert maps.keys() == ref_maps.keys()
    flipped = sum(int((maps[k] != ref_maps[k]).sum()) for k in maps)
    assert flipped <= MAX_FLIPPED_PIXELS, f'{flipped} pixels differ'
    if flipped == 0:
        assert metrics == ref_metrics
    else:  # a numerical near-tie flipped a few pixels
        assert metrics.keys() == ref_metrics.keys()
        for key in metrics:
            assert abs(float(metrics[key]) - float(ref_metrics[key])) <= 0.05, key


def det_results(path):
    with open(path, 'rb') as f:
        results = pickle.load(f)
    assert len(results) == 2
    return {r['img_id']: r['pred_instances'] for r in results}


def assert_same_detections(ref, got, score_tol=1e-5, box_tol=1e-2):
    """Every box has a partner with the same label, score (1e-5) and corners (0.01 px).

    Matched rather than compared row by row: two boxes whose scores tie to ~1e-7 may
    swap ranks after fusion, and the last kept box of an image may change places with
    the first dropped one (hence at most one unmatched box).
    Tolerances in fp32 eps (1.19e-7) of each output's range: 1e-5 of a probability is
    84 eps, 0.01 px of a 256-px mini COCO coordinate 330 eps: room for the fused
    backbone's fp32 rounding (1-2e-6 of its outputs, ~10 eps, tools/check_fusion.py)
    carried through RPN, RoI pooling and the exp() of box decoding.
    """
    num = len(ref['scores'])
    assert num > 0, 'no predictions to compare'
    assert len(got['scores']) == num
    used = torch.zeros(num, dtype=torch.bool)
    unmatched = 0
    for box, score, label in zip(got['bboxes'], got['scores'], got['labels']):
        fits = (~used & (ref['labels'] == label)
                & ((ref['scores'] - score).abs() <= score_tol)
                & ((ref['bboxes'] - box).abs().amax(1) <= box_tol))
        index = fits.nonzero().flatten()
        if len(index):
            used[index[0]] = True
        else:
            unmatched += 1
    assert unmatched <= 1, f'{unmatched} of {num} boxes have no partner'


def assert_files_score_as_deploy(fixture, folder, files):
    """tools/test.py --backend on each (name, exported file, backend) of ``files`` gives
    the mini PSPNet's maps and metrics of tools/test.py --deploy."""
    def test(name, ckpt, **kwargs):
        return run_test(fixture, SEG_CONFIG, ckpt, folder / name, folder / f'{name}_maps',
                        SEG_MODEL, **kwargs)

    reference, _ = test('deploy', fixture.ckpt, deploy=True)
    maps = seg_maps(folder / 'deploy_maps')
    for name, path, backend in files:
        metrics, _ = test(name, path, backend=backend)
        print(f'\nPSPNet A0 mini: torch --deploy {reference}; {name} {metrics}')
        assert_same_segmentation(maps, seg_maps(folder / f'{name}_maps'), reference,
                                 metrics)


def assert_plain_graph(node_types):
    """The RepVGG part fused: no batch norm and no branch sum left in the graph."""
    assert 'BatchNormalization' not in node_types and 'Add' not in node_types, node_types


def assert_within_growth(out, direct, reference, tile):
    """Winograd's error against fp64 is within error_growth(tile) x a direct conv's own in
    the same precision (floored at a few fp32 ulps of the output: mmrepvgg.reparam).
    error_growth (mmrepvgg.ops.winograd) bounds how much the transforms magnify rounding."""
    errors = rounding_errors(out, direct, reference, factor=error_growth(tile))
    assert errors['within'], (tile, errors)
    return errors


# --------------------------------------------------------- backbone release key layouts
# Our names -> the official release's, written out by hand (not from the loader's table).
OFFICIAL_NAMES = [(r'^stem\.', 'stage0.'), (r'\.dense\.', '.rbr_dense.'),
                  (r'\.pointwise\.', '.rbr_1x1.'), (r'\.identity\.', '.rbr_identity.'),
                  (r'\.fused\.', '.rbr_reparam.')]
MMPRETRAIN_NAMES = [(r'^stage(\d)\.', r'stage_\1.'), (r'\.dense\.bn\.', '.branch_3x3.norm.'),
                    (r'\.dense\.conv\.', '.branch_3x3.conv.'),
                    (r'\.pointwise\.bn\.', '.branch_1x1.norm.'),
                    (r'\.pointwise\.conv\.', '.branch_1x1.conv.'),
                    (r'\.identity\.', '.branch_norm.'), (r'\.fused\.', '.branch_reparam.')]
# timm's byobnet names (stages counted from 0)
TIMM_NAMES = [(r'^stage(\d)\.', lambda m: f'stages.{int(m.group(1)) - 1}.'),
              (r'\.dense\.', '.conv_kxk.'), (r'\.pointwise\.', '.conv_1x1.'),
              (r'\.fused\.', '.reparam_conv.')]


def rename(state, rules, prefix=''):
    out = {}
    for key, value in state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        out[prefix + key] = value.clone()
    return out


def source_model(randomize, deploy=False):
    """A RepVGG-A0 with non-trivial batch-norm statistics (``randomize``: the conftest
    fixture), fused with ``deploy``."""
    model = randomize(RepVGG('A0'), seed=5).eval()
    return reparameterize(model) if deploy else model


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)


# ------------------------------------------------------- fakes of the launcher tests
# srun: its options up to the command, then the command once per task (one after
# another: the fake tasks do not talk to each other)
FAKE_SRUN = f"""#!{sys.executable}
import json, os, subprocess, sys
argv, i, options = sys.argv[1:], 0, {{}}
while i < len(argv) and argv[i].startswith('-'):
    if argv[i] == '-p':
        options['-p'], i = argv[i + 1], i + 2
        continue
    key, _, value = argv[i].partition('=')
    options[key], i = value, i + 1
with open(os.environ['FAKE_LOG'], 'a') as f:
    f.write(json.dumps(dict(tool='srun', options=options, command=argv[i:])) + '\\n')
ntasks = int(options.get('--ntasks', 1))
code = 0
for rank in range(ntasks):
    env = dict(os.environ, SLURM_JOB_ID=os.environ.get('FAKE_JOB_ID', '4242'),
               SLURM_STEP_ID='0', SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
               SLURM_NTASKS=str(ntasks), SLURM_NNODES='1', SLURM_JOB_NODELIST='gpu-node-7',
               SLURMD_NODENAME='gpu-node-7')
    code = subprocess.call(argv[i:], env=env) or code
sys.exit(code)
"""


def write_executable(path, text):
    """``text`` as an executable file at ``path`` (its folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path
