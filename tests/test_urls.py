"""Checkpoints given as URLs, served by a loopback HTTP server the tests start.

What tools/test.py (with and without --deploy), tools/convert.py (fuse and --release),
tools/train.py --resume (mmrepvgg.apis, mmrepvgg.convert) and the backbone's
Pretrained init run each take a URL, download it
once (the server counts the GET requests) and read it with weights_only loading; a
missing URL or an unsupported scheme is a clear error. Every test points TORCH_HOME
(torch's and mmengine's download cache) and MMENGINE_HOME at its own tmp folders, so
nothing is cached across tests, and nothing leaves the machine.
"""
import errno
import fractions
import functools
import glob
import http.server
import json
import os
import os.path as osp
import shutil
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch
from mmengine.config import Config

from helpers import (A0_BLOCKS, MMPRETRAIN_NAMES, ROOT, SEG_CONFIG, SEG_MODEL, TRAIN,
                     assert_resumed_from_iter_1, assert_same_segmentation,
                     assert_same_weights, load_state, log_text, rename, run_convert,
                     run_convert_release, run_entry, run_test, seg_maps, source_model)
from mmrepvgg import apis
from mmrepvgg.apis.config import apply_mini
from mmrepvgg.apis.deploy import export
from mmrepvgg.checkpoint import imagenet_checkpoint
from mmrepvgg.checkpoint.fetch import CheckpointDownloadError, load_file
from mmrepvgg.errors import MMRepVGGError
from mmrepvgg.models import RepVGG
from mmrepvgg.reparam import format_report


class _Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        self.server.gets.append(self.path)
        time.sleep(self.server.delay)  # a slow link, so that clients overlap
        keep = self.server.cut.get(self.path)
        if keep is None:
            return super().do_GET()
        # a server that drops the connection part-way: the whole length announced,
        # only the first `keep` bytes sent
        data = (self.server.folder / self.path.lstrip('/')).read_bytes()
        self.send_response(200)
        self.send_header('Content-Type', 'application/octet-stream')
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        self.wfile.write(data[:keep])
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):  # keep the test output clean
        pass


class Server:
    """Serves the files of ``folder`` on 127.0.0.1 and records every GET path."""

    def __init__(self, folder):
        self.folder = folder
        self.httpd = http.server.ThreadingHTTPServer(
            ('127.0.0.1', 0), functools.partial(_Handler, directory=str(folder)))
        self.httpd.gets = self.gets = []
        self.httpd.cut = self.cut = {}  # URL path -> bytes sent before closing
        self.httpd.folder = folder
        self.httpd.delay = 0
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name):
        return f'http://127.0.0.1:{self.httpd.server_address[1]}/{name}'

    def serve(self, source, name):
        shutil.copy(str(source), str(self.folder / name))
        return self.url(name)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def _fresh_cache(monkeypatch, folder):
    """Point torch's download cache at an empty folder; return where downloads land."""
    monkeypatch.setenv('TORCH_HOME', str(folder))
    return folder / 'hub' / 'checkpoints'


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv('MMENGINE_HOME', str(tmp_path / 'mmengine_home'))
    for var in ('NO_PROXY', 'no_proxy'):  # a configured proxy must not see loopback
        monkeypatch.setenv(var, '127.0.0.1,localhost')
    folder = tmp_path / 'served'
    folder.mkdir()
    srv = Server(folder)
    srv.cache = _fresh_cache(monkeypatch, tmp_path / 'torch_home')
    yield srv
    srv.close()


@pytest.fixture
def unpickles(monkeypatch):
    """The files the checkpoint loader unpickles (verifying downloads included)."""
    from mmrepvgg.checkpoint import fetch
    read = []

    def counted(path, *args, **kwargs):
        read.append(os.path.basename(path))
        return loader(path, *args, **kwargs)

    loader = fetch.torch_load_safely
    monkeypatch.setattr(fetch, 'torch_load_safely', counted)
    return read


@pytest.fixture
def release(randomize, tmp_path):
    """An mmpretrain-layout release file of RepVGG-A0 (backbone.stem.branch_3x3...,
    head.fc.*), renamed by hand from our model's state dict: (source model, path)."""
    source = source_model(randomize)
    state = rename(source.state_dict(), MMPRETRAIN_NAMES, prefix='backbone.')
    assert 'backbone.stem.branch_3x3.conv.weight' in state
    assert 'backbone.stage_1.1.branch_norm.running_var' in state
    state['head.fc.weight'] = torch.randn(1000, 1280)
    state['head.fc.bias'] = torch.zeros(1000)
    path = tmp_path / 'repvgg-A0_in1k.pth'
    torch.save(dict(meta=dict(), state_dict=state), path)
    return source, path


