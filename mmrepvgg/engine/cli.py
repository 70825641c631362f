"""Config preparation behind tools/train.py and tools/test.py (mmdet/mmseg semantics)."""
import argparse
import logging
import os
import os.path as osp
from typing import Optional

from mmengine.config import Config, DictAction

LAUNCHERS = ['none', 'pytorch', 'slurm', 'mpi']
# --mini merges one of these (from the repo's configs/_base_/mini/) over the config.
MINI_CONFIGS = {'mmseg': 'cityscapes.py', 'mmdet': 'coco.py'}


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--work-dir', help='where logs and checkpoints go')
    parser.add_argument(
        '--cfg-options', nargs='+', action=DictAction,
        help='override config entries, e.g. model.backbone.arch=B2 '
             'train_dataloader.batch_size=4')
    parser.add_argument('--launcher', choices=LAUNCHERS, default='none',
                        help='job launcher (pytorch for torchrun)')
    parser.add_argument(
        '--mini', action='store_true',
        help='train/test on the synthetic mini dataset of tools/make_mini_data.py at CPU '
             'size (merges configs/_base_/mini/{cityscapes,coco}.py)')
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
    raise SystemExit('--launcher mpi: this process was not started by mpirun (none of '
                     f'{", ".join(MPI_LOCAL_RANK_VARIABLES)} is set)')


def load_config(args: argparse.Namespace, mini_dir: Optional[str] = None) -> Config:
    if not osp.isfile(args.config):
        raise SystemExit(f'config file not found: {args.config}')
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(mpi_local_rank() if args.launcher == 'mpi' else
                                       args.local_rank)
    cfg = Config.fromfile(args.config)
    if getattr(args, 'mini', False):
        apply_mini(cfg, mini_dir)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.launcher = args.launcher
    # Precedence: command line > config > ./work_dirs/<config name>.
    if args.work_dir:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(args.config))[0])
    return cfg


def apply_mini(cfg: Config, mini_dir: str) -> Config:
    name = MINI_CONFIGS.get(scope_of(cfg))
    if name is None:
        raise SystemExit(f'--mini supports mmseg and mmdet configs, not scope '
                         f'{scope_of(cfg)!r}')
    cfg.merge_from_dict(Config.fromfile(osp.join(mini_dir, name)).to_dict())
    return cfg


