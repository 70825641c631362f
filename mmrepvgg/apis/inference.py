"""Predictions on a user's own images and videos, from every form of a model, as
``tools/infer.py`` makes them.

The config's own inferencer does the work: mmdet's ``DetInferencer`` or mmseg's
``MMSegInferencer``, with their test pipeline, post-processing and visualizer. The model
may be

* a checkpoint, training form (the 3-branch network; ``deploy=True`` fuses it after
  loading) or fused form (the backbone is then built in deploy form, as ``tools/test.py
  --deploy`` builds it);
* an exported file of ``tools/export.py`` or ``tools/quantize.py``: an ONNX file run in
  ONNX Runtime or OpenVINO (fp32, OpenVINO also bf16; an INT8 file runs as quantized),
  or an AOTInductor package (``.pt2``). The inferencer's model then computes its network
  with the file (:func:`mmrepvgg.deploy.use_backend`, as ``tools/test.py --backend``
  does) and the rest in torch, its own post-processing included.

:func:`infer` writes what the inferencers write under ``out_dir`` (``vis/`` pictures,
``preds/`` JSON), one complete file at a time (each written beside its place and renamed
into it), so an interrupted run leaves no partial picture.
"""
import json
import os
import os.path as osp
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..deploy.backends import BACKEND_PRECISIONS
from ..errors import InputError, UsageError
from ..fileio import staged_files
from .config import load_config, scope_of

__all__ = ['IMAGE_EXTENSIONS', 'VIDEO_EXTENSIONS', 'collect_inputs', 'init_inferencer',
           'predict_image', 'write_predictions', 'infer', 'side_by_side', 'write_picture']

#: Pictures the inputs may be (what OpenCV decodes; mmdet's inferencer's list).
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.ppm', '.pgm', '.tif', '.tiff', '.webp')
#: Videos (read frame by frame with mmcv.VideoReader, i.e. OpenCV).
VIDEO_EXTENSIONS = ('.mp4', '.avi', '.mov', '.mkv', '.webm', '.m4v', '.mpg', '.mpeg')
#: Exported files by suffix, and the backends that run them (the first by default).
EXPORTED_BACKENDS = {'.onnx': ('onnxruntime', 'openvino'), '.pt2': ('aoti',)}
#: What the inferencer of each config scope is called.
TASKS = {'mmseg': 'segmentation', 'mmdet': 'detection'}
# Written by the inferencers when they are built without weights: ours are loaded after.
_NO_WEIGHTS_WARNINGS = r'(Checkpoint is not loaded|weights is None)'


def _log_nothing(message: str) -> None:
    pass


def exported_backend(model: str, backend: Optional[str]) -> Optional[str]:
    """The backend that runs ``model``, None for a checkpoint (run in torch). An ONNX
    file runs in ``backend`` or ONNX Runtime, a ``.pt2`` package in ``aoti``."""
    suffix = osp.splitext(str(model))[1].lower()
    allowed = EXPORTED_BACKENDS.get(suffix)
    if allowed is None:
        if backend:
            raise UsageError(f'--backend {backend} runs an exported file (.onnx, or .pt2 '
                             f'for aoti); {model} is not one: give the file tools/export.py '
                             'wrote, or drop --backend to run a checkpoint in torch')
        return None
    if backend is None:
        return allowed[0]
    if backend not in allowed:
        raise UsageError(f'{model} is a {suffix} file, which runs in '
                         f'{" or ".join(allowed)}, not --backend {backend}')
    return backend


def _checkpoint_mismatch(model, checkpoint: dict) -> Optional[str]:
    """What keeps ``checkpoint``'s weights from being ``model``'s: keys missing either
    way, or of another shape (None when they match exactly)."""
    state = checkpoint.get('state_dict', checkpoint)
    state = {k[len('module.'):] if k.startswith('module.') else k: v
             for k, v in state.items()}
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(k for k in own if k in state and hasattr(state[k], 'shape')
                    and tuple(state[k].shape) != tuple(own[k].shape))
    if not (missing or unexpected or shapes):
        return None
    shown = ', '.join((shapes + missing + unexpected)[:4])
    return (f'{len(missing)} of the model\'s weights missing, {len(unexpected)} it does not '
            f'have, {len(shapes)} of another shape (e.g. {shown})')


