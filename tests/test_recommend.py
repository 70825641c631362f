"""benchmark.py --recommend: every deployable form of a config's fused model timed on this
CPU with its output difference from the fp32 model (with --metric, its metric on the
config's test data), and the fastest within the budget named with the commands that
write and test it."""
import importlib.util
import os
import re
import time

import pytest

from helpers import ROOT, SEG_CONFIG, SEG_MODEL, parse_options, working_dir
from mmrepvgg.benchmark.timing import Candidate, Progress, benchmark_interleaved
from mmrepvgg.benchmark.recommend import cpu_class, format_recommendation, recommend
from mmrepvgg.errors import MMRepVGGError
from mmrepvgg.reparam import rounding_bound

FORMS = (('eager', 'fp32'), ('onnxruntime', 'fp32'), ('eager', 'bf16'),
         ('onnxruntime-int8', 'int8'))


def test_recommendation_is_the_fastest_form_within_the_budget(seg, capsys):
    """The session's trained PSPNet (its checkpoint's weights, fused), at the mini test
    size; a few forms keep it quick, the choice is made the same way over all of them."""
    cwd = os.getcwd()
    os.chdir(seg.root)
    try:
        # no time limit: every form gives its 2 runs, also where bf16 is slow (a CPU
        # without bf16 instructions; the limit has a test of its own below)
        result = recommend(SEG_CONFIG, str(seg.ckpt), cfg_options=parse_options(SEG_MODEL),
                           mini=True, max_drop=1e-3, forms=FORMS, repeats=2, warmup=1,
                           time_limit=None)
    finally:
        os.chdir(cwd)
    rows = {(r['mode'], r['precision']): r for r in result['rows']}
    assert set(rows) | {tuple(k.split()) for k in result['left_out']} == set(FORMS)
    # a line per form as its timing ends, numbered as it finishes; slow set-ups announced
    progress = capsys.readouterr().err
    for n, row in enumerate(result['rows'], 1):
        assert re.search(rf'\[\d/{len(rows)}\] {row["mode"]} {row["precision"]}: [\d.]+ ms '
                         r'\(median of 2 runs\), rel diff ', progress)
        assert row['runs'] == 2 and not row['time_limited'] and row['setup_s'] > 0
    if ('onnxruntime', 'fp32') in rows:
        assert 'onnxruntime fp32: setting up (ONNX export)...' in progress
    assert result['input'] == [1, 3, 128, 256]
    assert [r['ms'] for r in result['rows']] == sorted(r['ms'] for r in result['rows'])
    eager = rows[('eager', 'fp32')]
    assert eager['speedup'] == 1.0
    # the fused trained weights against the training form: fp32 rounding (the fused form's
    # error against float64 within the bound of the training form's own, both measured by
    # the run that timed them), far inside 1e-3
    assert eager['within'] and eager['fp64_abs_diff'] <= rounding_bound(
        eager['reference_fp64_abs_diff'], eager['output_scale']), eager
    for row in result['rows']:
        assert row['within'] == (row['rel_diff'] is not None and row['rel_diff'] <= 1e-3)
    best = result['recommended']
    assert best is next(r for r in result['rows'] if r['within'])
    assert all(r['ms'] >= best['ms'] for r in result['rows'] if r['within'])

    text = format_recommendation(result)
    assert text.startswith('# ') and f'({cpu_class()})' in text.splitlines()[0]
    assert 'accuracy budget: relative output difference <= 0.001' in text
    line = text.splitlines()[-1]
    assert line.startswith(f'recommended: {best["mode"]} {best["precision"]}')
    # the commands carry the checkpoint, --mini and the config overrides
    assert str(seg.ckpt) in line and '--mini' in line and 'model.backbone.arch=A0' in line
    if best['mode'] == 'onnxruntime':
        assert 'tools/export.py' in line and '--backend onnxruntime' in line


METRIC_FORMS = (('eager', 'fp32'), ('eager', 'bf16'), ('onnxruntime-int8', 'int8'))