def apply_train_args(cfg: Config, amp: bool, resume: Optional[str]) -> Config:
    if amp:
        apply_amp(cfg)
    if resume == 'auto':
        cfg.resume, cfg.load_from = True, None
    elif resume:
        cfg.resume, cfg.load_from = True, resolve_checkpoint(resume)
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

    from .optim_wrapper import CPUAmpOptimWrapper
    device = get_device()  # where the Runner will put the model
    if device == 'cpu':
        amp_name, amp_cls = 'mmrepvgg.CPUAmpOptimWrapper', CPUAmpOptimWrapper
    elif device in AMP_DEVICES:
        amp_name, amp_cls = 'AmpOptimWrapper', AmpOptimWrapper
    else:
        raise SystemExit(f'--amp trains in float16 on {", ".join(AMP_DEVICES)} or in '
                         f'bfloat16 on cpu; this machine runs on {device}')
    optim = cfg.get('optim_wrapper')
    if optim is None:
        raise SystemExit('--amp needs an optim_wrapper in the config')
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
            raise SystemExit(f'--amp on cpu trains in bfloat16; the config\'s '
                             f'AmpOptimWrapper asks for dtype={dtype!r}')
        optim.pop('loss_scale', None)
    elif cls is not OptimWrapper:  # exact: Apex and other subclasses are not converted
        name = kind if isinstance(kind, str) else getattr(kind, '__name__', repr(kind))
        converted = 'OptimWrapper or AmpOptimWrapper' if device == 'cpu' else 'OptimWrapper'
        raise SystemExit(f'--amp on {device} needs an optim_wrapper of type {converted} '
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


def apply_test_args(cfg: Config, checkpoint: Optional[str], out: Optional[str] = None,
                    show: bool = False, show_dir: Optional[str] = None,
                    wait_time: float = 2) -> Config:
    cfg.load_from = resolve_checkpoint(checkpoint) if checkpoint else None
    scope = scope_of(cfg)
    if show or show_dir:
        if cfg.default_hooks.get('visualization') is None:
            raise SystemExit('--show/--show-dir need default_hooks.visualization in the config')
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
            raise SystemExit(f'--out is supported for mmdet and mmseg configs, not {scope!r}')
    return cfg


_OWN_PROCESS_GROUP = False  # set when prepare_cpu_distributed started the group


def prepare_cpu_distributed(cfg: Config) -> Config:
    """Let ``--launcher pytorch`` run on a machine without CUDA (gloo backend).

    mmengine 0.10's pytorch launcher calls ``torch.cuda.set_device`` before
    ``init_process_group`` and wraps the model in DDP with ``device_ids=[LOCAL_RANK]``;
    both fail on CPU. Start the process group here (the Runner then skips its own init)
    and build DDP without device ids. torch's SyncBatchNorm is GPU-only (DDP refuses it
    on CPU), so SyncBN layers become per-process BN there, with a warning.
    """
    import datetime

    import torch
    import torch.distributed as dist
    if cfg.get('launcher') != 'pytorch' or torch.cuda.is_available():
        return cfg
    dist_cfg = dict((cfg.get('env_cfg') or {}).get('dist_cfg') or {})
    backend = dist_cfg.pop('backend', 'gloo')
    if backend == 'nccl':
        raise SystemExit('the nccl backend needs CUDA; on CPU add --cfg-options '
                         'env_cfg.dist_cfg.backend=gloo')
    if 'timeout' in dist_cfg and not isinstance(dist_cfg['timeout'], datetime.timedelta):
        dist_cfg['timeout'] = datetime.timedelta(seconds=dist_cfg['timeout'])
    global _OWN_PROCESS_GROUP
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, **dist_cfg)
        _OWN_PROCESS_GROUP = True
    reverted = _sync_bn_to_bn(cfg.get('model'))
    if reverted or cfg.get('sync_bn'):
        from mmengine.logging import print_log
        cfg.sync_bn = None
        print_log(f'SyncBN does not run on CPU (torch: "SyncBatchNorm layers only work '
                  f'with GPU modules"); {reverted} SyncBN layer configs use per-process BN '
                  'in this distributed CPU run', logger='current', level=logging.WARNING)
    wrapper = cfg.get('model_wrapper_cfg')
    if wrapper is None:
        cfg.model_wrapper_cfg = dict(
            type='MMDistributedDataParallel', device_ids=None, broadcast_buffers=False,
            find_unused_parameters=cfg.get('find_unused_parameters', False))
    else:
        wrapper.setdefault('device_ids', None)
    return cfg


def finish_distributed() -> None:
    """End the process group that :func:`prepare_cpu_distributed` started, after a
    successful run. The ranks meet first: one that exits while the other still has gloo
    traffic in flight makes that one abort ('terminate called without an active
    exception') and torchrun report the run as failed."""
    global _OWN_PROCESS_GROUP
    import torch.distributed as dist
    if _OWN_PROCESS_GROUP and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _OWN_PROCESS_GROUP = False


def _sync_bn_to_bn(node) -> int:
    """Turn every ``type='SyncBN'`` norm config under ``node`` into BN; how many."""
    count = 0
    if isinstance(node, dict):
        if node.get('type') in ('SyncBN', 'MMSyncBN'):
            node['type'] = 'BN'
            count += 1
        for value in node.values():
            count += _sync_bn_to_bn(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            count += _sync_bn_to_bn(value)
    return count


def build_runner(cfg: Config):
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    from ..env import cuda_unusable_reason
    # A GPU machine whose GPU torch cannot use would otherwise train on the CPU unsaid.
    unusable = cuda_unusable_reason()
    if unusable:
        raise SystemExit(f'error: {unusable}. To run on the CPU anyway, hide the GPU '
                         '(CUDA_VISIBLE_DEVICES=); python tools/check_env.py says more.')
    cfg = prepare_cpu_distributed(cfg)
    if 'runner_type' in cfg:
        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)


