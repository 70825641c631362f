"""Load a RepVGG backbone file of any supported layout into a backbone, with errors
that name the keys and shapes that do not match."""
import os
from typing import Any, Dict, Iterable, List, Optional

from torch import nn

from .fetch import load_file
from .layouts import list_examples, map_state_dict, split_by_form


def _named(keys: Iterable[str], origin: Dict[str, str]) -> List[str]:
    return [k if origin.get(k, k) == k else f'{k} (file: {origin[k]})' for k in keys]


def load_backbone_checkpoint(model: nn.Module, checkpoint: Any, logger: Any = None,
                             source: Optional[str] = None) -> Dict[str, Any]:
    """Load a RepVGG checkpoint of any supported layout into ``model``.

    ``model`` is any module whose state dict uses our naming (the backbone).
    ``checkpoint`` is a path, a URL (see :func:`mmrepvgg.load_file`) or an
    already-loaded object (``source`` then names it in messages). Every weight of the
    model must come from the file, except ``num_batches_tracked``, which
    official releases lack (the model's own value is kept).

    Returns the info dict of :func:`to_mmrepvgg` plus ``source``, ``loaded``
    (number of tensors), ``kept_from_model`` and ``unused_stages`` (tensors of stages
    the backbone does not build, see ``RepVGG.unbuilt_stages``, left unused).
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        source = os.fspath(checkpoint)
        checkpoint = load_file(source)
    elif source is None:
        source = 'the given checkpoint object'
    mapped, info, origin = map_state_dict(checkpoint)
    # A release holds every stage; a backbone whose out_indices end early builds fewer
    # (models.RepVGG.unbuilt_stages): those weights are left unused, not a mismatch.
    unbuilt = tuple(getattr(model, 'unbuilt_stages', ()))
    unused = [k for k in mapped if k.split('.', 1)[0] in unbuilt]
    mapped = {k: v for k, v in mapped.items() if k not in unused}
    target = model.state_dict()

    file_deploy, file_training = split_by_form(mapped)
    model_deploy, model_training = split_by_form(target)
    if file_deploy and model_training and not model_deploy:
        raise ValueError(
            f'{source} holds a deployed (re-parameterized) RepVGG, e.g. '
            f'{list_examples(_named(file_deploy, origin), 3)}, but the model is in '
            f'training form, e.g. {list_examples(model_training, 3)}. Build the '
            'backbone with deploy=True to load it (fused weights cannot be '
            'split back into training branches).')
    if file_training and model_deploy and not model_training:
        raise ValueError(
            f'{source} holds a training-form RepVGG, e.g. '
            f'{list_examples(_named(file_training, origin), 3)}, but the model is '
            f'deployed (fused), e.g. {list_examples(model_deploy, 3)}. Build the '
            'backbone with deploy=False, load the checkpoint and re-parameterize '
            'afterwards, or convert the checkpoint to deploy form first.')

    missing = [k for k in target if k not in mapped]
    kept = [k for k in missing if k.endswith('num_batches_tracked')]
    missing = [k for k in missing if k not in kept]
    unexpected = [k for k in mapped if k not in target]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f'{len(missing)} missing key(s): {list_examples(missing)}')
        if unexpected:
            parts.append(f'{len(unexpected)} unexpected key(s): '
                         f'{list_examples(_named(unexpected, origin))}')
        raise ValueError(
            f'{source} ({info["layout"]} layout) does not match the model: '
            + '; '.join(parts) + '. Is it for a different RepVGG arch '
            "(depths, SE) or block (block='repvgg' vs 'qa') than the one built?")

    mismatched = [f'{k}: file {tuple(mapped[k].shape)} vs model {tuple(v.shape)}'
                  for k, v in target.items()
                  if k in mapped and mapped[k].shape != v.shape]
    if mismatched:
        raise ValueError(
            f'{source} ({info["layout"]} layout) has {len(mismatched)} tensor(s) '
            f'whose shape differs from the model: {list_examples(mismatched)}. '
            'Is it for a different RepVGG arch (width multipliers, groups)?')

    full = dict(mapped)
    full.update({k: target[k] for k in kept})
    model.load_state_dict(full, strict=True)

    info.update(source=source, loaded=len(mapped), kept_from_model=kept,
                unused_stages=len(unused))
    from mmengine.logging import print_log
    logger = logger if logger is not None else 'current'
    print_log(f'loaded {len(mapped)} tensors from {source} ({info["layout"]} '
              f'layout, {"deploy" if info["deploy"] else "training"} form; '
              f'{len(info["dropped"])} non-backbone/head keys dropped)', logger=logger)
    if unused:
        print_log(f'{source}: {len(unused)} tensors of {", ".join(unbuilt)} left unused: '
                  f'out_indices={tuple(model.out_indices)} ends at stage '
                  f'{max(model.out_indices) + 1}, so the stages after it are not built',
                  logger=logger)
    return info