# ------------------------------------------------------------------------ tools/test.py
def test_test_tool_by_url_with_and_without_deploy(seg, server, tmp_path, monkeypatch,
                                                  unpickles):
    url = server.serve(seg.ckpt, 'iter_1.pth')

    def test(ckpt, name, **kwargs):
        return run_test(seg, SEG_CONFIG, ckpt, tmp_path / name, tmp_path / f'{name}_maps',
                        SEG_MODEL, **kwargs)

    plain, plain_work = test(url, 'plain')
    # one download serves both the form check and the runner, which reads the cached
    # copy (byte for byte the served file) with weights_only loading, not the URL; the
    # object verifying the download loaded is the one the model gets: one unpickling
    assert server.gets == ['/iter_1.pth']
    assert len(unpickles) == 1, unpickles
    cached = server.cache / 'iter_1.pth'
    assert cached.read_bytes() == seg.ckpt.read_bytes()
    assert f'Load checkpoint from {cached}' in log_text(plain_work)
    assert plain['aAcc'] > 0

    server.cache = _fresh_cache(monkeypatch, tmp_path / 'torch_home_deploy')
    deploy, deploy_work = test(url, 'deploy', deploy=True)
    assert server.gets == ['/iter_1.pth'] * 2  # once more, into the fresh cache
    log = log_text(deploy_work)
    assert f'Load checkpoint from {server.cache / "iter_1.pth"}' in log
    assert f'ReparamHook: fused {A0_BLOCKS} blocks' in log
    assert_same_segmentation(seg_maps(tmp_path / 'plain_maps'),
                             seg_maps(tmp_path / 'deploy_maps'), plain, deploy)


def test_export_by_url_reads_the_file_once(seg, server, tmp_path, unpickles):
    url = server.serve(seg.ckpt, 'iter_1.pth')
    out = tmp_path / 'backbone.onnx'
    report = run_entry(export, seg.root, SEG_CONFIG, url, out, mini=True, part='backbone',
                       options=SEG_MODEL)
    assert server.gets == ['/iter_1.pth'] and out.is_file()
    assert len(unpickles) == 1, unpickles  # the download's verification read serves all
    assert report['fusion']['blocks'] == A0_BLOCKS and report['parity']['within']


def test_url_checkpoint_needing_unsafe_globals_is_refused(seg, server, tmp_path):
    """mmengine reads http(s) checkpoints through torch.hub with weights_only=False; ours
    are read with weights_only=True, so a file needing other globals is refused."""
    evil = tmp_path / 'evil.pth'
    torch.save(dict(state_dict={'w': torch.zeros(1)}, meta=dict(x=fractions.Fraction(1, 3))),
               evil)
    url = server.serve(evil, 'evil.pth')
    with pytest.raises(ValueError, match=r'refusing to load .*evil\.pth.*fractions\.Fraction'):
        load_file(url)
    work = tmp_path / 'work'
    with pytest.raises(MMRepVGGError, match='refusing to load'):
        run_entry(apis.test, seg.root, SEG_CONFIG, url, mini=True, work_dir=work,
                  options=SEG_MODEL)
    assert not work.exists()


# --------------------------------------------------------------------- tools/convert.py
def test_convert_by_url(seg, server, release, tmp_path):
    url = server.serve(seg.ckpt, 'iter_1.pth')
    fused = tmp_path / 'fused.pth'
    report = run_convert(seg.root, SEG_CONFIG, url, fused, SEG_MODEL)
    assert f'fused {A0_BLOCKS} blocks' in format_report(report)  # what tools/convert.py prints
    assert server.gets == ['/iter_1.pth']
    # seg.fused: converted from the local file
    got, ref = load_state(fused), load_state(seg.fused)
    assert got['meta']['source_checkpoint'] == url
    assert got['state_dict'].keys() == ref['state_dict'].keys()
    for key, value in ref['state_dict'].items():
        torch.testing.assert_close(got['state_dict'][key], value, rtol=0, atol=0, msg=key)

    source, path = release
    release_url = server.serve(path, path.name)
    out = tmp_path / 'converted.pth'
    info = run_convert_release(tmp_path, release_url, out)
    # tools/convert.py prints 'mmpretrain layout, training form; dropped 2 head keys'
    assert (info['layout'], info['deploy'], len(info['dropped'])) == ('mmpretrain', False, 2)
    assert server.gets == ['/iter_1.pth', f'/{path.name}']
    state = load_state(out)['state_dict']
    assert state.keys() == source.state_dict().keys()
    for key, value in source.state_dict().items():
        assert torch.equal(state[key], value), key


