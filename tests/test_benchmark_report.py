"""The comparison report of the benchmark (mmrepvgg.benchmark.report, what
tools/benchmark.py prints), on made-up timings (no model is run)."""
from mmrepvgg.benchmark.report import comparisons, format_comparisons


def _row(key, mode, ms, kind='backbone'):
    model, _, form = key.partition('/')
    return dict(key=key, model=model, form=form, kind=kind, mode=mode, precision='fp32',
                median_ms=ms, error=None)


ROWS = [_row('RepVGG-X/train', 'eager', 300.0), _row('RepVGG-X/fused', 'eager', 200.0),
        _row('ResNet-101', 'eager', 330.0),
        _row('RepVGG-X/train', 'compile', 250.0), _row('RepVGG-X/fused', 'compile', 180.0),
        _row('ResNet-101', 'compile', 150.0)]


def test_ratios_per_mode_best_of_each_and_deployed():
    comp = comparisons(ROWS, ['fp32'], ['eager', 'compile'])
    eager, compiled = comp['same_treatment']
    assert (eager['mode'], compiled['mode']) == ('eager', 'compile')
    assert eager['speedup_vs_train'] == 300 / 200
    assert eager['time_vs_ResNet-101'] == 200 / 330
    assert compiled['speedup_vs_train'] == 250 / 180
    # each at its fastest mode: the ResNet's is compile, so the fused model is slower
    best, = comp['best_of_each']
    assert comp['best_mode'] == {'RepVGG-X/train fp32': 'compile',
                                 'RepVGG-X/fused fp32': 'compile',
                                 'ResNet-101 fp32': 'compile'}
    assert best['time_vs_ResNet-101'] == 180 / 150
    # fused at its best against the others as they come (eager)
    deployed, = comp['deployed_vs_eager']
    assert deployed['speedup_vs_train'] == 300 / 180
    assert deployed['time_vs_ResNet-101'] == 180 / 330


def test_report_states_the_measured_ratios():
    text = format_comparisons(comparisons(ROWS, ['fp32'], ['eager', 'compile']))
    lines = text.splitlines()
    assert ('  [eager fp32] RepVGG-X: fused 200.0 ms; train 300.0 ms -> fused speed-up '
            '1.50x; ResNet-101 330.0 ms -> fused takes 0.61x its time') in lines
    assert ('  [fp32] RepVGG-X: fused @compile 180.0 ms; train @compile 250.0 ms -> fused '
            'speed-up 1.39x; ResNet-101 @compile 150.0 ms -> fused takes 1.20x its time'
            ) in lines
    assert ('  [fused fp32] RepVGG-X: fused @compile 180.0 ms; train @eager 300.0 ms -> '
            'fused speed-up 1.67x; ResNet-101 @eager 330.0 ms -> fused takes 0.55x its time'
            ) in lines
    assert '  fastest mode of ResNet-101 fp32: compile' in lines


def test_a_failed_row_is_left_out_of_the_ratios():
    rows = ROWS[:2] + [dict(_row('ResNet-101', 'eager', None), error='RuntimeError: x')]
    entry, = comparisons(rows, ['fp32'], ['eager'])['same_treatment']
    assert entry['speedup_vs_train'] == 1.5 and 'time_vs_ResNet-101' not in entry
