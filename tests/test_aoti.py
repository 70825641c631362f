"""AOTInductor packages: tools/export.py --format aoti [--winograd] (apis.deploy.export),
the package loaded in a fresh process, tools/test.py --backend aoti (apis.test), and what
a package refuses.

Compiling is the slow part (tens of seconds per package on two cores), so the packages
are small: a two-block-per-stage RepVGG at 64x64, and the mini-data PSPNet at A0 size.
"""
import copy
import json
import os.path as osp
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

from helpers import (ROOT, SEG_CONFIG, SEG_MODEL, assert_files_score_as_deploy,
                     assert_no_temporary_files, assert_within_growth, parse_options,
                     run_export, run_test)
from mmrepvgg import RepVGG, reparameterize
from mmrepvgg.convert import build_model_from_config
from mmrepvgg.deploy import ExportedPart, PackageRunner, load_backend, package_module
from mmrepvgg.deploy.aoti import KERNEL_KEY, SHAPE_KEY, TORCH_KEY, read_package_metadata
from mmrepvgg.ops import winograd_kernel
from mmrepvgg.deploy.parity import runner_parity
from mmrepvgg.errors import MMRepVGGError
from mmrepvgg.ops.winograd import (WinogradConv2d, convert_to_winograd,
                                   winograd_unsupported_reason)
from mmrepvgg.reparam import randomize_norm_stats

# Two blocks a stage (one stride-2, one stride-1), 32 to 128 channels: quick to compile.
SMALL = dict(num_blocks=(2, 2, 2, 2), width_factors=(0.5, 0.5, 0.5, 0.25))
SHAPE = (2, 3, 64, 64)


def _small_fused(winograd_tile=None):
    torch.manual_seed(0)
    model = randomize_norm_stats(RepVGG(SMALL, out_indices=(1, 3))).eval()
    model = reparameterize(model)
    if winograd_tile is not None:
        assert convert_to_winograd(model, winograd_tile) == 4
    return model


@pytest.fixture(scope='module')
def packages(tmp_path_factory):
    """The small network packaged with direct convs and with F(4x4, 3x3) Winograd convs."""
    folder = tmp_path_factory.mktemp('aoti')
    x = torch.randn(*SHAPE)
    made = {}
    for name, tile in (('direct', None), ('winograd', 4)):
        model = _small_fused(tile)
        path = str(folder / f'{name}.pt2')
        times = package_module(model, x, path, metadata={'mmrepvgg.part': 'backbone'})
        made[name] = dict(path=path, model=model, times=times)
    return folder, x, made


FRESH_PROCESS = """
import sys, time, torch
from mmrepvgg.deploy import load_backend
start = time.perf_counter()
runner = load_backend(sys.argv[1], 'aoti', threads=int(sys.argv[4]))
outputs = runner(torch.load(sys.argv[2]))
torch.save(dict(outputs=outputs, load_s=time.perf_counter() - start), sys.argv[3])
"""


@pytest.mark.parametrize('name', ['direct', 'winograd'])
def test_package_loads_in_a_fresh_process_and_matches_the_model(packages, name,
                                                                 cpu_class_env):
    folder, x, made = packages
    entry = made[name]
    assert entry['times']['compile_s'] > 0
    torch.save(x, folder / 'x.pt')
    result = folder / f'{name}_out.pt'
    # at this process's thread count and CPU class: oneDNN's kernels (hence the rounding)
    # depend on both, and the two runs are compared bit for bit below
    subprocess.run([sys.executable, '-c', FRESH_PROCESS, entry['path'], str(folder / 'x.pt'),
                    str(result), str(torch.get_num_threads())], check=True, cwd=ROOT,
                   timeout=600, env={'PATH': '/usr/bin:/bin', **cpu_class_env})
    fresh = torch.load(result)['outputs']
    # the compiled code computes what the module does, within fp32 reordering (against a
    # float64 run of the same module, as export checks fusion)
    parity = runner_parity(entry['model'], lambda probe: fresh, x)
    assert parity['within'], parity
    assert [tuple(t.shape) for t in fresh] == [(2, 64, 8, 8), (2, 128, 2, 2)]
    # and the same as this process's own load of the package, bit for bit
    here = load_backend(entry['path'], 'aoti')(x)
    assert all(torch.equal(a, b) for a, b in zip(here, fresh))