def _config_dataset_meta(cfg, scope: str, log: Callable[[str], None]) -> Dict:
    """Classes and palette of the config's test dataset (read without its files), for a
    model whose file carries none (an exported network); the inferencer's default ones
    (Cityscapes, COCO) when the dataset cannot say."""
    import copy
    if scope == 'mmdet':
        from mmdet.evaluation import get_classes
        from mmdet.registry import DATASETS
        default = {'classes': get_classes('coco'), 'palette': 'random'}
    else:
        from mmseg.registry import DATASETS
        from mmseg.utils import get_classes, get_palette
        default = {'classes': get_classes('cityscapes'), 'palette': get_palette('cityscapes')}
    dataset = copy.deepcopy(cfg.test_dataloader.dataset)
    dataset['lazy_init'] = True
    try:
        meta = DATASETS.build(dataset).metainfo
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as err:
        log(f'the config\'s test dataset gives no class names ({err}); drawing with '
            f'{"COCO" if scope == "mmdet" else "Cityscapes"} names')
        return default
    return {'classes': meta.get('classes') or default['classes'],
            'palette': meta.get('palette') or default['palette']}


def _refuse_inputs_as_input_errors(runner) -> None:
    """An exported file takes one input size (a static ONNX file, a package): an image
    the test pipeline brings to another size is the user's input that does not fit, said
    as such (the runner's ValueError becomes an InputError) rather than a traceback out
    of the model's forward."""
    check = runner.check_input

    def check_input(x):
        try:
            check(x)
        except ValueError as err:
            raise InputError(f'{err} (the size the config\'s test pipeline gives this '
                             'input)') from err

    runner.check_input = check_input


