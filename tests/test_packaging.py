"""The package as pip installs it, built from a copy of this checkout: the sdist carries
configs/ and tools/ (and not an editable install's links), the wheel built from that sdist
carries them as mmrepvgg/.mim/configs/repvgg and mmrepvgg/.mim/tools, and an editable
install links those two folders to the checkout. Installed either way and imported from
elsewhere, mmrepvgg serves ``_base_ = 'mmrepvgg::repvgg/<name>.py'`` (mmengine's
resolution) and its own configs and tools (reproduce) from the installed package."""
import os
import os.path as osp
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile

import pytest

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
NAME = 'pspnet_repvgg_b1g2_cityscapes'
USER_CONFIG = f"""# a project of a user's own, inheriting a bundled config
_base_ = 'mmrepvgg::repvgg/{NAME}.py'
custom_imports = dict(imports=['mmrepvgg'], allow_failed_imports=False)
model = dict(backbone=dict(arch='A0'), decode_head=dict(in_channels=1280),
             auxiliary_head=dict(in_channels=192))
"""
# Run in a Python that sees the installed package and this environment's other packages,
# but not this environment's own (editable) mmrepvgg: `python -S`, the stack on PYTHONPATH,
# the install's folder first on the path and added as a site folder (which runs an
# editable install's .pth).
CHECK = """
import os.path as osp, site, sys
sys.path.insert(0, sys.argv[1])  # before the stack: its .pth imports its own finder
site.addsitedir(sys.argv[1])
from mmengine.config import Config
try:
    Config.fromfile('user.py')
    print('before import: resolved')
except AssertionError as err:
    print('before import:', err)
import mmrepvgg
print('package:', osp.dirname(mmrepvgg.__file__))
cfg = Config.fromfile('user.py')
print('user config:', cfg.model.backbone.type, cfg.model.backbone.arch, cfg.default_scope)
try:  # mmengine 0.10 reads only files here, any package's pkg:: name included
    Config.fromfile('mmrepvgg::repvgg/pspnet_repvgg_b1g2_cityscapes.py')
    print('fromfile pkg::: read')
except FileNotFoundError:
    print('fromfile pkg::: FileNotFoundError')
from mmrepvgg.apis.config import resolve_config
from mmrepvgg.reproduce.experiments import suite_configs
from mmrepvgg.reproduce.plan import tools_folder
print('suite:', suite_configs('smoke')[0])
print('tools:', tools_folder())
for name in sys.argv[2:]:
    print('resolved:', resolve_config(name))
"""


def _copy_checkout(dest):
    """What setup.py builds from, as in this working tree (no caches, no links)."""
    skip = shutil.ignore_patterns('__pycache__', '*.pyc', '.mim', '*.egg-info')
    os.makedirs(dest)
    for name in ('setup.py', 'MANIFEST.in', 'README.md'):
        shutil.copy2(osp.join(ROOT, name), dest)
    for name in ('mmrepvgg', 'configs', 'tools'):
        shutil.copytree(osp.join(ROOT, name), osp.join(dest, name), ignore=skip)
    return dest


def _build(hook, source, out):
    """setuptools' PEP 517 ``hook`` (build_sdist, build_wheel, build_editable) run in
    ``source`` as pip runs it; the file it made."""
    os.makedirs(out, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, '-c', 'import sys, setuptools.build_meta as b; '
         f'print("BUILT", b.{hook}(sys.argv[1]))', out],
        cwd=source, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    built = [line.split(' ', 1)[1] for line in proc.stdout.splitlines()
             if line.startswith('BUILT ')]
    return osp.join(out, built[-1])


def _check(site_dir, cwd, *names):
    """CHECK's findings, run from ``cwd`` with the package installed in ``site_dir``:
    a dict of its lines, and the files ``names`` (``pkg::`` names) resolve to."""
    stack = sysconfig.get_paths()['purelib']
    proc = subprocess.run([sys.executable, '-S', '-W', 'ignore', '-c', CHECK, site_dir, *names],
                          cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=stack))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    found = dict(line.split(': ', 1) for line in lines if not line.startswith('resolved: '))
    return found, [line.split(': ', 1)[1] for line in lines if line.startswith('resolved: ')]


def _files(folder):
    """Every file under ``folder``, relative, as the build copies them."""
    return sorted(osp.relpath(osp.join(d, f), folder) for d, dirs, files in os.walk(folder)
                  for f in files if '__pycache__' not in d and not f.endswith('.pyc'))


