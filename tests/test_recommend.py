"""benchmark.py --recommend: every deployable form of a config's fused model timed on this
CPU with its output difference from the fp32 model, and the fastest within the budget
named with the commands that write and test it."""
import os

from mmrepvgg.apis.recommend import cpu_class, format_recommendation, recommend
from test_tools import SEG_CONFIG, SEG_MODEL, _options

FORMS = (('eager', 'fp32'), ('onnxruntime', 'fp32'), ('eager', 'bf16'),
         ('onnxruntime-int8', 'int8'))


def test_recommendation_is_the_fastest_form_within_the_budget(seg):
    """The session's trained PSPNet (its checkpoint's weights, fused), at the mini test
    size; a few forms keep it quick, the choice is made the same way over all of them."""
    cwd = os.getcwd()
    os.chdir(seg.root)
    try:
        result = recommend(SEG_CONFIG, str(seg.ckpt), cfg_options=_options(SEG_MODEL),
                           mini=True, max_drop=1e-3, forms=FORMS, repeats=2, warmup=1)
    finally:
        os.chdir(cwd)
    rows = {(r['mode'], r['precision']): r for r in result['rows']}
    assert set(rows) | {tuple(k.split()) for k in result['left_out']} == set(FORMS)
    assert result['input'] == [1, 3, 128, 256]
    assert [r['ms'] for r in result['rows']] == sorted(r['ms'] for r in result['rows'])
    eager = rows[('eager', 'fp32')]
    assert eager['speedup'] == 1.0
    # the fused trained weights against the training form: fp32 rounding, far inside 1e-3
    assert eager['rel_diff'] < 1e-5 and eager['within']
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
