"""The benchmark's plot: each backbone's measured images/s (at its fastest mode, and
eager) against its ImageNet top-1 from the RepVGG paper (:data:`PAPER_TOP1`), as a PNG.
Needs matplotlib, imported only when a plot is written."""
import os
import os.path as osp
from typing import Any, Dict, List, Sequence

from .report import median_ms

__all__ = ['PAPER_TOP1', 'write_plot']

#: ImageNet top-1 of the paper's table (RepVGG paper, 120 epochs; ResNets as reported there).
PAPER_TOP1 = {'RepVGG-A0': 72.41, 'RepVGG-A1': 74.46, 'RepVGG-A2': 76.48,
              'RepVGG-B0': 75.14, 'RepVGG-B1g4': 77.58, 'RepVGG-B1g2': 77.78,
              'RepVGG-B1': 78.37, 'RepVGG-B2g4': 78.50, 'RepVGG-B2': 78.78,
              'ResNet-50': 76.31, 'ResNet-101': 77.21}


def write_plot(path: str, rows: Sequence[Dict[str, Any]], env: Dict[str, Any],
               precision: str, batch_size: int, input_size: Sequence[int]) -> List[str]:
    """Backbone images/s (each at its fastest mode) against the paper's ImageNet top-1,
    from the result ``rows`` of ``precision`` and the run's ``env`` (its device, CPU or
    GPU and threads label the axis). Returns the models left out (no top-1 in the paper)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    points, left_out = {}, []
    for r in rows:
        if r['kind'] != 'backbone' or r['precision'] != precision or median_ms(r) is None:
            continue
        if r['model'] not in PAPER_TOP1:
            left_out.append(r['model'])
            continue
        series = 'ResNet' if r['model'].startswith('ResNet') else r['form']
        key = (series, r['model'])
        eager = r['mode'] == 'eager'
        best = points.get(key, {})
        if 'best' not in best or r['images_per_s'] > best['best']['images_per_s']:
            best['best'] = r
        if eager:
            best['eager'] = r
        points[key] = best
    styles = {'fused': dict(marker='o', color='tab:red', label='RepVGG fused'),
              'train': dict(marker='o', color='tab:blue', mfc='none',
                            label='RepVGG training form'),
              'ResNet': dict(marker='s', color='tab:gray', label='ResNet (mmdet)')}
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    modes_used = set()
    for series, style in styles.items():
        pts = sorted(((PAPER_TOP1[m], v['best']) for (s, m), v in points.items()
                      if s == series), key=lambda p: p[0])
        if not pts:
            continue
        xs = [p[1]['images_per_s'] for p in pts]
        ys = [p[0] for p in pts]
        ax.plot(xs, ys, linestyle='-' if series != 'ResNet' else 'none', **style)
        if series != 'train':  # (a training-form point sits left of its fused point)
            for x, y, (_, r) in zip(xs, ys, pts):
                ax.annotate(r['model'].replace('RepVGG-', ''), (x, y),
                            textcoords='offset points', xytext=(5, -3), fontsize=8)
        modes_used.update(p[1]['mode'] for p in pts)
        eager = [(PAPER_TOP1[m], v['eager']) for (s, m), v in points.items()
                 if s == series and 'eager' in v and v['eager'] is not v['best']]
        if eager:
            ax.plot([e[1]['images_per_s'] for e in eager], [e[0] for e in eager],
                    linestyle='none', marker=style['marker'], color=style['color'],
                    alpha=0.35, mfc='none', label=f'{style["label"]}, eager')
    on_cpu = env['device'].split(':')[0] == 'cpu'
    ax.set_xlabel(f'images/s ({env.get("cpu") if on_cpu else env.get("gpu")}'
                  f', batch {batch_size}, {input_size[0]}x{input_size[1]}, '
                  f'{precision}, {env["threads"]} threads)', fontsize=8)
    ax.set_ylabel('ImageNet top-1 (%, paper)')
    ax.set_title('RepVGG vs ResNet backbones: measured speed, accuracy from the paper\n'
                 f'solid markers: each model at its fastest mode ({", ".join(sorted(modes_used))})'
                 '; faint: eager', fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc='lower left')
    fig.tight_layout()
    os.makedirs(osp.dirname(osp.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return sorted(set(left_out))
