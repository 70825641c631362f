"""A config made ready for a run, with the plugin's options (``--mini``, ``--amp``,
``--deploy``, the launcher), as mmdet's and mmseg's tools prepare theirs; where the
package's own configs and tools are (``mmrepvgg::repvgg/<name>.py``)."""
import argparse
import os
import os.path as osp
from typing import Callable, List, Optional, Tuple

from mmengine.config import Config, DictAction

from ..checkpoint.layouts import CheckpointInfo, whole_model_needed
from ..errors import InputError, UsageError

LAUNCHERS = ['none', 'pytorch', 'slurm', 'mpi']
PACKAGE_DIR = osp.dirname(osp.dirname(osp.abspath(__file__)))
# --mini merges one of these (mmrepvgg/testing/configs/) over the config, and writes the
# synthetic dataset it reads (mmrepvgg.testing) where it is absent.
MINI_CONFIGS = {'mmseg': 'cityscapes.py', 'mmdet': 'coco.py'}
MINI_DATASETS = {'mmseg': 'cityscapes', 'mmdet': 'coco'}
MINI_NAMES = {'cityscapes': 'Cityscapes', 'coco': 'COCO'}
MINI_DIR = osp.join(PACKAGE_DIR, 'testing', 'configs')

#: The folder the package's configs have under ``.mim/configs`` (mmengine's ``pkg::``
#: paths need one): ``mmrepvgg::repvgg/pspnet_repvgg_b1g2_cityscapes.py``.
CONFIG_FOLDER = 'repvgg'
#: Where setup.py puts the repository's folders in an installed package.
MIM_PLACES = {'configs': osp.join('configs', CONFIG_FOLDER), 'tools': 'tools'}


def checkout_root() -> Optional[str]:
    """The repository this package is imported from (an editable install, or a checkout
    on the path), or None for an installed wheel."""
    root = osp.dirname(PACKAGE_DIR)
    return root if osp.isfile(osp.join(root, 'setup.py')) and \
        osp.isdir(osp.join(root, 'configs')) else None


def bundled_folder(kind: str) -> str:
    """The folder of the package's own ``'configs'`` or ``'tools'``: ``.mim/`` of an
    installed package, else the repository's ``configs/`` or ``tools/`` beside it."""
    if kind not in MIM_PLACES:
        raise ValueError(f'bundled_folder: {kind!r}; valid: {", ".join(MIM_PLACES)}')
    mim = osp.join(PACKAGE_DIR, '.mim', MIM_PLACES[kind])
    if osp.isdir(mim):
        return mim
    root = checkout_root()
    if root is not None and osp.isdir(osp.join(root, kind)):
        return osp.join(root, kind)
    raise InputError(f'this mmrepvgg ({PACKAGE_DIR}) carries no {kind}: neither '
                     f'{mim} (an installed wheel) nor a repository beside it; install '
                     'mmrepvgg from a wheel or an sdist, or from its repository')


def resolve_config(config: str) -> str:
    """The file of a config: ``config`` itself, or for ``pkg::folder/name.py`` the file
    the installed package carries in ``.mim/configs`` (mmengine's ``_base_`` syntax;
    ``mmrepvgg::repvgg/<name>.py`` is one of this package's configs)."""
    if '::' not in config or osp.exists(config):
        return config
    package, _, relative = config.partition('::')
    if package == 'mmrepvgg':
        folder, _, name = relative.partition('/')
        if folder != CONFIG_FOLDER or not name:
            raise InputError(f'{config}: the configs of mmrepvgg are named '
                             f'mmrepvgg::{CONFIG_FOLDER}/<name>.py, e.g. mmrepvgg::'
                             f'{CONFIG_FOLDER}/pspnet_repvgg_b1g2_cityscapes.py')
        path = osp.join(bundled_folder('configs'), name)
    else:
        from mmengine.config.utils import MODULE2PACKAGE
        from mmengine.utils import get_installed_path, is_installed
        if package not in MODULE2PACKAGE:
            raise InputError(f'{config}: mmengine serves pkg:: configs of '
                             f'{", ".join(sorted(MODULE2PACKAGE))}, not {package!r}')
        distribution = MODULE2PACKAGE[package]
        if not is_installed(distribution):
            raise InputError(f'{config}: {distribution} is not installed')
        path = osp.join(get_installed_path(distribution), '.mim', 'configs', relative)
    if not osp.isfile(path):
        raise InputError(f'config file not found: {config} ({path})')
    return path


