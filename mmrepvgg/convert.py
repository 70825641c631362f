"""Checkpoint conversions behind tools/convert.py, written atomically.

- ``fuse_checkpoint``: a trained model (any mmdet/mmseg config) to its deploy form.
- ``convert_release``: an official / mmpretrain / timm release file to this project's
  backbone layout, so configs can load it with ``init_cfg=dict(type='Pretrained', ...)``.
"""
import contextlib
import os
import os.path as osp
import tempfile
from typing import Optional

import torch
from mmengine.config import Config

from .checkpoint import to_mmrepvgg
from .compat import fetch_checkpoint, is_remote_checkpoint, load_file
from .engine.hooks import format_report, fuse_and_report


def _fetch_and_check(checkpoint: str, dst: str) -> str:
    """The local file to read for ``checkpoint`` (a path, or a URL downloaded once into
    torch's cache), after making sure ``dst`` is not that file."""
    src = fetch_checkpoint(checkpoint)
    if is_remote_checkpoint(src):  # pavi://, s3://: read by mmengine's backend
        return src
    if not osp.isfile(src):
        raise FileNotFoundError(f'checkpoint not found: {src}')
    if osp.abspath(src) == osp.abspath(dst) or (osp.exists(dst) and osp.samefile(src, dst)):
        raise ValueError(f'output {dst} is the input checkpoint; choose another path, the '
                         'input is never overwritten')
    return src


def _source_name(checkpoint: str) -> str:
    # a URL is kept whole (where the weights came from); a local path only by file name
    return checkpoint if is_remote_checkpoint(checkpoint) else osp.basename(checkpoint)


def temporary_beside(path: str, suffix: str = '.tmp') -> str:
    """A new empty file beside ``path`` (the same filesystem, so renaming it onto
    ``path`` is atomic), with the permissions a plain ``open(path, 'w')`` would give."""
    folder = osp.dirname(osp.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + osp.basename(path), suffix=suffix)
    os.close(fd)
    umask = os.umask(0)  # mkstemp makes 0600; read the umask (only settable) and restore
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    return tmp


@contextlib.contextmanager
def staged_files():
    """Write several files that appear together: ``stage(path, suffix)`` gives a
    temporary file beside ``path``, ``publish(*paths)`` renames the staged files onto
    their paths in that order (the main file last, so it never exists without its
    companions); whatever was not published is removed when the block ends."""
    staged = {}

    def stage(path: str, suffix: str = '.tmp') -> str:
        staged[path] = temporary_beside(path, suffix)
        return staged[path]

    def publish(*paths: str) -> None:
        for path in paths:
            os.replace(staged.pop(path), path)

    try:
        yield stage, publish
    finally:
        for tmp in staged.values():
            if osp.exists(tmp):
                os.remove(tmp)


def save_atomic(obj, path: str) -> None:
    """Write to a temporary file beside ``path`` and rename it into place, so a crash
    never leaves a half-written file where the user expects a checkpoint."""
    tmp = temporary_beside(path)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise


def build_model_from_config(config: str, cfg_options: Optional[dict] = None):
    from mmengine.registry import MODELS, init_default_scope
    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmengine'))
    model = MODELS.build(cfg.model)
    return cfg, model


def _load_and_fuse(config: str, checkpoint: str, cfg_options: Optional[dict],
                   avoid: Optional[str], probe: bool = True):
    from mmengine.runner import load_state_dict

    from .checkpoint import fused_form
    source = load_file(_fetch_and_check(checkpoint, avoid) if avoid else
                       fetch_checkpoint(checkpoint))
    if not isinstance(source, dict):
        raise ValueError(f'{checkpoint} does not hold a state dict (got {type(source)})')
    fused = bool(fused_form(source))  # None: no RepVGG backbone (e.g. a ResNet)
    options = dict(cfg_options or {})
    if fused:
        options['model.backbone.deploy'] = True  # load the fused weights as they are
    cfg, model = build_model_from_config(config, options)
    load_state_dict(model, source.get('state_dict', source), strict=True)
    model.eval()
    report = None if fused else fuse_and_report(model, probe=probe)
    return cfg, model, report, source


def load_fused_model(config: str, checkpoint: str, cfg_options: Optional[dict] = None,
                     avoid: Optional[str] = None):
    """Build the config's model with ``checkpoint``'s weights (training or fused form, a
    path or a URL, read once) and fuse it in eval mode.

    Returns ``(cfg, model, report)``: the fusion report, or None when the checkpoint was
    already fused (the model is then built in deploy form). ``avoid`` names an output
    path that must not be the checkpoint itself.
    """
    return _load_and_fuse(config, checkpoint, cfg_options, avoid)[:3]


def fuse_checkpoint(config: str, checkpoint: str, output: str, probe: bool = True,
                    cfg_options: Optional[dict] = None) -> dict:
    """Load a training checkpoint into the config's model, fuse it, save the deploy form.

    ``checkpoint`` may be a URL. Returns the fusion report (blocks, params before/after,
    max probe difference).
    """
    _, model, report, source = _load_and_fuse(config, checkpoint, cfg_options, output, probe)
    if report is None or not report['blocks']:
        what = ('it is fused already' if report is None else format_report(report))
        raise ValueError(f'nothing to fuse in {checkpoint} with {config}: {what}')
    meta = dict(source.get('meta') or {})
    meta.update(mmrepvgg_deploy=True, source_checkpoint=_source_name(checkpoint))
    save_atomic(dict(meta=meta, state_dict=model.state_dict()), output)
    return report


def convert_release(checkpoint: str, output: str) -> dict:
    """Map a release file's keys (a path or a URL) onto this project's backbone layout,
    head dropped."""
    # the whole object, so a whole model's non-backbone keys count as dropped
    state, info = to_mmrepvgg(load_file(_fetch_and_check(checkpoint, output)))
    save_atomic(dict(meta=dict(source_checkpoint=_source_name(checkpoint),
                               source_layout=info['layout'], mmrepvgg_deploy=info['deploy']),
                     state_dict=state), output)
    return info
