"""Checkpoint files users bring: the layouts (official, mmpretrain, timm, ours; training
or fused form) and their key mapping, safe weights-only loading, fetching of URLs, the
ImageNet weights per arch, and (``convert``) conversion of whole checkpoints."""
from .backbone import load_backbone_checkpoint
from .fetch import (CheckpointDownloadError, fetch_and_load, fetch_checkpoint,
                    is_remote_checkpoint, load_file)
from .layouts import (LAYOUTS, CheckpointInfo, describe_checkpoint, detect_layout,
                      extract_state_dict, fused_form, to_mmrepvgg, whole_model_needed)
from .loading import (UnsafeCheckpointError, allow_mmengine_checkpoint_types,
                      torch_load_safely)
from .zoo import IMAGENET_WEIGHTS, imagenet_checkpoint

__all__ = ['LAYOUTS', 'CheckpointInfo', 'CheckpointDownloadError', 'IMAGENET_WEIGHTS',
           'UnsafeCheckpointError', 'allow_mmengine_checkpoint_types', 'describe_checkpoint',
           'detect_layout', 'extract_state_dict', 'fetch_and_load', 'fetch_checkpoint',
           'fused_form', 'imagenet_checkpoint', 'is_remote_checkpoint',
           'load_backbone_checkpoint', 'load_file', 'to_mmrepvgg', 'torch_load_safely',
           'whole_model_needed']