def init_inferencer(config: str, model: str, backend: Optional[str] = None,
                    precision: str = 'fp32', deploy: bool = False,
                    device: Optional[str] = None, cfg_options: Optional[dict] = None,
                    mini: bool = False, log: Optional[Callable[[str], None]] = None):
    """The config's inferencer (``mmdet.apis.DetInferencer`` for an mmdet config,
    ``mmseg.apis.MMSegInferencer`` for an mmseg one) predicting with ``model``.

    Args:
        config: the config the model was trained (and exported) with; ``cfg_options`` and
            ``mini`` as for :func:`mmrepvgg.apis.load_config` (``mini``: the mini data's
            test pipeline, i.e. the image size an export with ``--mini`` was made for).
        model: a checkpoint (training or fused form; a path, URL or model-zoo name), an
            ONNX file (``.onnx``) or an AOTInductor package (``.pt2``).
        backend: for an ONNX file 'onnxruntime' (default) or 'openvino'; a package runs
            in 'aoti'. ``precision``: the backend's arithmetic ('bf16': OpenVINO).
        deploy: fuse a training-form checkpoint after loading (a fused one is built in
            deploy form whatever this says).
        device: where the torch part runs (default: the inferencer's choice for a
            checkpoint, the CPU for an exported file, which runs there).
        log: called with one line saying what runs (default: silent).

    Returns ``(inferencer, form)``: ``form`` says in words what computes the network.

    Raises:
        InputError: a missing or unreadable model or config, or a model that is not of
            the config (weights of other names or shapes, an exported part of another
            model).
        UsageError: a request that does not fit the model (``--backend`` for a
            checkpoint, ``deploy`` for an exported file, a precision the backend lacks).
    """
    log = log or _log_nothing
    backend = exported_backend(model, backend)
    if backend is None and precision != 'fp32':
        raise UsageError(f'--precision {precision} is the arithmetic of a backend running an '
                         'exported file (bf16: openvino); a checkpoint runs in torch in '
                         'fp32')
    if backend and deploy:
        raise UsageError('--deploy fuses a checkpoint; an exported file is fused already: '
                         'drop --deploy')
    if backend and precision not in BACKEND_PRECISIONS[backend]:
        raise UsageError(f'{backend} runs {", ".join(BACKEND_PRECISIONS[backend])}, not '
                         f'--precision {precision}')
    cfg = load_config(config, cfg_options=cfg_options, mini=mini)
    scope = scope_of(cfg)
    if scope not in TASKS:
        raise UsageError(f'inference runs mmdet and mmseg configs (their inferencers), not '
                         f'scope {scope!r}')
    checkpoint = None
    if backend is None:
        from ..checkpoint.fetch import fetch_and_load
        from ..checkpoint.layouts import describe_checkpoint, whole_model_needed
        try:
            source, checkpoint = fetch_and_load(model)
            info = describe_checkpoint(checkpoint)
        except (OSError, ValueError, TypeError, AttributeError) as err:
            raise InputError(f'error: {err}') from err
        if info.holds == 'backbone':
            raise InputError(f'error: {whole_model_needed(model, info, "inference")}')
        if info.deploy:
            cfg.model.backbone.deploy = True  # load the fused weights as they are
        form = ('checkpoint, fused form' if info.deploy else
                'checkpoint, training form fused after loading' if deploy else
                'checkpoint, training form (3-branch)')
    elif not osp.isfile(model):
        raise InputError(f'exported model not found: {model}')
    device = device or ('cpu' if backend else None)
    # The inferencers draw into the pictures they return; nothing goes to the config's
    # visualization backends (a log folder, W&B, ...).
    if cfg.get('visualizer') is not None:
        cfg.visualizer.vis_backends = None

    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message=_NO_WEIGHTS_WARNINGS)
        if scope == 'mmdet':
            from mmdet.apis import DetInferencer
            inferencer = DetInferencer(cfg, weights=None, device=device, scope='mmdet',
                                       show_progress=False)
        else:
            from mmseg.apis import MMSegInferencer
            inferencer = MMSegInferencer(cfg, weights=None, device=device, scope='mmseg')
    inferencer.show_progress = False  # one image per call: the caller shows progress
    net = inferencer.model

    if checkpoint is not None:
        mismatch = _checkpoint_mismatch(net, checkpoint)
        if mismatch:
            raise InputError(f'{model} does not hold the weights of the config\'s '
                             f'model ({mismatch}): give the config it was trained with, '
                             'with the same --cfg-options')
        # the inferencer's own loading: the weights, and classes and palette from the
        # checkpoint's meta (the names match exactly, checked above)
        inferencer._load_weights_to_model(net, checkpoint, inferencer.cfg)
        if deploy and not info.deploy:
            from ..reparam import reparameterize
            net.eval()
            reparameterize(net, inplace=True)
    else:
        from ..deploy import use_backend
        try:
            runner = use_backend(net, model, backend, precision)
        except (OSError, ValueError, RuntimeError) as err:
            raise InputError(f'error: {err}') from err
        _refuse_inputs_as_input_errors(runner)
        net.dataset_meta = _config_dataset_meta(inferencer.cfg, scope, log)
        if runner.quantized:
            form = f'INT8 ONNX in {backend} (ops left in float run {runner.precision_used})'
        elif backend == 'aoti':
            form = 'AOTInductor package'
        else:
            form = f'ONNX in {backend} ({runner.precision_used})'
        if runner.precision_used != precision and not runner.quantized:
            form += f', asked {precision}: this CPU has no {precision} arithmetic'
    if scope == 'mmdet':  # DetInferencer gives its visualizer the meta when it is built
        inferencer.visualizer.dataset_meta = net.dataset_meta
    net.eval()
    log(f'{model}: {form}; the rest of the {TASKS[scope]} model runs in torch'
        if backend else f'{model}: {form}')
    return inferencer, form


def is_detector(inferencer) -> bool:
    from mmdet.apis import DetInferencer
    return isinstance(inferencer, DetInferencer)