def attach_backend(runner, onnx_file: str, backend: str, precision: str) -> None:
    """Run the exported network of ``onnx_file`` in ``backend`` inside the runner's model
    (see :func:`mmrepvgg.deploy.use_backend`); bad files end the tool with the reason."""
    from mmengine.model import is_model_wrapper

    from ..deploy import use_backend
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    try:
        used = use_backend(model, onnx_file, backend, precision)
    except (OSError, ValueError) as err:
        raise SystemExit(f'error: {err}')
    log = runner.logger.info
    if used.precision_used != precision:  # OpenVINO on a CPU without bfloat16
        log = runner.logger.warning
    if used.quantized:
        log(f'testing the INT8 (QDQ) model {onnx_file} in {backend} (ops left in float run '
            f'{used.precision_used}); the rest of the model runs in torch')
        return
    log(f'testing {onnx_file} in {backend} (asked {precision}, runs '
        f'{used.precision_used}); the rest of the model runs in torch')


def resolve_checkpoint(checkpoint: str) -> str:
    """The local file the runner should read for CHECKPOINT (a path, a URL or a model-zoo
    name such as open-mmlab://...): a remote one is downloaded once into torch's cache.
    The runner then reads a local file with weights_only loading; given the URL, mmengine
    would read it through torch.hub, which unpickles with weights_only=False."""
    from ..fetch import fetch_checkpoint
    try:
        return fetch_checkpoint(checkpoint)
    except (OSError, ValueError) as err:  # failed download, unknown scheme or name
        raise SystemExit(f'error: {err}')


def describe_checkpoint_file(path: str):
    """What the checkpoint at ``path`` (a file or URL, see :func:`mmrepvgg.load_file`)
    holds: a :class:`mmrepvgg.checkpoint.CheckpointInfo`. A missing or unreadable file is
    an error."""
    from ..checkpoint import describe_checkpoint
    from ..fetch import load_file
    return describe_checkpoint(load_file(path))


def is_reparam_hook(hook) -> bool:
    """Whether a ``custom_hooks`` entry is a ReparamHook: an instance, or a config whose
    type is the class (or a subclass), or a registered name of it in any scope."""
    from ..registry import HOOKS  # ours: finds 'ReparamHook' unscoped, and other scopes
    from .hooks import ReparamHook
    if isinstance(hook, ReparamHook):
        return True
    kind = hook.get('type') if isinstance(hook, dict) else None
    if isinstance(kind, str):
        kind = HOOKS.get(kind)  # 'ReparamHook', 'mmrepvgg.ReparamHook', ...
    return isinstance(kind, type) and issubclass(kind, ReparamHook)


def apply_deploy(cfg: Config, checkpoint: str, deploy: bool) -> Config:
    """Build the model to match the checkpoint's form, and fuse at test time if asked."""
    from ..checkpoint import whole_model_needed
    try:
        info = describe_checkpoint_file(checkpoint)
    except (OSError, ValueError, TypeError) as err:  # missing, not downloaded, corrupt, ...
        raise SystemExit(f'error: {err}')
    if info.holds == 'backbone':
        raise SystemExit(f'error: {whole_model_needed(checkpoint, info, "testing")}')
    fused = info.deploy
    if fused and not deploy:
        raise SystemExit(f'{checkpoint} holds a fused (deploy) RepVGG model; test it with '
                         '--deploy, or give a training checkpoint')
    if not deploy:
        return cfg
    if fused:
        cfg.model.backbone.deploy = True  # load the fused weights as they are
    else:
        hooks = list(cfg.get('custom_hooks') or [])
        if not any(is_reparam_hook(h) for h in hooks):
            hooks.append(dict(type='mmrepvgg.ReparamHook'))
        cfg.custom_hooks = hooks
    return cfg