def add_runner_args(parser: argparse.ArgumentParser) -> None:
    """The options every runner tool shares (train, test), as mmdet's tools name them."""
    parser.add_argument('--work-dir', help='where logs and checkpoints go')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config entries, e.g. model.backbone.arch=B2 '
             'train_dataloader.batch_size=4')
    parser.add_argument('--launcher', choices=LAUNCHERS, default='none',
                        help='job launcher (pytorch for torchrun)')
    parser.add_argument(
        '--mini', action='store_true',
        help='train/test on the synthetic mini dataset at CPU size (merges '
             'mmrepvgg/testing/configs/{cityscapes,coco}.py; the data is written to its '
             'data_root, data/mini_cityscapes or data/mini_coco, where absent)')
    # torchrun passes the rank in the environment; older launchers as an argument.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


# mpirun tells each process its rank on its node, under the name of its MPI
# implementation (Open MPI, MPICH / Intel MPI, MVAPICH).
MPI_LOCAL_RANK_VARIABLES = ('OMPI_COMM_WORLD_LOCAL_RANK', 'MPI_LOCALRANKID',
                            'MV2_COMM_WORLD_LOCAL_RANK')


def mpi_local_rank() -> int:
    """This process's rank on its node under mpirun."""
    for name in MPI_LOCAL_RANK_VARIABLES:
        if name in os.environ:
            return int(os.environ[name])
    raise UsageError('--launcher mpi: this process was not started by mpirun (none of '
                     f'{", ".join(MPI_LOCAL_RANK_VARIABLES)} is set)')


def load_config(config: str, work_dir: Optional[str] = None,
                cfg_options: Optional[dict] = None, launcher: str = 'none',
                mini: bool = False, local_rank: int = 0, write_mini: bool = True) -> Config:
    """``config`` (a file, or ``pkg::folder/name.py``: :func:`resolve_config`) read, with
    ``mini``'s data merged over it, then ``cfg_options``; the launcher and work dir set
    (work dir: argument > config > ./work_dirs/<config name>). ``mini`` also writes the
    synthetic dataset the config then reads where it is absent
    (:func:`write_mini_data`), unless ``write_mini`` is False."""
    config = resolve_config(config)
    if not osp.isfile(config):
        raise InputError(f'config file not found: {config}')
    if launcher not in LAUNCHERS:
        raise UsageError(f'unknown launcher {launcher!r}; valid: {", ".join(LAUNCHERS)}')
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(mpi_local_rank() if launcher == 'mpi' else local_rank)
    cfg = Config.fromfile(config)
    if mini:
        apply_mini(cfg)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if mini and write_mini:
        write_mini_data(cfg)
    cfg.launcher = launcher
    if work_dir:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(config))[0])
    return cfg


def apply_mini(cfg: Config) -> Config:
    """Merge the synthetic mini dataset of the config's task over it, at CPU size."""
    name = MINI_CONFIGS.get(scope_of(cfg))
    if name is None:
        raise UsageError(f'--mini supports mmseg and mmdet configs, not scope '
                         f'{scope_of(cfg)!r}')
    cfg.merge_from_dict(Config.fromfile(osp.join(MINI_DIR, name)).to_dict())
    return cfg


def _dataset_roots(cfg: Config) -> List[str]:
    """The ``data_root`` of the config's train, val and test datasets, once each."""
    roots = []
    for split in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        dataset = (cfg.get(split) or {}).get('dataset')
        while isinstance(dataset, dict) and 'dataset' in dataset:  # RepeatDataset etc.
            dataset = dataset['dataset']
        root = dataset.get('data_root') if isinstance(dataset, dict) else None
        if root and root not in roots:
            roots.append(root)
    return roots


def absent_mini_data(cfg: Config) -> List[Tuple[str, str]]:
    """(layout, data root) of each synthetic dataset a ``--mini`` config reads that is
    not there yet (no folder, or an empty one)."""
    layout = MINI_DATASETS.get(scope_of(cfg))
    if layout is None:
        return []
    return [(layout, root) for root in _dataset_roots(cfg)
            if not osp.isdir(root) or not os.listdir(root)]


def write_mini_data(cfg: Config, say: Optional[Callable[[str], None]] = None) -> List[str]:
    """Write the synthetic dataset (mmrepvgg.testing, as ``tools/make_mini_data.py``
    does) into each data root of a ``--mini`` config that lacks it, saying where in one
    line each; the paths written. Safe with several processes at once (the ranks of a
    distributed run, two tools): each writes beside the folder and renames its copy into
    place; one that finds the folder filled meanwhile leaves it as it is."""
    from ..testing.mini_data import (DEFAULT_NUM_TRAIN, DEFAULT_NUM_VAL, OutDirNotEmpty,
                                     make_cityscapes, make_coco)
    if say is None:
        from mmengine.logging import print_log

        def say(message):
            print_log(message, logger='current')
    written = []
    for layout, root in absent_mini_data(cfg):
        make = make_cityscapes if layout == 'cityscapes' else make_coco
        try:
            path = make(root)
        except OutDirNotEmpty as err:
            if osp.isdir(root) and os.listdir(root):
                continue  # another process wrote it first: complete, as it was renamed
            raise InputError(f'--mini writes the synthetic mini {MINI_NAMES[layout]} to '
                             f'{root}, but {root} is not a folder: move it away, or give '
                             'the config another data_root') from err
        say(f'--mini: wrote the synthetic mini {MINI_NAMES[layout]} ({DEFAULT_NUM_TRAIN} '
            f'train + {DEFAULT_NUM_VAL} val images) to {path}')
        written.append(path)
    return written