def predict_image(inferencer, image: np.ndarray, score_thr: float = 0.3
                  ) -> Tuple[object, dict, np.ndarray]:
    """One image (BGR, as OpenCV reads it) through ``inferencer`` (of
    :func:`init_inferencer`): ``(data sample, prediction, picture)``. The prediction is
    what the inferencer's ``postprocess`` gives (detection: its JSON dict of labels,
    scores and boxes; segmentation: the label map), the picture (RGB) what its
    visualizer draws: boxes scored ``score_thr`` or more, or the label map over the
    image."""
    result = inferencer(image, return_datasamples=True)
    sample = result['predictions'][0] if isinstance(result, dict) else result
    rgb = np.ascontiguousarray(image[..., ::-1])
    draw = dict(pred_score_thr=score_thr) if is_detector(inferencer) else {}
    picture = inferencer.visualize([rgb], [sample], return_vis=True, **draw)[0]
    prediction = inferencer.postprocess([sample], [picture], False)['predictions']
    if isinstance(prediction, list):  # DetInferencer: one dict per image
        prediction = prediction[0]
    return sample, prediction, picture


def collect_inputs(inputs: str) -> List[Tuple[str, str]]:
    """``[(kind, path)]`` for INPUTS: an image, a video, or a folder's images (sorted;
    its other files are left alone). Kinds: 'image', 'video'."""
    inputs = os.fspath(inputs)
    if not osp.exists(inputs):
        raise InputError(f'input not found: {inputs}')
    if osp.isdir(inputs):
        names = sorted(n for n in os.listdir(inputs)
                       if osp.splitext(n)[1].lower() in IMAGE_EXTENSIONS
                       and osp.isfile(osp.join(inputs, n)))
        if not names:
            raise InputError(f'{inputs} holds no images ({", ".join(IMAGE_EXTENSIONS)})')
        stems: Dict[str, str] = {}
        for name in names:
            stem = osp.splitext(name)[0]
            if stem in stems:
                raise InputError(f'{inputs} holds {stems[stem]} and {name}, whose '
                                 f'predictions would both be preds/{stem}.json: rename one')
            stems[stem] = name
        return [('image', osp.join(inputs, n)) for n in names]
    suffix = osp.splitext(inputs)[1].lower()
    if suffix in IMAGE_EXTENSIONS:
        return [('image', inputs)]
    if suffix in VIDEO_EXTENSIONS:
        return [('video', inputs)]
    raise InputError(f'{inputs} is neither an image ({", ".join(IMAGE_EXTENSIONS)}) nor a '
                     f'video ({", ".join(VIDEO_EXTENSIONS)}); give one, or a folder of '
                     'images')


def _read_image(path: str) -> np.ndarray:
    import mmcv
    try:
        image = mmcv.imread(path)  # BGR, as the test pipeline's LoadImageFromFile reads
    except (OSError, ValueError) as err:
        raise InputError(f'cannot read {path} as an image: {err}') from err
    if image is None:
        raise InputError(f'cannot read {path} as an image (OpenCV decodes nothing from it)')
    return image


def _encode(picture_rgb: np.ndarray, suffix: str) -> bytes:
    import cv2
    ok, data = cv2.imencode(suffix, np.ascontiguousarray(picture_rgb[..., ::-1]))
    if not ok:
        raise InputError(f'OpenCV cannot write a {suffix} picture')
    return data.tobytes()


