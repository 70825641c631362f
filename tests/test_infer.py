"""mmrepvgg.apis.inference and tools/infer.py: the config's own inferencer (mmseg's
MMSegInferencer, mmdet's DetInferencer) predicting with every form of a model gives what
the inferencer gives on the training checkpoint, and writes it whole.

The reference is the inferencer built the plain way, ``MMSegInferencer(config,
weights=checkpoint)``, on the session's one-iteration A0 models (tests/conftest.py) and
the mini data's val images. A form that runs the same network in fp32 (the checkpoint
through our loading) must give identical numbers; a form whose arithmetic differs (fused
weights, ONNX Runtime, OpenVINO) is held to the rule the export's parity check uses
(mmrepvgg.reparam.rounding_bound): its logits within FUSION_MARGIN times torch fp32's
own error against a float64 copy of the network (OpenVINO: OPENVINO_FACTOR times), and a
label that differs only where the float64 logits of the two classes are that close.
"""
import copy
import importlib.util
import json
import os
import os.path as osp

import cv2
import mmcv
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import (DET_CONFIG, DET_MODEL, MAX_FLIPPED_PIXELS, ROOT, SEG_CONFIG,
                     SEG_MODEL, assert_no_temporary_files, assert_same_detections,
                     parse_options, run_export, working_dir)
from mmrepvgg.apis import infer, load_config
from mmrepvgg.apis import inference as api
from mmrepvgg.deploy import ExportedPart
from mmrepvgg.errors import InputError, UsageError, run_command
from mmrepvgg.reparam import FUSION_MARGIN, rounding_bound

#: OpenVINO's CPU plugin computes fp32 with its own kernels and op fusions: measured on
#: fused B1g2 it sat 1.4e-6 off torch where ONNX Runtime sat 3.6e-7 (docs: 3.9x), so its
#: logits get ONNX Runtime's allowance (FUSION_MARGIN x torch's own error) times 4.
OPENVINO_FACTOR = 4 * FUSION_MARGIN


def _seg_images(fixture):
    folder = fixture.root / 'data' / 'mini_cityscapes' / 'leftImg8bit' / 'val' / 'frankfurt'
    names = sorted(os.listdir(folder))
    assert len(names) == 2, names
    return folder, [str(folder / n) for n in names]


def _det_images(fixture):
    folder = fixture.root / 'data' / 'mini_coco' / 'val2017'
    names = sorted(os.listdir(folder))
    assert len(names) == 2, names
    return folder, [str(folder / n) for n in names]


def _init(fixture, config, model, options, **kwargs):
    with working_dir(fixture.root):
        return api.init_inferencer(str(config), str(model), cfg_options=parse_options(options),
                                   mini=True, **kwargs)


def _reference_inferencer(fixture, config, ckpt, options):
    """The inferencer as its users build it, from the config and the checkpoint."""
    with working_dir(fixture.root):
        cfg = load_config(config, cfg_options=parse_options(options), mini=True)
        if cfg.default_scope == 'mmseg':
            from mmseg.apis import MMSegInferencer
            inferencer = MMSegInferencer(cfg, weights=str(ckpt), device='cpu')
        else:
            from mmdet.apis import DetInferencer
            inferencer = DetInferencer(cfg, weights=str(ckpt), device='cpu',
                                       show_progress=False)
    inferencer.show_progress = False
    return inferencer


class SegReference:
    """MMSegInferencer's prediction on an image (a path or a BGR array) from the
    checkpoint, with the float64 logits of the same network on the same input."""

    def __init__(self, inferencer):
        self.inferencer = inferencer
        self.double = ExportedPart(copy.deepcopy(inferencer.model).double())

    @torch.no_grad()
    def __call__(self, image):
        inf = self.inferencer
        sample = inf(image, return_datasamples=True)
        batch = inf.collate_fn([inf.pipeline(image)])
        inputs = inf.model.data_preprocessor(batch, False)['inputs']
        fp64 = self.double(inputs.double())[0][0]
        fp32 = sample.seg_logits.data
        assert fp64.shape == fp32.shape  # the mini images need no resizing back
        own = float((fp32.double() - fp64).abs().max())
        scale = float(fp64.abs().max())
        return dict(labels=sample.pred_sem_seg.data[0], logits=fp32, fp64=fp64, own=own,
                    bound=rounding_bound(own, scale),
                    openvino_bound=rounding_bound(own, scale, OPENVINO_FACTOR))


