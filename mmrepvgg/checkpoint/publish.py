"""A trained checkpoint made fit to publish: the weights and meta only (no optimizer,
scheduler or message-hub state), named after its content in torch hub's convention
(``name-<first 8 hex digits of its sha256>.pth``), so a download can be checked."""
import os
import os.path as osp

from ..fileio import sha256_file, temporary_beside
from .fetch import load_file

__all__ = ['publish_checkpoint']

#: What a runner checkpoint holds besides what a user of the weights needs.
_TRAINING_STATE = ('optimizer', 'param_schedulers', 'message_hub', 'scaler')


def publish_checkpoint(checkpoint: str, out_dir: str, name: str) -> str:
    """Write ``out_dir/name-<sha256[:8]>.pth`` from ``checkpoint`` (a runner checkpoint)
    and return its path; an existing file of that content is kept as it is."""
    import torch
    state = load_file(checkpoint)
    if not isinstance(state, dict) or 'state_dict' not in state:
        raise ValueError(f'{checkpoint} is not a runner checkpoint (no state_dict)')
    kept = {k: v for k, v in state.items() if k not in _TRAINING_STATE}
    os.makedirs(out_dir, exist_ok=True)
    tmp = temporary_beside(osp.join(out_dir, f'{name}.pth'))
    try:
        torch.save(kept, tmp)
        final = osp.join(out_dir, f'{name}-{sha256_file(tmp)[:8]}.pth')
        os.replace(tmp, final)  # the name is known only once the content is written
    finally:
        if osp.exists(tmp):
            os.remove(tmp)
    return final