def test_winograd_package_holds_winograd_convs_and_stays_close_to_direct(packages):
    folder, x, made = packages
    assert sum(isinstance(m, WinogradConv2d) for m in made['winograd']['model'].modules()) == 4
    direct = load_backend(made['direct']['path'], 'aoti')(x)
    winograd = load_backend(made['winograd']['path'], 'aoti')(x)
    with torch.no_grad():
        reference = copy.deepcopy(made['direct']['model']).double()(x.double())
    # its error against float64 grows by at most error_growth(4) over the direct convs'
    # own fp32 error (the bound tests/test_winograd.py derives from the transforms)
    assert_within_growth(winograd, direct, reference, 4)
    assert not any(torch.equal(a, b) for a, b in zip(winograd, direct))  # other arithmetic


def _compiled_bytes(path):
    """Bytes of the package's compiled library, which holds its frozen weights."""
    with zipfile.ZipFile(path) as archive:
        return sum(i.file_size for i in archive.infolist() if i.filename.endswith('.so'))


def test_winograd_package_holds_the_weights_at_their_size(packages):
    """The package keeps the 3x3 weights (its op transforms them when first called), so it
    is the size of the direct one, not (4+2)^2 / 9 = 4 times the Winograd convs' weights."""
    _, x, made = packages
    direct, winograd = (_compiled_bytes(made[n]['path']) for n in ('direct', 'winograd'))
    weights = sum(m.weight.numel() * 4 for m in made['winograd']['model'].modules()
                  if isinstance(m, WinogradConv2d))
    assert winograd < direct + weights  # far below direct + 3 x weights, the old layout
    runner = load_backend(made['winograd']['path'], 'aoti')
    before = winograd_kernel.transformed_bytes()
    runner(x)
    first = winograd_kernel.transformed_bytes() - before
    assert first >= 4 * weights  # the transform, in memory: 36/9 x, plus panel padding
    runner(x)
    assert winograd_kernel.transformed_bytes() - before == first  # once, not per call


def test_package_refuses_another_shape_naming_its_own(packages):
    _, x, made = packages
    runner = load_backend(made['direct']['path'], 'aoti')
    assert runner.input_shape == list(SHAPE)
    for wrong in (torch.randn(1, 3, 64, 64), torch.randn(2, 3, 96, 64)):
        with pytest.raises(ValueError, match=r'compiled for inputs of shape 2x3x64x64, got '
                                             + 'x'.join(map(str, wrong.shape))):
            runner(wrong)


def _rewrite_metadata(src, dst, **changes):
    """A copy of package ``src`` whose recorded metadata says otherwise."""
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, 'w') as new:
        for item in old.infolist():
            data = old.read(item)
            if item.filename.endswith('wrapper_metadata.json'):
                meta = json.loads(data)
                meta.update(changes)
                data = json.dumps(meta).encode()
            new.writestr(item, data)


def test_package_of_another_torch_or_cpu_is_refused_by_name(packages, tmp_path):
    _, _, made = packages
    src = made['direct']['path']
    assert read_package_metadata(src)[TORCH_KEY] == torch.__version__
    other = str(tmp_path / 'other_torch.pt2')
    _rewrite_metadata(src, other, **{TORCH_KEY: '2.3.0+cpu'})
    with pytest.raises(ValueError, match=rf'compiled by torch 2\.3\.0\+cpu; this is torch '
                                         rf'{torch.__version__.replace("+", chr(92) + "+")}'):
        PackageRunner(other)
    # a build tag alone (CPU vs CUDA wheel of the same release) is no reason to refuse
    tagged = str(tmp_path / 'tagged.pt2')
    _rewrite_metadata(src, tagged, **{TORCH_KEY: torch.__version__.split('+')[0] + '+xyz'})
    assert PackageRunner(tagged).input_shape == list(SHAPE)
    old_op = str(tmp_path / 'old_op.pt2')
    _rewrite_metadata(made['winograd']['path'], old_op,
                      **{KERNEL_KEY: 'mmrepvgg::winograd_conv3x3'})
    with pytest.raises(ValueError, match=r'calls the Winograd op as an earlier version of '
                                         r'mmrepvgg defined it .*export it again'):
        PackageRunner(old_op)
    isa = str(tmp_path / 'other_isa.pt2')
    _rewrite_metadata(src, isa, AOTI_CPU_ISA='AMX_FUTURE')
    with pytest.raises(ValueError, match='compiled for AMX_FUTURE, which this CPU lacks'):
        PackageRunner(isa)