class _Writer:
    """Writes one input's results under ``out_dir`` as the inferencers lay them out:
    ``vis/<name>`` the picture, ``preds/<stem>.json`` the prediction (segmentation: also
    ``preds/<stem>_sem_seg.png``, the label map of class indices, which the JSON names)."""

    def __init__(self, inferencer, out_dir: str):
        self.out_dir = out_dir
        self.detector = is_detector(inferencer)
        self.classes = list(inferencer.model.dataset_meta.get('classes') or [])
        self.written: Dict[str, List[str]] = {'vis': [], 'preds': []}

    def record(self, prediction, pred_base: str) -> Tuple[dict, Optional[np.ndarray]]:
        """The JSON of a prediction, and a label map to write beside it (or None)."""
        if self.detector:
            return prediction, None
        labels = np.asarray(prediction)
        ids, counts = np.unique(labels, return_counts=True)
        name = lambda i: self.classes[i] if i < len(self.classes) else str(i)  # noqa: E731
        return {'sem_seg_path': pred_base + '_sem_seg.png',
                'shape': list(labels.shape),
                'pixels': {name(int(i)): int(c) for i, c in zip(ids, counts)}}, labels

    def prediction(self, stage, prediction, pred_base: str) -> List[str]:
        """Stage the prediction's files; returns their paths in publishing order."""
        record, labels = self.record(prediction, pred_base)
        paths = []
        if labels is not None:
            from PIL import Image
            png = record['sem_seg_path']
            if labels.max(initial=0) > 255:
                raise InputError(f'{labels.max()} classes do not fit the uint8 label map')
            Image.fromarray(labels.astype(np.uint8)).save(stage(png, '.png'), format='PNG')
            paths.append(png)
        with open(stage(pred_base + '.json'), 'w') as f:
            json.dump(record, f)
        paths.append(pred_base + '.json')
        return paths

    def image(self, name: str, prediction, picture: np.ndarray,
              pred_base: Optional[str] = None) -> None:
        stem, suffix = osp.splitext(name)
        vis = osp.join(self.out_dir, 'vis', name)
        pred_base = pred_base or osp.join(self.out_dir, 'preds', stem)
        data = _encode(picture, suffix if suffix.lower() in IMAGE_EXTENSIONS else '.png')
        with staged_files() as (stage, publish):
            preds = self.prediction(stage, prediction, pred_base)
            with open(stage(vis), 'wb') as f:
                f.write(data)
            publish(*preds, vis)
        self.written['preds'].append(preds[-1])
        self.written['vis'].append(vis)

    def frame(self, stage_dir: str, index: int, prediction) -> None:
        base = osp.join(stage_dir, f'{index:06d}')
        with staged_files() as (stage, publish):
            preds = self.prediction(stage, prediction, base)
            publish(*preds)
        self.written['preds'].append(preds[-1])


def _progress(total: int, show: bool):
    import sys

    from mmengine.utils import ProgressBar
    if not show or total <= 1:
        return None
    return ProgressBar(total, file=sys.stdout)  # the current one (its default: at import)


def _infer_video(inferencer, path: str, writer: _Writer, score_thr: float,
                 progress: bool) -> int:
    import cv2
    import mmcv
    try:
        video = mmcv.VideoReader(path)
    except (OSError, ValueError, AssertionError) as err:
        raise InputError(f'cannot read {path} as a video: {err}') from err
    if video.frame_cnt < 1 or not video.width or not video.height:
        raise InputError(f'cannot read {path} as a video (OpenCV finds no frames in it)')
    stem = osp.splitext(osp.basename(path))[0]
    out = osp.join(writer.out_dir, 'vis', stem + '.mp4')
    frames_dir = osp.join(writer.out_dir, 'preds', stem)
    os.makedirs(frames_dir, exist_ok=True)
    bar = _progress(video.frame_cnt, progress)
    count = 0
    with staged_files() as (stage, publish):
        staged = stage(out, '.mp4')  # OpenCV picks the container by the suffix
        fps = video.fps if video.fps and video.fps > 0 else 25
        sink = cv2.VideoWriter(staged, cv2.VideoWriter_fourcc(*'mp4v'), fps,
                               (video.width, video.height))
        if not sink.isOpened():
            raise InputError(f'OpenCV cannot write an mp4 video here ({staged})')
        try:
            for frame in video:
                if frame is None:
                    break
                try:
                    _, prediction, picture = predict_image(inferencer, frame, score_thr)
                except InputError as err:  # an exported file made for another size
                    raise InputError(f'{path}, frame {count}: {err}') from err
                writer.frame(frames_dir, count, prediction)
                sink.write(np.ascontiguousarray(picture[..., ::-1]))
                count += 1
                if bar:
                    bar.update()
        finally:
            sink.release()
        if bar:
            print()  # the bar leaves its line open
        if count == 0:
            raise InputError(f'cannot read {path} as a video (OpenCV decodes no frame)')
        publish(out)
    writer.written['vis'].append(out)
    return count