# ------------------------------------------------------------ backbone Pretrained init
def test_pretrained_init_by_url_and_model_zoo_name(server, release):
    source, path = release
    url = server.serve(path, path.name)
    for _ in range(2):  # the second model finds the first download in the cache
        model = RepVGG('A0', init_cfg=dict(type='Pretrained', checkpoint=url))
        model.init_weights()
        assert_same_weights(source, model.eval())
    assert server.gets == [f'/{path.name}']

    # an open-mmlab:// name, resolved through mmengine's table (extended by the
    # open_mmlab.json in MMENGINE_HOME, as mmengine documents) to the loopback server
    zoo_url = server.serve(path, 'zoo-a0.pth')
    home = os.environ['MMENGINE_HOME']
    os.makedirs(home, exist_ok=True)
    with open(osp.join(home, 'open_mmlab.json'), 'w') as f:
        json.dump({'repvgg_a0_loopback': zoo_url}, f)
    model = RepVGG('A0', init_cfg=dict(type='Pretrained',
                                       checkpoint='open-mmlab://repvgg_a0_loopback'))
    model.init_weights()
    assert_same_weights(source, model.eval())
    assert server.gets == [f'/{path.name}', '/zoo-a0.pth']


# ------------------------------------------------------------------------ tools/train.py
def test_resume_by_url(seg, server, tmp_path):
    url = server.serve(seg.ckpt, 'iter_1.pth')
    work = tmp_path / 'work'
    run_entry(apis.train, seg.root, SEG_CONFIG, mini=True, work_dir=work, resume=url,
              options=TRAIN + SEG_MODEL + ['train_cfg.max_iters=2'])
    assert server.gets == ['/iter_1.pth']
    assert_resumed_from_iter_1(work)
    # the runner read the downloaded file (weights_only), not the URL (torch.hub)
    dumped = Config.fromfile(str(work / osp.basename(SEG_CONFIG)))
    assert dumped.load_from == str(server.cache / 'iter_1.pth')


# ------------------------------------------------------------------------- bad input
def test_missing_url_and_bad_scheme_are_clear_errors(seg, server, tmp_path):
    missing = server.url('missing/iter_4.pth')
    work = tmp_path / 'work'
    for deploy in (False, True):
        with pytest.raises(MMRepVGGError) as err:
            run_entry(apis.test, seg.root, SEG_CONFIG, missing, mini=True, work_dir=work,
                      deploy=deploy, options=SEG_MODEL)
        message = str(err.value)
        assert missing in message and 'HTTP 404' in message, message
        assert 'Traceback' not in message
    # what tools/convert.py exits with
    with pytest.raises(CheckpointDownloadError,
                       match=r'could not download .*missing/iter_4\.pth.*404'):
        run_convert(seg.root, SEG_CONFIG, missing, tmp_path / 'out.pth', SEG_MODEL)
    with pytest.raises(CheckpointDownloadError, match='HTTP 404'):
        run_convert_release(seg.root, missing, tmp_path / 'out.pth')
    with pytest.raises(MMRepVGGError, match='HTTP 404'):
        run_entry(apis.train, seg.root, SEG_CONFIG, mini=True, work_dir=work, resume=missing,
                  options=SEG_MODEL)

    model = RepVGG('A0', init_cfg=dict(type='Pretrained', checkpoint=missing))
    with pytest.raises(CheckpointDownloadError) as err:
        model.init_weights()
    message = str(err.value)
    assert missing in message and 'HTTP 404' in message and 'init_cfg=None' in message
    assert 'Put the release file there' not in message  # that is for local paths

    for bad, expected in [('ftp://127.0.0.1/iter_1.pth', 'unsupported checkpoint location'),
                          ('open-mmlab://no_such_model', 'unknown model name')]:
        with pytest.raises(MMRepVGGError, match=expected) as err:
            run_entry(apis.test, seg.root, SEG_CONFIG, bad, mini=True, work_dir=work,
                      options=SEG_MODEL)
        assert bad in str(err.value)

    assert len(server.gets) == 6 and set(server.gets) == {'/missing/iter_4.pth'}
    assert not work.exists() and not (tmp_path / 'out.pth').exists()
    # no partial download is left in the cache
    assert not server.cache.exists() or os.listdir(server.cache) == []