def assert_labels_explained(ref, labels, logits_error):
    """``labels`` differ from the reference only at near-ties: where the float64 logits
    of the reference's class and the new one are within twice the larger of the two
    computations' errors (the most two fp32 results can move them apart), and at most
    at MAX_FLIPPED_PIXELS pixels."""
    flipped = (labels != ref['labels']).nonzero(as_tuple=True)
    count = len(flipped[0])
    assert count <= MAX_FLIPPED_PIXELS, f'{count} pixels differ'
    if count:
        fp64 = ref['fp64'][:, flipped[0], flipped[1]]
        gap = (fp64.gather(0, ref['labels'][flipped][None])
               - fp64.gather(0, labels[flipped][None])).abs()
        assert float(gap.max()) <= 2 * max(logits_error, ref['own']), (gap, logits_error)
    return count


# --------------------------------------------------------------------------- segmentation
@pytest.fixture(scope='module')
def seg_onnx(seg, tmp_path_factory):
    out = tmp_path_factory.mktemp('infer_seg') / 'pspnet.onnx'
    # 1x3x128x256, the mini images; its parity is tests/test_deploy.py's, here the
    # predictions are compared with the reference's
    run_export(seg, SEG_CONFIG, seg.ckpt, out, SEG_MODEL, check=False)
    return out


@pytest.fixture(scope='module')
def seg_reference(seg):
    return SegReference(_reference_inferencer(seg, SEG_CONFIG, seg.ckpt, SEG_MODEL))


def test_segmentation_every_form_predicts_as_the_checkpoint(seg, seg_onnx, seg_reference,
                                                            tmp_path):
    folder, images = _seg_images(seg)
    refs = [seg_reference(path) for path in images]
    forms = [('checkpoint', seg.ckpt, {}), ('deploy', seg.ckpt, dict(deploy=True)),
             ('fused', seg.fused, {}), ('onnxruntime', seg_onnx, {}),
             ('openvino', seg_onnx, dict(backend='openvino'))]
    for name, model, kwargs in forms:
        inferencer, form = _init(seg, SEG_CONFIG, model, SEG_MODEL, **kwargs)
        flips, predicted, pictures = 0, {}, {}
        for path, ref in zip(images, refs):
            sample, labels, picture = api.predict_image(inferencer, api._read_image(path))
            logits = sample.seg_logits.data
            assert torch.equal(torch.as_tensor(labels), sample.pred_sem_seg.data[0])
            predicted[path], pictures[path] = np.asarray(labels), picture
            if name == 'checkpoint':  # the same network, weights and input: bit for bit
                assert torch.equal(logits, ref['logits']) and torch.equal(
                    sample.pred_sem_seg.data[0], ref['labels'])
                drawn = seg_reference.inferencer.visualize([path], [sample], return_vis=True)
                assert np.array_equal(picture, drawn[0])  # the inferencer's visualizer
                continue
            error = float((logits.double() - ref['fp64']).abs().max())
            bound = ref['openvino_bound' if name == 'openvino' else 'bound']
            print(f'\n{name} ({form}): logits off float64 by {error:.3g}, bound '
                  f'{bound:.3g} (torch fp32 {ref["own"]:.3g})')
            assert error <= bound, (name, error, bound)
            flips += assert_labels_explained(ref, sample.pred_sem_seg.data[0], error)
        assert flips <= MAX_FLIPPED_PIXELS

        if name not in ('checkpoint', 'openvino'):
            continue  # the files of a torch form and of a backend suffice
        # what tools/infer.py writes for a folder: the same labels, a picture per image
        out = tmp_path / name
        result = api.write_predictions(inferencer, str(folder), str(out), progress=False)
        assert result['task'] == 'segmentation' and result['images'] == 2
        assert sorted(os.listdir(out / 'vis')) == [osp.basename(p) for p in images]
        for path in images:
            stem = osp.splitext(osp.basename(path))[0]
            with open(out / 'preds' / f'{stem}.json') as f:
                record = json.load(f)
            labels = np.array(Image.open(record['sem_seg_path']))
            assert record['sem_seg_path'] == str(out / 'preds' / f'{stem}_sem_seg.png')
            assert record['shape'] == list(labels.shape) == [128, 256]
            classes = seg_reference.inferencer.model.dataset_meta['classes']
            ids, counts = np.unique(labels, return_counts=True)
            assert record['pixels'] == {classes[i]: int(c) for i, c in zip(ids, counts)}
            assert np.array_equal(labels, predicted[path])  # as predicted above
            picture = mmcv.imread(str(out / 'vis' / osp.basename(path)))  # BGR
            assert picture.shape == (128, 256, 3)
            assert np.array_equal(picture[..., ::-1], pictures[path])  # a lossless .png
        for sub in ('vis', 'preds'):
            assert_no_temporary_files(out / sub)


