"""Runs of a prepared config: the runner built (and on CPU its process group started), a
checkpoint fetched and loaded once, and the training and test entry points the tools
call. ``train`` and ``test`` take explicit arguments, so scripts call them as the tools do."""
import logging
import os.path as osp
from typing import Optional

from mmengine.config import Config

from ..checkpoint.fetch import fetch_and_load, fetch_checkpoint
from ..checkpoint.layouts import describe_checkpoint
from ..engine.hooks import LoadReadCheckpoint, UseRecipe
from ..env import cuda_unusable_reason
from ..errors import InputError, MachineError, UsageError
from ..qat import is_qat_state
from .config import (DEFAULT_QAT_CALIB, apply_deploy, apply_qat, apply_test_args,
                     apply_train_args, load_config)

__all__ = ['train', 'test', 'build_runner', 'resolve_checkpoint', 'finish_distributed']


def train(config: str, work_dir: Optional[str] = None, cfg_options: Optional[dict] = None,
          launcher: str = 'none', mini: bool = False, amp: bool = False,
          resume: Optional[str] = None, local_rank: int = 0, qat: Optional[str] = None,
          calib: int = DEFAULT_QAT_CALIB, calib_split: str = 'train'):
    """Train ``config`` as ``tools/train.py`` does; ``resume``: 'auto' (the work dir's
    latest checkpoint), or a checkpoint file or URL. ``qat``: fine-tune the model of this
    trained checkpoint (file or URL) with INT8 fake quantization, ranges calibrated on
    ``calib`` images of ``calib_split`` (:func:`mmrepvgg.apis.config.apply_qat`).
    Returns the runner."""
    cfg = load_config(config, work_dir, cfg_options, launcher, mini, local_rank)
    if resume and resume != 'auto':
        resume = resolve_checkpoint(resume)
    if qat:
        local = resolve_checkpoint(qat)
        if not osp.isfile(local):
            raise InputError(f'error: the --qat checkpoint {qat} does not exist')
        cfg = apply_qat(cfg, local, calib, calib_split)
    cfg = apply_train_args(cfg, amp, resume)
    runner = build_runner(cfg)
    runner.train()
    finish_distributed()
    return runner


def test(config: str, checkpoint: str, deploy: bool = False, backend: Optional[str] = None,
         precision: str = 'fp32', out: Optional[str] = None, show: bool = False,
         show_dir: Optional[str] = None, wait_time: float = 2,
         work_dir: Optional[str] = None, cfg_options: Optional[dict] = None,
         launcher: str = 'none', mini: bool = False, local_rank: int = 0,
         mode: Optional[str] = None) -> dict:
    """Evaluate ``checkpoint`` with the config's own evaluator, as ``tools/test.py`` does.

    ``deploy``: the fused model (a training checkpoint fused by ReparamHook, a fused one
    loaded as it is). ``backend``: ``checkpoint`` is an exported file, run in that backend
    (:func:`mmrepvgg.deploy.use_backend`) in ``precision``. ``mode`` (one of
    ``mmrepvgg.ops.MODES``), or a ``precision`` other than fp32 without ``backend``: the
    network runs in torch with that recipe of ``optimize_for_inference``
    (:class:`UseRecipe`). A URL is fetched once, and the file is read once: the form
    check and the model see the same object. Returns the metrics.
    """
    cfg = load_config(config, work_dir, cfg_options, launcher, mini, local_rank)
    state, source = None, checkpoint
    recipe = _recipe(cfg, backend, mode, precision)
    if backend:
        if deploy:
            raise UsageError('--deploy fuses a checkpoint; an exported file is fused '
                             'already: drop --deploy')
    else:
        try:
            source, state = fetch_and_load(checkpoint)
            qat = is_qat_state(state)
            info = None if qat else describe_checkpoint(state)
        except (OSError, ValueError, TypeError) as err:  # missing, failed download,
            raise InputError(f'error: {err}') from err  # corrupt, not ours
        # a QAT checkpoint holds the fused network already: --deploy changes nothing
        cfg = apply_qat(cfg) if qat else apply_deploy(cfg, source, info, deploy)
    cfg = apply_test_args(cfg, out, show, show_dir, wait_time)
    runner = build_runner(cfg)
    if backend:
        run_backend_in(runner, checkpoint, backend, precision)
    else:
        runner.register_hook(LoadReadCheckpoint(state, source), priority='LOWEST')
    if recipe:
        runner.register_hook(recipe, priority='LOWEST')
    metrics = runner.test()
    finish_distributed()
    return metrics