def apply_train_args(cfg: Config, amp: bool, resume: Optional[str]) -> Config:
    """``resume``: 'auto' for the work dir's latest checkpoint, or a local file (a URL
    is fetched by the caller, see :func:`mmrepvgg.apis.runner.resolve_checkpoint`)."""
    if amp:
        apply_amp(cfg)
    if resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif resume:
        cfg.resume, cfg.load_from = True, resume
    return cfg


#: Calibration images a quantization-aware fine-tune takes by default.
DEFAULT_QAT_CALIB = 32


def apply_qat(cfg: Config, checkpoint: Optional[str] = None, calib: int = DEFAULT_QAT_CALIB,
              split: str = 'train') -> Config:
    """The config's model as a :class:`mmrepvgg.QATModel`: with ``checkpoint`` (a local
    file), fine-tuned from those weights, its quantizers' ranges set on the first
    ``calib`` images of ``split`` read through the test pipeline; without, the quantizers
    come from the QAT checkpoint the runner loads (testing). The schedule and learning
    rate stay the config's (``--cfg-options`` sets a fine-tune's)."""
    from ..deploy.quantize import calibration_loader
    if cfg.model.get('type') in ('QATModel', 'mmrepvgg.QATModel'):
        return cfg  # a config a QAT run dumped: quantized already
    model = dict(type='mmrepvgg.QATModel', model=cfg.model)
    if checkpoint is not None:
        try:
            loader = calibration_loader(cfg, split)
        except ValueError as err:
            raise UsageError(f'error: {err}') from err
        model.update(checkpoint=checkpoint,
                     calibration=dict(dataloader=loader, num=calib, split=split))
        cfg.load_from = None  # QATModel loads it, before the quantizers go in
    cfg.model = model
    return cfg


# Devices whose autocast mmengine's AmpOptimWrapper supports (it asserts one in __init__).
AMP_DEVICES = ('cuda', 'npu', 'mlu', 'musa')


def apply_amp(cfg: Config) -> Config:
    """``--amp`` as mmdet's tools/train.py does it: an ``OptimWrapper`` becomes the mixed
    precision wrapper, one that already is stays as configured, any other type is refused.

    On CUDA (NPU, MLU, MUSA) that is mmengine's ``AmpOptimWrapper``, float16 with a
    dynamic loss scale unless the config sets ``loss_scale``. On CPU, where
    ``AmpOptimWrapper`` cannot be built, it is :class:`mmrepvgg.CPUAmpOptimWrapper`
    (bfloat16 autocast); a config's ``AmpOptimWrapper`` is turned into it there, dropping
    ``loss_scale`` (bfloat16 needs none).
    """
    import torch
    from mmengine.device import get_device
    from mmengine.logging import print_log
    from mmengine.optim import AmpOptimWrapper, OptimWrapper
    from mmengine.registry import OPTIM_WRAPPERS

    from ..engine.optim_wrapper import CPUAmpOptimWrapper
    device = get_device()  # where the Runner will put the model
    if device == 'cpu':
        amp_name, amp_cls = 'mmrepvgg.CPUAmpOptimWrapper', CPUAmpOptimWrapper
    elif device in AMP_DEVICES:
        amp_name, amp_cls = 'AmpOptimWrapper', AmpOptimWrapper
    else:
        raise UsageError(f'--amp trains in float16 on {", ".join(AMP_DEVICES)} or in '
                         f'bfloat16 on cpu; this machine runs on {device}')
    optim = cfg.get('optim_wrapper')
    if optim is None:
        raise UsageError('--amp needs an optim_wrapper in the config')
    kind = optim.get('type', 'OptimWrapper')
    # 'OptimWrapper', 'mmengine.OptimWrapper' or the class itself, as the builder reads it
    cls = OPTIM_WRAPPERS.get(kind) if isinstance(kind, str) else kind
    if isinstance(cls, type) and issubclass(cls, amp_cls):
        print_log(f'--amp: the config already trains in mixed precision ({amp_name})',
                  logger='current')
        return cfg
    if device == 'cpu' and cls is AmpOptimWrapper:
        dtype = optim.pop('dtype', None)
        if dtype not in (None, 'bfloat16', torch.bfloat16):
            raise UsageError(f'--amp on cpu trains in bfloat16; the config\'s '
                             f'AmpOptimWrapper asks for dtype={dtype!r}')
        optim.pop('loss_scale', None)
    elif cls is not OptimWrapper:  # exact: Apex and other subclasses are not converted
        name = kind if isinstance(kind, str) else getattr(kind, '__name__', repr(kind))
        converted = 'OptimWrapper or AmpOptimWrapper' if device == 'cpu' else 'OptimWrapper'
        raise UsageError(f'--amp on {device} needs an optim_wrapper of type {converted} '
                         f'(made {amp_name}) or {amp_name}, not {name!r}')
    optim.type = amp_name
    if amp_cls is AmpOptimWrapper:
        optim.setdefault('loss_scale', 'dynamic')
    else:
        print_log('--amp on cpu: bfloat16 autocast (mmrepvgg.CPUAmpOptimWrapper); '
                  "mmengine's AmpOptimWrapper needs CUDA, NPU, MLU or MUSA", logger='current')
    return cfg