def _write_video(path, frames, fps=5):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*'mp4v'), fps,
                             (frames[0].shape[1], frames[0].shape[0]))
    assert writer.isOpened()
    for frame in frames:
        writer.write(frame)
    writer.release()


def _tool():
    """tools/infer.py as a module (its main runs in this process)."""
    spec = importlib.util.spec_from_file_location('infer_tool', osp.join(ROOT, 'tools',
                                                                         'infer.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_infer_tool_on_a_video_and_its_errors(seg, seg_onnx, seg_reference, tmp_path,
                                              capfd):
    """tools/infer.py on a 2-frame video with the ONNX file in OpenVINO: an annotated
    video of as many frames and per-frame predictions, as the reference predicts on the
    decoded frames; a missing input is one line on stderr and exit status 1."""
    _, images = _seg_images(seg)
    clip = tmp_path / 'clip.mp4'
    _write_video(clip, [mmcv.imread(p) for p in images])
    out = tmp_path / 'out'
    tool = _tool()
    common = ['--mini', '--cfg-options', *SEG_MODEL]
    with working_dir(seg.root):
        tool.main([SEG_CONFIG, str(seg_onnx), str(clip), '--out-dir', str(out),
                   '--backend', 'openvino', *common])
        stdout = capfd.readouterr().out
        with pytest.raises(SystemExit) as exit_status:
            run_command(lambda: tool.main([SEG_CONFIG, str(seg.ckpt),
                                           str(tmp_path / 'none.png'), '--out-dir',
                                           str(tmp_path / 'never'), *common]))
    assert 'ONNX in openvino (fp32); the rest of the segmentation model runs in torch' in \
        stdout
    assert '2/2' in stdout  # the progress bar over the frames
    assert 'segmentation of 2 video frame(s)' in stdout
    assert exit_status.value.code == 1
    assert capfd.readouterr().err.strip().splitlines()[-1] == \
        f'input not found: {tmp_path / "none.png"}'
    assert not (tmp_path / 'never').exists()

    video = mmcv.VideoReader(str(out / 'vis' / 'clip.mp4'))
    assert (len(video), video.width, video.height) == (2, 256, 128)
    assert sorted(os.listdir(out / 'preds' / 'clip')) == [
        f'{i:06d}{s}' for i in range(2) for s in ('.json', '_sem_seg.png')]
    flips = 0
    for i, frame in enumerate(mmcv.VideoReader(str(clip))):
        ref = seg_reference(frame)
        labels = torch.from_numpy(np.array(Image.open(
            out / 'preds' / 'clip' / f'{i:06d}_sem_seg.png')).astype(np.int64))
        flips += assert_labels_explained(ref, labels, ref['openvino_bound'])
    assert flips <= MAX_FLIPPED_PIXELS
    assert_no_temporary_files(out / 'vis')


# ------------------------------------------------------------------------------ detection
def _boxes(record):
    return dict(bboxes=torch.tensor(record['bboxes'], dtype=torch.float32).reshape(-1, 4),
                scores=torch.tensor(record['scores'], dtype=torch.float32),
                labels=torch.tensor(record['labels'], dtype=torch.int64))


def test_detection_forms_predict_as_the_checkpoint(det, tmp_path):
    """One image (the segmentation tests take folders) through DetInferencer's JSON."""
    _, images = _det_images(det)
    image = images[0]
    reference = _reference_inferencer(det, DET_CONFIG, det.ckpt, DET_MODEL)
    ref = reference(image, return_datasamples=True)['predictions'][0].pred_instances
    onnx = tmp_path / 'frcnn.onnx'
    run_export(det, DET_CONFIG, det.ckpt, onnx, DET_MODEL, dynamic=True, check=False)
    stem = osp.splitext(osp.basename(image))[0]
    for name, model, kwargs in [('checkpoint', det.ckpt, {}),
                                ('deploy', det.ckpt, dict(deploy=True)),
                                ('onnxruntime', onnx, {})]:
        inferencer, form = _init(det, DET_CONFIG, model, DET_MODEL, **kwargs)
        out = tmp_path / name
        result = api.write_predictions(inferencer, image, str(out), progress=False)
        assert result['task'] == 'detection' and result['images'] == 1
        assert result['preds'] == [str(out / 'preds' / f'{stem}.json')]
        assert os.listdir(out / 'vis') == [osp.basename(image)]
        assert mmcv.imread(str(out / 'vis' / osp.basename(image))).shape == (192, 256, 3)
        with open(out / 'preds' / f'{stem}.json') as f:
            got = _boxes(json.load(f))
        if name == 'checkpoint':  # the same computation: the same boxes, in order
            for key in ('bboxes', 'scores', 'labels'):
                assert torch.equal(got[key], ref[key]), key
        else:
            print(f'\n{name} ({form}): {len(got["scores"])} boxes')
            assert_same_detections(ref, got)


# ------------------------------------------------------------------------------ bad input
def test_bad_inputs_and_models_fail_clearly_before_writing(seg, seg_onnx, tmp_path):
    _, images = _seg_images(seg)
    out = tmp_path / 'out'

    def run(model, inputs, options=SEG_MODEL, config=SEG_CONFIG, **kwargs):
        with working_dir(seg.root):
            return infer(config, str(model), str(inputs), str(out),
                         cfg_options=parse_options(options), mini=True, progress=False,
                         **kwargs)

    with pytest.raises(InputError, match='input not found: .*nowhere.png'):
        run(seg.ckpt, tmp_path / 'nowhere.png')
    notes = tmp_path / 'notes.txt'
    notes.write_text('not a picture')
    with pytest.raises(InputError, match=r'notes.txt is neither an image \(.jpg.*\) nor a '
                                         r'video \(.mp4'):
        run(seg.ckpt, notes)
    with pytest.raises(InputError, match='holds no images'):
        run(seg.ckpt, tmp_path)  # only notes.txt in it
    one = images[0]
    # a model that is not the config's: other shapes, another part, not a model at all
    seven = SEG_MODEL + ['model.decode_head.num_classes=7']
    with pytest.raises(InputError, match=r"does not hold the weights of the config's model "
                                         r'\(0 .* missing, 0 .*, 2 of another shape'):
        run(seg.ckpt, one, seven)
    with pytest.raises(InputError, match="does not match the config's model"):
        run(seg_onnx, one, seven)
    with pytest.raises(InputError, match='holds a segmentor network; the config builds a '
                                         'two_stage'):
        run(seg_onnx, one, DET_MODEL, config=DET_CONFIG)
    with pytest.raises(InputError, match='not a valid PyTorch checkpoint'):
        run(notes, one)
    # an image the static file cannot take: the pipeline keeps its aspect ratio
    wide = tmp_path / 'wide.png'
    cv2.imwrite(str(wide), np.zeros((100, 300, 3), np.uint8))
    with pytest.raises(InputError, match=r'wide.png: pspnet.onnx takes inputs of shape '
                                         r'1x3x128x256, got 1x3x85x256: export again with '
                                         r'--dynamic'):
        run(seg_onnx, wide)
    wide.unlink()
    # requests that do not fit the model
    with pytest.raises(UsageError, match='--backend openvino runs an exported file'):
        run(seg.ckpt, one, backend='openvino')
    with pytest.raises(UsageError, match='runs in onnxruntime or openvino, not --backend aoti'):
        run(seg_onnx, one, backend='aoti')
    with pytest.raises(UsageError, match='a checkpoint runs in torch in fp32'):
        run(seg.ckpt, one, precision='bf16')
    with pytest.raises(UsageError, match='drop --deploy'):
        run(seg_onnx, one, deploy=True)
    with pytest.raises(UsageError, match='onnxruntime runs fp32, not --precision bf16'):
        run(seg_onnx, one, precision='bf16')
    assert not out.exists()


def test_a_failure_leaves_whole_files_only(seg, tmp_path, monkeypatch):
    """An unreadable image stops a folder after the images before it were written whole;
    a video that fails halfway leaves no video, and no temporary file anywhere."""
    _, images = _seg_images(seg)
    folder = tmp_path / 'in'
    folder.mkdir()
    (folder / 'a.png').write_bytes(open(images[0], 'rb').read())
    (folder / 'b.png').write_bytes(b'\x89PNG\r\n\x1a\n truncated')
    inferencer, _ = _init(seg, SEG_CONFIG, seg.ckpt, SEG_MODEL)
    out = tmp_path / 'out'
    with pytest.raises(InputError, match=r'cannot read .*b.png as an image'):
        api.write_predictions(inferencer, str(folder), str(out), progress=False)
    assert sorted(os.listdir(out / 'vis')) == ['a.png']
    assert sorted(os.listdir(out / 'preds')) == ['a.json', 'a_sem_seg.png']

    clip = tmp_path / 'clip.mp4'
    _write_video(clip, [mmcv.imread(p) for p in images])
    real, calls = api.predict_image, []

    def fail_on_the_second_frame(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError('interrupted')
        return real(*args, **kwargs)

    monkeypatch.setattr(api, 'predict_image', fail_on_the_second_frame)
    with pytest.raises(RuntimeError, match='interrupted'):
        api.write_predictions(inferencer, str(clip), str(out), progress=False)
    assert sorted(os.listdir(out / 'vis')) == ['a.png']  # no clip.mp4, whole or half
    assert sorted(os.listdir(out / 'preds' / 'clip')) == ['000000.json',
                                                          '000000_sem_seg.png']
    for sub in (out / 'vis', out / 'preds', out / 'preds' / 'clip'):
        assert_no_temporary_files(sub)


def test_backend_outputs_in_channels_last_predict_as_the_model():
    """An AOTInductor package computes in NHWC and hands its feature maps back in that
    memory layout; mmcv's RoIAlign reads NCHW memory. The detector with such a backend
    plugged in (what tools/infer.py and tools/test.py --backend aoti do) must predict
    exactly as the model itself."""
    from mmdet.structures import DetDataSample

    from mmrepvgg.convert import build_model_from_config
    from mmrepvgg.deploy.parts import attach_backend
    from mmrepvgg.reparam import randomize_norm_stats
    _, model = build_model_from_config(DET_CONFIG, {
        **parse_options(DET_MODEL), 'model.backbone.init_cfg': None})
    torch.manual_seed(0)
    model = randomize_norm_stats(model).eval()
    x = torch.randn(1, 3, 96, 128)
    meta = dict(img_shape=(96, 128), ori_shape=(96, 128), pad_shape=(96, 128),
                scale_factor=(1.0, 1.0), batch_input_shape=(96, 128))
    with torch.no_grad():
        expected = model.predict(x, [DetDataSample(metainfo=meta)])[0].pred_instances
        part = ExportedPart(copy.deepcopy(model))
        part(x)  # sets the groups

        def run(inputs):
            return [t.contiguous(memory_format=torch.channels_last) for t in part(inputs)]

        assert not run(x)[0].is_contiguous()
        attach_backend(model, run, part.kind, part.groups)
        got = model.predict(x, [DetDataSample(metainfo=meta)])[0].pred_instances
    assert len(expected) > 0
    for key in ('bboxes', 'scores', 'labels'):
        assert torch.equal(got[key], expected[key]), key