# --------------------------------------------------------------------- bundled configs
REPVGG_CONFIGS = sorted(glob.glob(osp.join(ROOT, 'configs', '*repvgg*.py')))


@pytest.mark.parametrize('config', REPVGG_CONFIGS, ids=osp.basename)
def test_bundled_configs_start_from_hosted_weights_but_mini_downloads_nothing(config):
    cfg = Config.fromfile(config)
    backbone = cfg.model.backbone
    assert backbone.init_cfg.checkpoint == imagenet_checkpoint(backbone.arch)
    apply_mini(cfg)
    assert cfg.model.backbone.init_cfg is None


@pytest.mark.parametrize('arch', ['B2g2', 'B3g2'])
def test_arch_without_hosted_weights_names_the_official_file(arch):
    with pytest.raises(ValueError, match=f'checkpoints/RepVGG-{arch}-train.pth'):
        imagenet_checkpoint(arch)


# ------------------------------------------------------------ verified downloads
def _weights_file(path, megabytes=2):
    """A plain state dict of about ``megabytes`` MB (zip format, as torch.save writes)."""
    state = {f'w{i}': torch.randn(megabytes * 1_000_000 // 4 // 4) for i in range(4)}
    torch.save(state, path)
    return state


def _assert_same_state(got, state):
    assert got.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(got[key], value), key


def test_cut_download_is_not_cached_and_the_next_call_downloads_again(server, tmp_path):
    state = _weights_file(tmp_path / 'w.pth')
    url = server.serve(tmp_path / 'w.pth', 'weights.pth')
    size = (tmp_path / 'w.pth').stat().st_size
    server.cut['/weights.pth'] = size // 2
    with pytest.raises(CheckpointDownloadError) as err:
        load_file(url)
    message = str(err.value)
    assert url in message
    assert f'got {size // 2 / 1e6:.1f} MB of {size / 1e6:.1f} MB' in message, message
    # nothing under the cached name, and no temporary file left beside it
    assert not server.cache.exists() or os.listdir(server.cache) == []

    del server.cut['/weights.pth']  # the server is back: the same URL, the whole file
    _assert_same_state(load_file(url), state)
    assert os.listdir(server.cache) == ['weights.pth']
    _assert_same_state(load_file(url), state)  # from the cache now
    assert server.gets == ['/weights.pth'] * 2


def test_hash_prefix_in_the_name_is_checked(server, tmp_path):
    from mmrepvgg.fileio import sha256_file
    state = _weights_file(tmp_path / 'w.pth', megabytes=1)
    digest = sha256_file(tmp_path / 'w.pth')
    good = server.serve(tmp_path / 'w.pth', f'repvgg-a0_in1k-{digest[:8]}.pth')
    _assert_same_state(load_file(good), state)
    bad_prefix = 'deadbeef' if not digest.startswith('deadbeef') else 'feedface'
    bad = server.serve(tmp_path / 'w.pth', f'repvgg-a0_in1k-{bad_prefix}.pth')
    with pytest.raises(CheckpointDownloadError, match=f'starts with {digest[:8]}.*{bad_prefix}'):
        load_file(bad)
    assert os.listdir(server.cache) == [f'repvgg-a0_in1k-{digest[:8]}.pth']
    # a name that merely ends in a number is no hash
    _assert_same_state(load_file(server.serve(tmp_path / 'w.pth', 'epoch-12.pth')), state)


def test_html_page_served_with_status_200_is_refused(server):
    (server.folder / 'page.pth').write_text(
        '<!DOCTYPE html><html><body>Sign in to download</body></html>')
    url = server.url('page.pth')
    with pytest.raises(CheckpointDownloadError, match='HTML page') as err:
        load_file(url)
    assert url in str(err.value)
    assert not server.cache.exists() or os.listdir(server.cache) == []


def test_broken_cached_copy_is_downloaded_again(server, tmp_path, monkeypatch):
    state = _weights_file(tmp_path / 'w.pth', megabytes=1)
    url = server.serve(tmp_path / 'w.pth', 'weights.pth')
    server.cache.mkdir(parents=True)
    cached = server.cache / 'weights.pth'
    # an older tool's half file under the cached name
    cached.write_bytes((tmp_path / 'w.pth').read_bytes()[:100_000])
    _assert_same_state(load_file(url), state)
    assert server.gets == ['/weights.pth']
    assert cached.read_bytes() == (tmp_path / 'w.pth').read_bytes()

    # a broken copy that cannot be removed: the error names the file to delete
    cached.write_bytes(b'')

    def refuse(path):
        raise PermissionError(13, 'Permission denied', str(path))
    monkeypatch.setattr(os, 'remove', refuse)
    with pytest.raises(CheckpointDownloadError, match='delete that file') as err:
        load_file(url)
    assert str(cached) in str(err.value) and 'empty' in str(err.value)


LOAD_IN_A_PROCESS = """
import sys
from mmrepvgg import load_file
state = load_file(sys.argv[1])
print('loaded', len(state), 'tensors', flush=True)
"""


def test_processes_sharing_a_cache_download_once(server, tmp_path):
    """The ranks of a distributed job (here two processes started together, one cache
    folder) take turns: one downloads and verifies, the other reads its file."""
    state = _weights_file(tmp_path / 'w.pth', megabytes=1)
    url = server.serve(tmp_path / 'w.pth', 'weights.pth')
    server.delay = 2.0
    env = dict(os.environ)  # TORCH_HOME: the test's own cache
    procs = [subprocess.Popen([sys.executable, '-c', LOAD_IN_A_PROCESS, url], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert all(f'loaded {len(state)} tensors' in out for out in outputs), outputs
    assert server.gets == ['/weights.pth'], outputs
    assert sum('using the copy downloaded before' in out for out in outputs) == 1, outputs


@pytest.fixture
def flock_calls(monkeypatch):
    """fcntl.flock counted; ``calls.fail`` set to an errno makes every lock raise it, as
    a filesystem mounted without locks (Lustre without flock, NFS with nolock) does."""
    import fcntl
    from mmrepvgg.checkpoint import fetch
    monkeypatch.setattr(fetch, '_warned_unlocked', set())  # a fresh process
    real = fcntl.flock

    class Calls(list):
        fail = None

    calls = Calls()

    def flock(fd, op):
        calls.append(op)
        if calls.fail is not None and op != fcntl.LOCK_UN:
            raise OSError(calls.fail, os.strerror(calls.fail))
        return real(fd, op)

    monkeypatch.setattr(fcntl, 'flock', flock)
    return calls


@pytest.mark.parametrize('code', [errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS],
                         ids=errno.errorcode.get)
def test_cache_on_a_filesystem_without_locks_downloads_with_one_warning(
        server, tmp_path, flock_calls, code):
    state = _weights_file(tmp_path / 'w.pth', megabytes=1)
    first = server.serve(tmp_path / 'w.pth', 'first.pth')
    second = server.serve(tmp_path / 'w.pth', 'second.pth')
    flock_calls.fail = code
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        _assert_same_state(load_file(first), state)
        _assert_same_state(load_file(second), state)  # locks again, warns no more
        _assert_same_state(load_file(first), state)  # cached: no lock asked for
    assert len(flock_calls) == 2
    unlocked = [w for w in caught if 'has no file locks' in str(w.message)]
    assert len(unlocked) == 1, [str(w.message) for w in caught]
    assert '.mmrepvgg-download.lock' in str(unlocked[0].message)
    assert sorted(os.listdir(server.cache)) == ['first.pth', 'second.pth']
    assert server.gets == ['/first.pth', '/second.pth']


def test_a_whole_cached_file_is_read_without_the_lock(server, tmp_path, flock_calls):
    state = _weights_file(tmp_path / 'w.pth', megabytes=1)
    url = server.serve(tmp_path / 'w.pth', 'weights.pth')
    _assert_same_state(load_file(url), state)  # downloads under the lock
    import fcntl
    assert flock_calls == [fcntl.LOCK_EX, fcntl.LOCK_UN]
    flock_calls.fail = errno.EIO  # any lock asked for now would raise
    _assert_same_state(load_file(url), state)
    assert flock_calls == [fcntl.LOCK_EX, fcntl.LOCK_UN]


def test_other_lock_errors_are_not_swallowed(server, tmp_path, flock_calls):
    _weights_file(tmp_path / 'w.pth', megabytes=1)
    url = server.serve(tmp_path / 'w.pth', 'weights.pth')
    flock_calls.fail = errno.EIO  # a real I/O failure, not a missing feature
    with pytest.raises(OSError) as err:
        load_file(url)
    assert err.value.errno == errno.EIO
    assert server.gets == []