def _recipe(cfg: Config, backend: Optional[str], mode: Optional[str],
            precision: str) -> Optional[UseRecipe]:
    """The :class:`UseRecipe` hook ``mode`` and ``precision`` ask for, or None (the
    model as built, or the backend's arithmetic)."""
    from ..ops.inference import MODES
    if backend:
        if mode:
            raise UsageError(f'--mode {mode} prepares the network in torch; --backend '
                             f'{backend} runs the exported file: give one of them')
        return None
    if mode is None and precision == 'fp32':
        return None
    if mode is not None and mode not in MODES:
        raise UsageError(f'unknown --mode {mode!r}; valid: {", ".join(MODES)}')
    from ..deploy.export import config_input_shape
    shape = config_input_shape(cfg)
    if shape is None:
        raise UsageError('--mode/--precision prepare the network for the test images\' '
                         'size, and the config\'s test pipeline gives none (no Resize '
                         'scale)')
    batch = cfg.test_dataloader.get('batch_size', 1)
    return UseRecipe(mode or 'eager', precision, [batch, 3, *shape])


def resolve_checkpoint(checkpoint: str) -> str:
    """The local file the runner should read for CHECKPOINT (a path, a URL or a model-zoo
    name such as open-mmlab://...): a remote one is downloaded once into torch's cache.
    The runner then reads a local file with weights_only loading; given the URL, mmengine
    would read it through torch.hub, which unpickles with weights_only=False."""
    try:
        return fetch_checkpoint(checkpoint)
    except (OSError, ValueError) as err:  # failed download, unknown scheme or name
        raise InputError(f'error: {err}') from err


def build_runner(cfg: Config):
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    # A GPU machine whose GPU torch cannot use would otherwise train on the CPU unsaid.
    unusable = cuda_unusable_reason()
    if unusable:
        raise MachineError(f'error: {unusable}. To run on the CPU anyway, hide the GPU '
                         '(CUDA_VISIBLE_DEVICES=); python tools/check_env.py says more.')
    cfg = prepare_cpu_distributed(cfg)
    if 'runner_type' in cfg:
        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)


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
        raise UsageError('the nccl backend needs CUDA; on CPU add --cfg-options '
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


def run_backend_in(runner, onnx_file: str, backend: str, precision: str) -> None:
    """Run the exported network of ``onnx_file`` in ``backend`` inside the runner's model
    (see :func:`mmrepvgg.deploy.use_backend`); bad files end the tool with the reason."""
    from mmengine.model import is_model_wrapper

    from ..deploy import use_backend
    model = runner.model.module if is_model_wrapper(runner.model) else runner.model
    try:
        used = use_backend(model, onnx_file, backend, precision)
    except (OSError, ValueError) as err:
        raise InputError(f'error: {err}') from err
    log = runner.logger.info
    if used.precision_used != precision:  # OpenVINO on a CPU without bfloat16
        log = runner.logger.warning
    if used.quantized:
        log(f'testing the INT8 (QDQ) model {onnx_file} in {backend} (ops left in float run '
            f'{used.precision_used}); the rest of the model runs in torch')
        return
    log(f'testing {onnx_file} in {backend} (asked {precision}, runs '
        f'{used.precision_used}); the rest of the model runs in torch')