def infer(config: str, model: str, inputs: str, out_dir: str,
          backend: Optional[str] = None, precision: str = 'fp32', deploy: bool = False,
          device: Optional[str] = None, cfg_options: Optional[dict] = None,
          mini: bool = False, score_thr: float = 0.3, progress: bool = True,
          log: Optional[Callable[[str], None]] = None) -> dict:
    """Predict on ``inputs`` (an image, a folder of images or a video) with ``model``
    and write the pictures and predictions under ``out_dir``: what ``tools/infer.py``
    does. :func:`init_inferencer` says what ``model`` and the other arguments may be,
    :func:`write_predictions` what is written. The inputs are checked before the model
    is built. Returns :func:`write_predictions`' summary plus ``form`` (what computed
    the network, in words)."""
    items = collect_inputs(inputs)
    inferencer, form = init_inferencer(config, model, backend, precision, deploy, device,
                                       cfg_options, mini, log)
    return dict(write_predictions(inferencer, items, out_dir, score_thr, progress),
                form=form)


def write_predictions(inferencer, inputs, out_dir: str, score_thr: float = 0.3,
                      progress: bool = True) -> dict:
    """Run ``inferencer`` (of :func:`init_inferencer`) on ``inputs`` (a path as
    :func:`collect_inputs` takes it, or its list) and write under ``out_dir``:

    * ``vis/<image name>``: the picture the config's visualizer draws (detection: boxes
      scored ``score_thr`` or more, with class and score; segmentation: the label map
      in the dataset's palette over the image); for a video ``vis/<stem>.mp4``, every
      frame drawn so;
    * ``preds/<stem>.json``: detection, DetInferencer's JSON (labels, scores, boxes
      x1 y1 x2 y2 in input pixels, every box the model keeps); segmentation, the label
      map ``preds/<stem>_sem_seg.png`` (class indices) named in the JSON with the shape
      and the pixels per class. A video's frames go to ``preds/<stem>/<frame>.json``.

    Each file is complete when it appears (an image that cannot be read stops the run
    with the results of the images before it written whole); ``progress`` shows a bar
    over a folder's images or a video's frames. Returns ``{'task', 'images', 'frames',
    'vis': [paths], 'preds': [JSON paths]}``.
    """
    items = collect_inputs(inputs) if isinstance(inputs, (str, os.PathLike)) else inputs
    out_dir = os.fspath(out_dir)
    writer = _Writer(inferencer, out_dir)
    images = [path for kind, path in items if kind == 'image']
    bar = _progress(len(images), progress)
    frames = 0
    for kind, path in items:
        if kind == 'video':
            frames += _infer_video(inferencer, path, writer, score_thr, progress)
            continue
        image = _read_image(path)
        try:
            _, prediction, picture = predict_image(inferencer, image, score_thr)
        except InputError as err:  # an exported file made for another input size
            raise InputError(f'{path}: {err}') from err
        writer.image(osp.basename(path), prediction, picture)
        if bar:
            bar.update()
    if bar:
        print()  # the bar leaves its line open
    return dict(task=TASKS[scope_of(inferencer.cfg)], images=len(images), frames=frames,
                vis=writer.written['vis'], preds=writer.written['preds'])


def side_by_side(pictures: Sequence[np.ndarray], titles: Sequence[str],
                 gap: int = 4) -> np.ndarray:
    """RGB pictures of one height in a row, each titled above, on white."""
    import cv2
    height = max(p.shape[0] for p in pictures)
    band = 18
    row = []
    for picture, title in zip(pictures, titles):
        panel = np.full((height + band, picture.shape[1], 3), 255, np.uint8)
        panel[band:band + picture.shape[0]] = picture
        cv2.putText(panel, title, (2, band - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                    (0, 0, 0), 1, cv2.LINE_AA)
        row += [panel, np.full((height + band, gap, 3), 255, np.uint8)]
    return np.concatenate(row[:-1], axis=1)


def write_picture(picture_rgb: np.ndarray, path: str) -> str:
    """Write an RGB picture to ``path`` (its suffix the format), complete or not at all."""
    data = _encode(picture_rgb, osp.splitext(path)[1] or '.png')
    with staged_files() as (stage, publish):
        with open(stage(path), 'wb') as f:
            f.write(data)
        publish(path)
    return path
