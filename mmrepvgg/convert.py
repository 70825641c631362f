"""Checkpoint conversions behind tools/convert.py, written atomically.

- ``fuse_checkpoint``: a trained model (any mmdet/mmseg config) to its deploy form.
- ``convert_release``: an official / mmpretrain / timm release file to this project's
  backbone layout, so configs can load it with ``init_cfg=dict(type='Pretrained', ...)``.
"""
import os.path as osp
from typing import Optional

from mmengine.config import Config

from .checkpoint.backbone import load_backbone_checkpoint
from .checkpoint.fetch import fetch_and_load, is_remote_checkpoint
from .checkpoint.layouts import describe_checkpoint, to_mmrepvgg, whole_model_needed
from .fileio import save_atomic
from .reparam import format_report, fuse_and_report


def _read(checkpoint: str, dst: Optional[str] = None, loaded: Optional[tuple] = None):
    """``checkpoint`` (a path, or a URL downloaded once into torch's cache) read once,
    after making sure the output ``dst`` is not that file. ``loaded``: what
    ``fetch_and_load(checkpoint)`` gave already (not read again)."""
    src, state = loaded or fetch_and_load(checkpoint)
    if dst is not None and not is_remote_checkpoint(src) and (
            osp.abspath(src) == osp.abspath(dst)
            or (osp.exists(dst) and osp.samefile(src, dst))):
        raise ValueError(f'output {dst} is the input checkpoint; choose another path, the '
                         'input is never overwritten')
    return state


def read_model_checkpoint(checkpoint: str, part: Optional[str] = 'model',
                          request: str = 'the request', avoid: Optional[str] = None,
                          loaded: Optional[tuple] = None):
    """``(state, CheckpointInfo)`` of ``checkpoint``. ``part``: 'model' needs a whole
    model's weights (a backbone release is refused, naming ``request``); 'backbone' or
    None also take a backbone file. ``avoid``: an output path that must not be the
    checkpoint itself; ``loaded``: see :func:`_read`."""
    source = _read(checkpoint, avoid, loaded)
    if not isinstance(source, dict):
        raise ValueError(f'{checkpoint} does not hold a state dict (got {type(source)})')
    info = describe_checkpoint(source)
    if info.holds == 'backbone' and part == 'model':
        raise ValueError(whole_model_needed(checkpoint, info, request))
    return source, info


def _source_name(checkpoint: str) -> str:
    # a URL is kept whole (where the weights came from); a local path only by file name
    return checkpoint if is_remote_checkpoint(checkpoint) else osp.basename(checkpoint)


def build_model_from_config(config: str, cfg_options: Optional[dict] = None):
    from mmengine.registry import MODELS, init_default_scope
    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmengine'))
    model = MODELS.build(cfg.model)
    return cfg, model


def _load_and_fuse(config: str, checkpoint: str, cfg_options: Optional[dict],
                   avoid: Optional[str], probe: bool = True, part: Optional[str] = 'model',
                   request: str = 'the request', loaded: Optional[tuple] = None):
    """Build ``config``'s model with ``checkpoint``'s weights and fuse it.

    ``part``: 'model' needs a whole model's weights, 'backbone' also takes a backbone
    release (loaded into ``model.backbone``), None takes either. ``request`` names the
    caller in the error for a backbone file where a whole model is needed.
    Returns ``(cfg, model, report, source object, CheckpointInfo)``.
    """
    from mmengine.runner import load_state_dict

    source, info = read_model_checkpoint(checkpoint, part, request, avoid, loaded)
    options = dict(cfg_options or {})
    if info.deploy:
        options['model.backbone.deploy'] = True  # load the fused weights as they are
    cfg, model = build_model_from_config(config, options)
    if info.holds == 'backbone':
        load_backbone_checkpoint(model.backbone, source, source=checkpoint)
    else:
        load_state_dict(model, source.get('state_dict', source), strict=True)
    model.eval()
    report = None if info.deploy else fuse_and_report(
        model.backbone if info.holds == 'backbone' else model, probe=probe)
    return cfg, model, report, source, info


def load_fused_model(config: str, checkpoint: str, cfg_options: Optional[dict] = None,
                     avoid: Optional[str] = None, part: str = 'model',
                     loaded: Optional[tuple] = None):
    """Build the config's model with ``checkpoint``'s weights (training or fused form, a
    path or a URL, read once) and fuse it in eval mode.

    With ``part='backbone'`` the checkpoint may also be a backbone release (official,
    mmpretrain, timm, or this project's layout), loaded into the model's backbone; the
    rest of the model keeps its initial weights then.

    Returns ``(cfg, model, report)``: the fusion report, or None when the checkpoint was
    already fused (the model is then built in deploy form). ``avoid`` names an output
    path that must not be the checkpoint itself; ``loaded``: what ``fetch_and_load``
    gave for ``checkpoint`` already.
    """
    return _load_and_fuse(config, checkpoint, cfg_options, avoid, part=part,
                          request='exporting the whole network', loaded=loaded)[:3]


def fuse_checkpoint(config: str, checkpoint: str, output: str, probe: bool = True,
                    cfg_options: Optional[dict] = None) -> dict:
    """Load a training checkpoint into the config's model, fuse it, save the deploy form.

    ``checkpoint`` may be a URL, a whole model's checkpoint (the whole model is saved
    fused) or a backbone release (the config's backbone is loaded with it and saved
    fused, in this project's key layout, for ``init_cfg`` or ``--part backbone``).
    Returns the fusion report (blocks, params before/after, max probe difference).
    """
    _, model, report, source, info = _load_and_fuse(config, checkpoint, cfg_options,
                                                    output, probe, part=None)
    if report is None or not report['blocks']:
        what = ('it is fused already' if report is None else format_report(report))
        raise ValueError(f'nothing to fuse in {checkpoint} with {config}: {what}')
    meta = dict(source.get('meta') or {}) if info.holds == 'model' else {}
    meta.update(mmrepvgg_deploy=True, source_checkpoint=_source_name(checkpoint))
    weights = model.state_dict() if info.holds == 'model' else model.backbone.state_dict()
    save_atomic(dict(meta=meta, state_dict=weights), output)
    return report


def convert_release(checkpoint: str, output: str) -> dict:
    """Map a release file's keys (a path or a URL) onto this project's backbone layout,
    head dropped."""
    # the whole object, so a whole model's non-backbone keys count as dropped
    state, info = to_mmrepvgg(_read(checkpoint, output))
    save_atomic(dict(meta=dict(source_checkpoint=_source_name(checkpoint),
                               source_layout=info['layout'], mmrepvgg_deploy=info['deploy']),
                     state_dict=state), output)
    return info