def test_metric_budget_is_in_points_of_the_configs_metric(seg, capsys):
    """--metric: each form written and tested as its commands would on the mini test
    data (eager bf16 through tools/test.py --deploy --precision bf16, INT8 through
    export, quantize and test --backend), the drop measured from eager fp32. A time
    limit shorter than any call leaves one timed run per form, after the warm-up."""
    with working_dir(seg.root):
        result = recommend(SEG_CONFIG, str(seg.ckpt), cfg_options=parse_options(SEG_MODEL),
                           mini=True, forms=METRIC_FORMS, repeats=3, warmup=1,
                           time_limit=1e-6, metric=True)
    assert result['metric'] == 'mIoU' and result['max_drop'] == 0.5
    rows = {(r['mode'], r['precision']): r for r in result['rows']}
    assert set(rows) | {tuple(k.split()) for k in result['left_out']} == set(METRIC_FORMS)
    progress = capsys.readouterr().err
    for row in result['rows']:
        assert row['runs'] == 1 and row['time_limited']
        assert (f'{row["mode"]} {row["precision"]}: {row["ms"]:.1f} ms (median of 1 run, '
                'time limit reached)') in progress
        assert isinstance(row['metric'], float), row.get('metric_error')
        assert row['drop'] == pytest.approx(result['base_metric'] - row['metric'])
        assert row['within'] == (row['drop'] <= 0.5)
    assert rows[('eager', 'fp32')]['drop'] == 0 and rows[('eager', 'fp32')]['within']
    best = result['recommended']
    assert best is next(r for r in result['rows'] if r['within'])
    assert all(r['ms'] >= best['ms'] for r in result['rows'] if r['within'])
    assert 'scoring 3 forms with mIoU on the mini test data' in progress

    text = format_recommendation(result)
    assert (f'accuracy budget: mIoU drop <= 0.5 points from eager fp32 '
            f'({result["base_metric"]:.2f} on the mini test data)') in text
    assert 'median of up to 3 timed runs after 1 warm-up, at most 1e-06 s of runs per ' \
        'form' in text
    header = next(line for line in text.splitlines() if line.startswith('form'))
    assert header.split() == ['form', 'ms', 'runs', 'x', 'eager', 'setup', 's', 'rel',
                              'diff', 'mIoU', 'drop', 'within']
    commands = {(r['mode'], r['precision']): ' && '.join(r['commands'])
                for r in result['rows']}
    assert '--deploy --precision bf16 --mini' in commands[('eager', 'bf16')]
    if ('onnxruntime-int8', 'int8') in commands:
        # calibrated on the whole mini test set: the tool's default 32 is more than it has
        assert 'model_int8.onnx --calib 2 --mini' in commands[('onnxruntime-int8', 'int8')]


def test_time_limit_cuts_a_slow_candidates_runs():
    """Each call of 'slow' sleeps 50 ms, so its warm-up and first timed run spend the
    100 ms limit (sleep never returns early): one timed run, then it leaves the rounds;
    'fast' runs all of them."""
    calls = []
    slow = Candidate('slow', lambda: lambda: time.sleep(0.05))
    fast = Candidate('fast', lambda: lambda: calls.append(1))
    done = []

    class Heard(Progress):
        def done(self, cand):
            done.append((cand.name, len(cand.times)))
    benchmark_interleaved([slow, fast], 'cpu', repeats=10, warmup=1, measure_memory=False,
                          time_limit=0.1, progress=Heard())
    assert len(slow.times) == 1 and slow.time_limited
    assert len(fast.times) == 10 and not fast.time_limited and len(calls) == 11
    assert done == [('slow', 1), ('fast', 10)]


def test_one_at_a_time_sets_up_each_candidate_after_the_last_is_released():
    """--recommend's order: each candidate set up, timed and let go before the next is
    set up, so that memory holds one prepared form at a time."""
    events = []

    def candidate(name):
        def setup():
            events.append(('setup', name, [c.fn is None for c in cands]))
            return lambda: events.append(('call', name))
        return Candidate(name, setup)
    cands = [candidate('a'), candidate('b')]
    benchmark_interleaved(cands, 'cpu', repeats=2, warmup=1, measure_memory=False,
                          one_at_a_time=True, progress=Progress(lambda _: None))
    # b was set up after a's three calls, with a released (and b not yet set up)
    assert events == [('setup', 'a', [True, True]), ('call', 'a'), ('call', 'a'),
                      ('call', 'a'), ('setup', 'b', [True, True]), ('call', 'b'),
                      ('call', 'b'), ('call', 'b')]
    assert [len(c.times) for c in cands] == [2, 2] and all(c.fn is None for c in cands)


def test_metric_without_the_test_data_names_it_and_suggests_mini(tmp_path):
    with working_dir(tmp_path), pytest.raises(MMRepVGGError) as error:
        recommend(SEG_CONFIG, 'trained.pth', metric=True)
    message = str(error.value)
    assert 'data/cityscapes/' in message and 'leftImg8bit/val' in message
    assert message.endswith('or score on the bundled mini data with --mini')
    with pytest.raises(MMRepVGGError, match='give CHECKPOINT'):
        recommend(SEG_CONFIG, metric=True)


def _benchmark_tool():
    """tools/benchmark.py as a module (its parse_args), without a process of its own."""
    spec = importlib.util.spec_from_file_location(
        'benchmark_tool', os.path.join(ROOT, 'tools', 'benchmark.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_max_drop_default_follows_metric_and_recommend_options_need_recommend():
    parse_args = _benchmark_tool().parse_args
    args = parse_args(['--recommend', SEG_CONFIG, 'ckpt.pth', '--metric', '--mini',
                       '--time-limit', '5'])
    assert args.metric and args.max_drop is None and args.time_limit == 5
    # the tool's own argument errors: argparse's exit (a tool may exit; the package raises)
    for wrong in (['--metric'], ['--mini'], ['--max-drop', '0.1']):
        with pytest.raises(SystemExit):
            parse_args(['--archs', 'A0', *wrong])
    with pytest.raises(SystemExit):
        parse_args(['--recommend', SEG_CONFIG, '--time-limit', '0'])
