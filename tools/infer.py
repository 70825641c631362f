"""Predict on images, a folder of images or a video with any form of a model, and write
the pictures and predictions: the config's own inferencer (mmdet's DetInferencer,
mmseg's MMSegInferencer) does the pre-processing, the post-processing and the drawing.

    python tools/infer.py CONFIG MODEL INPUTS --out-dir D

MODEL: a checkpoint (training or fused form), an ONNX file of tools/export.py or
tools/quantize.py (ONNX Runtime, or --backend openvino), or an AOTInductor package
(.pt2). D/vis gets the pictures (an .mp4 for a video), D/preds the JSON predictions.
"""
import argparse

from mmengine.config import DictAction

from mmrepvgg.apis.inference import infer
from mmrepvgg.deploy.backends import BACKENDS
from mmrepvgg.errors import run_command


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split('\n\n')[0].replace('\n', ' '))
    parser.add_argument('config', help='the config the model was trained (and exported) with')
    parser.add_argument('model', help='checkpoint (training or fused form: a file, a URL or '
                                      'a model-zoo name), ONNX file (.onnx) or AOTInductor '
                                      'package (.pt2)')
    parser.add_argument('inputs', help='an image, a folder of images or a video')
    parser.add_argument('--out-dir', required=True,
                        help='where to write vis/ (pictures) and preds/ (JSON)')
    parser.add_argument('--backend', choices=BACKENDS,
                        help='for an ONNX file: onnxruntime (default) or openvino; a .pt2 '
                             'package runs in aoti')
    parser.add_argument('--precision', choices=('fp32', 'bf16'), default='fp32',
                        help='the backend\'s arithmetic (bf16: openvino); an INT8 file runs '
                             'as quantized')
    parser.add_argument('--deploy', action='store_true',
                        help='fuse a training checkpoint after loading (a fused checkpoint '
                             'is built in deploy form without it)')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='detection: draw boxes scored this or more (default 0.3); the '
                             'JSON keeps every box')
    parser.add_argument('--device', help='where the torch part runs (default: cuda if '
                                         'available for a checkpoint, cpu for an exported '
                                         'file)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override config entries, as for training (the model must be '
                             'the one the weights were made for)')
    parser.add_argument('--mini', action='store_true',
                        help='the config as --mini runs it (the mini data\'s test pipeline: '
                             'the image size of an export made with --mini)')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    result = infer(args.config, args.model, args.inputs, args.out_dir, args.backend,
                   args.precision, args.deploy, args.device, args.cfg_options, args.mini,
                   args.score_thr, not args.no_progress, log=print)
    what = f'{result["images"]} image(s)' if result['images'] else (
        f'{result["frames"]} video frame(s)')
    print(f'{result["task"]} of {what} ({result["form"]}): {len(result["vis"])} picture(s) '
          f'in {args.out_dir}/vis, {len(result["preds"])} prediction(s) in '
          f'{args.out_dir}/preds')


if __name__ == '__main__':
    run_command(main)