def test_files_that_are_not_packages_say_so(tmp_path):
    junk = tmp_path / 'junk.pt2'
    junk.write_bytes(b'not a zip')
    with pytest.raises(ValueError, match='is not an AOTInductor package'):
        load_backend(str(junk), 'aoti')
    with pytest.raises(FileNotFoundError, match='AOTInductor package not found'):
        load_backend(str(tmp_path / 'missing.pt2'), 'aoti')
    with pytest.raises(ValueError, match='aoti runs fp32'):
        load_backend(str(junk), 'aoti', 'bf16')


# ------------------------------------------------------- the tools on a whole segmentor
def _winograd_convs(config, model_args):
    """How many convs of the config's fused network Winograd can compute."""
    _, model = build_model_from_config(config, dict(parse_options(model_args), **{
        'model.backbone.init_cfg': None}))
    network = ExportedPart(reparameterize(model.eval()))
    return sum(winograd_unsupported_reason(m) is None for m in network.modules())


def test_segmentor_package_scores_as_deploy(seg, tmp_path):  # noqa: F811
    """A whole PSPNet compiled with Winograd F(2x2, 3x3) in its stride-1, undilated convs
    (the dilated OS8 stages keep theirs direct) scores as the fused torch model. Direct
    convs compile through the same path (the small packages above, fresh process)."""
    wino = tmp_path / 'pspnet_winograd.pt2'
    report = run_export(seg, SEG_CONFIG, seg.ckpt, wino, SEG_MODEL, format='aoti',
                        winograd='2')
    assert report['kind'] == 'segmentor' and report['input_shape'] == [1, 3, 128, 256]
    assert report['compile_s'] > 0 and report['load_s'] > 0
    meta = read_package_metadata(str(wino))
    assert json.loads(meta[SHAPE_KEY]) == [1, 3, 128, 256]
    assert meta['mmrepvgg.part'] == 'segmentor'
    assert load_backend(str(wino), 'aoti').output_names == report['output_names'] == [
        'seg_logits']
    assert report['winograd'] == {'2': _winograd_convs(SEG_CONFIG, SEG_MODEL)}
    assert report['parity']['within']
    assert report['winograd_vs_direct'] < 1e-4
    assert_no_temporary_files(tmp_path)
    assert_files_score_as_deploy(seg, tmp_path, [('aoti_winograd', wino, 'aoti')])


# tools/export.py's --winograd without a tile is winograd='auto'
@pytest.mark.parametrize('asked,message', [
    (dict(format='aoti'), 'must end with .pt2'),
    (dict(winograd='auto'), 'Winograd convs are compiled into AOTInductor packages'),
    (dict(format='aoti', dynamic=True), 'compiled for one input shape'),
    (dict(format='aoti', winograd='5'), 'takes a tile of 2, 4, 6, 7 or auto'),
])
def test_export_refuses_requests_it_cannot_honour(seg, tmp_path, asked, message):  # noqa: F811
    out = tmp_path / ('net.pt2' if asked.get('dynamic') or asked.get('winograd') == '5'
                      else 'net.onnx')
    with pytest.raises(MMRepVGGError, match=message):
        run_export(seg, SEG_CONFIG, seg.ckpt, out, SEG_MODEL, **asked)
    assert not osp.exists(out)
    assert_no_temporary_files(tmp_path)


def test_test_tool_refuses_a_package_without_export_metadata(
        seg, tmp_path, packages):  # noqa: F811
    _, _, made = packages
    with pytest.raises(MMRepVGGError, match='was not written by tools/export.py'):
        run_test(seg, SEG_CONFIG, made['direct']['path'], tmp_path / 'w', tmp_path / 'o',
                 SEG_MODEL, backend='aoti')
    shutil.rmtree(tmp_path / 'w', ignore_errors=True)