@pytest.fixture(scope='module')
def builds(tmp_path_factory):
    """A copy of the checkout installed editable (its .mim links made), then its sdist
    (made with those links there, as a developer would), and the wheel built from the
    unpacked sdist (as pip and ``python -m build`` do) over an earlier build's leftovers."""
    tmp = tmp_path_factory.mktemp('packaging')
    source = _copy_checkout(str(tmp / 'checkout'))
    editable = _build('build_editable', source, str(tmp / 'editable'))
    sdist = _build('build_sdist', source, str(tmp / 'sdist'))
    with tarfile.open(sdist) as tar:
        members = [m.name.split('/', 1)[1] for m in tar.getmembers() if '/' in m.name]
        tar.extractall(str(tmp / 'unpacked'), filter='data')
    unpacked = osp.join(str(tmp / 'unpacked'), os.listdir(str(tmp / 'unpacked'))[0])
    # what an earlier build left in build/: a module since moved away
    stale = osp.join(unpacked, 'build', 'lib', 'mmrepvgg', 'apis', 'moved_away.py')
    os.makedirs(osp.dirname(stale))
    with open(stale, 'w') as f:
        f.write('STALE = True\n')
    wheel = _build('build_wheel', unpacked, str(tmp / 'wheel'))
    elsewhere = tmp / 'elsewhere'
    elsewhere.mkdir()
    (elsewhere / 'user.py').write_text(USER_CONFIG)
    return dict(tmp=tmp, source=source, editable=editable, sdist_members=members,
                unpacked=unpacked, wheel=wheel, elsewhere=str(elsewhere))


def test_sdist_and_wheel_carry_the_configs_and_tools(builds):
    configs, tools = _files(osp.join(ROOT, 'configs')), _files(osp.join(ROOT, 'tools'))
    assert f'{NAME}.py' in configs and any(c.startswith('_base_/') for c in configs)
    assert 'reproduce.py' in tools and 'dist_run.sh' in tools
    members = set(builds['sdist_members'])
    assert {f'configs/{c}' for c in configs} | {f'tools/{t}' for t in tools} <= members
    assert not any('.mim' in m for m in members), 'the sdist carries the editable links'
    with zipfile.ZipFile(builds['wheel']) as wheel:
        names = wheel.namelist()
    mim = sorted(n.split('mmrepvgg/.mim/', 1)[1] for n in names
                 if n.startswith('mmrepvgg/.mim/'))
    assert 'mmrepvgg/apis/config.py' in names
    assert 'mmrepvgg/apis/moved_away.py' not in names, 'a stale build/ module shipped'
    assert mim == sorted([f'configs/repvgg/{c}' for c in configs]
                         + [f'tools/{t}' for t in tools] + ['model-index.yml'])
    # a wheel build copies into its build folder, never into the tree it builds from
    assert not osp.lexists(osp.join(builds['unpacked'], 'mmrepvgg', '.mim'))


def test_installed_wheel_serves_its_configs_from_elsewhere(builds):
    site = str(builds['tmp'] / 'site')
    with zipfile.ZipFile(builds['wheel']) as wheel:
        wheel.extractall(site)  # a pure-Python wheel installs as its files
    package = osp.join(site, 'mmrepvgg')
    mim = osp.join(package, '.mim')
    base = '_base_/pspnet_r50-d8_paper-recipe_cityscapes.py'
    got, resolved = _check(site, builds['elsewhere'], f'mmrepvgg::repvgg/{NAME}.py',
                           f'mmrepvgg::repvgg/{base}')
    # mmengine resolves _base_ before it imports custom_imports: not before mmrepvgg is
    assert got['before import'] == 'mmengine does not support to load mmrepvgg config.'
    assert got['package'] == package
    assert got['user config'] == 'mmrepvgg.RepVGG A0 mmseg'
    # what docs/configs.md says: the name is for _base_ (and the tools), not fromfile
    assert got['fromfile pkg::'] == 'FileNotFoundError'
    assert got['suite'] == osp.join(mim, 'configs', 'repvgg', f'{NAME}.py')
    assert got['tools'] == osp.join(mim, 'tools')
    assert resolved == [osp.join(mim, 'configs', 'repvgg', f'{NAME}.py'),
                        osp.join(mim, 'configs', 'repvgg', base)]


def test_editable_install_serves_the_checkouts_configs(builds):
    source = builds['source']
    links = osp.join(source, 'mmrepvgg', '.mim')
    assert os.readlink(osp.join(links, 'configs', 'repvgg')) == osp.join('..', '..', '..',
                                                                          'configs')
    assert os.readlink(osp.join(links, 'tools')) == osp.join('..', '..', 'tools')
    site = str(builds['tmp'] / 'editable_site')
    with zipfile.ZipFile(builds['editable']) as wheel:
        wheel.extractall(site)  # the .pth and finder that point at the checkout
    # a config added to the checkout is served at once
    shutil.copy(osp.join(source, 'configs', f'{NAME}.py'),
                osp.join(source, 'configs', 'added_later.py'))
    got, resolved = _check(site, builds['elsewhere'], 'mmrepvgg::repvgg/added_later.py')
    assert got['package'] == osp.join(source, 'mmrepvgg')
    assert got['user config'] == 'mmrepvgg.RepVGG A0 mmseg'
    assert osp.realpath(got['suite']) == osp.join(source, 'configs', f'{NAME}.py')
    assert osp.realpath(got['tools']) == osp.join(source, 'tools')
    assert [osp.realpath(p) for p in resolved] == [
        osp.join(source, 'configs', 'added_later.py')]