def scope_of(cfg: Config) -> str:
    return cfg.get('default_scope') or 'mmengine'


def apply_test_args(cfg: Config, out: Optional[str] = None, show: bool = False,
                    show_dir: Optional[str] = None, wait_time: float = 2) -> Config:
    """``--out``, ``--show`` and ``--show-dir`` as mmdet's and mmseg's test tools apply
    them. The checkpoint is loaded by :func:`mmrepvgg.apis.test`, not through the config."""
    cfg.load_from = None
    scope = scope_of(cfg)
    if show or show_dir:
        if cfg.default_hooks.get('visualization') is None:
            raise UsageError('--show/--show-dir need default_hooks.visualization in the config')
        if scope == 'mmdet':  # mmdet ships the helper its tools/test.py uses
            from mmdet.engine.hooks.utils import trigger_visualization_hook
            trigger_visualization_hook(cfg, argparse.Namespace(
                show=show, wait_time=wait_time, show_dir=show_dir))
        else:  # mmseg keeps its helper in tools/test.py, outside the package: the same steps
            vis = cfg.default_hooks.visualization
            vis.draw = True
            if show:
                vis.show, vis.wait_time = True, wait_time
            if show_dir:
                cfg.visualizer.save_dir = show_dir  # mmseg's hook draws through it
    if out:
        if scope == 'mmdet':
            dump = dict(type='DumpDetResults', out_file_path=out)
            evaluators = cfg.test_evaluator
            cfg.test_evaluator = (list(evaluators) if isinstance(evaluators, (list, tuple))
                                  else [evaluators]) + [dump]
        elif scope == 'mmseg':
            cfg.test_evaluator.output_dir, cfg.test_evaluator.keep_results = out, True
        else:
            raise UsageError(f'--out is supported for mmdet and mmseg configs, not {scope!r}')
    return cfg


def is_reparam_hook(hook) -> bool:
    """Whether a ``custom_hooks`` entry is a ReparamHook: an instance, or a config whose
    type is the class (or a subclass), or a registered name of it in any scope."""
    from ..engine.hooks import ReparamHook
    from ..registry import HOOKS  # ours: finds 'ReparamHook' unscoped, and other scopes
    if isinstance(hook, ReparamHook):
        return True
    kind = hook.get('type') if isinstance(hook, dict) else None
    if isinstance(kind, str):
        kind = HOOKS.get(kind)  # 'ReparamHook', 'mmrepvgg.ReparamHook', ...
    return isinstance(kind, type) and issubclass(kind, ReparamHook)


def apply_deploy(cfg: Config, checkpoint: str, info: CheckpointInfo, deploy: bool) -> Config:
    """Build the model to match the form of ``checkpoint`` (``info`` says what it holds),
    and fuse at test time if asked."""
    if info.holds == 'backbone':
        raise InputError(f'error: {whole_model_needed(checkpoint, info, "testing")}')
    fused = info.deploy
    if fused and not deploy:
        raise InputError(f'{checkpoint} holds a fused (deploy) RepVGG model; test it with '
                         '--deploy, or give a training checkpoint')
    if not deploy:
        return cfg
    if fused:
        cfg.model.backbone.deploy = True  # load the fused weights as they are
    else:
        hooks: List = list(cfg.get('custom_hooks') or [])
        if not any(is_reparam_hook(h) for h in hooks):
            hooks.append(dict(type='mmrepvgg.ReparamHook'))
        cfg.custom_hooks = hooks
    return cfg
