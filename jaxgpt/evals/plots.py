"""The report's plots, drawn from the files the stages wrote: WORKDIR/plots/*.png.

* `losses.png`: one panel per stage in a grid, its training (and validation) loss against
  steps (iterations for the online-RL stages, which log their policy and value losses);
* `<rl stage>.png`: per iteration, the reward-model score of the rollouts beside their gold
  accuracy (the proxy and what it stands for), KL to the reference, entropy, reply length;
* `best_of_n.png`: best-of-n with the reward model, gold accuracy and RM score against the
  KL bound (Gao et al. 2022's picture of over-optimisation).

Every panel names its axes with units; figures are sized for reading at 100% (at most three
panels a row).
"""

from __future__ import annotations

import json
import math
import os

from jaxgpt.stages import PIPELINE, RL_STAGES

LOSS_KEYS = ('loss', 'val_loss', 'policy_loss', 'value_loss')  # RL stages log the last two
# Per RL iteration: (metrics.jsonl key, panel title, axis label)
RL_PANELS = (('scores', 'reward-model score', 'raw RM score, mean'),
             ('gold', 'gold accuracy (checker)', 'share right'),
             ('kl', 'KL to the reference', 'nats per reply'),
             ('entropy', 'entropy', 'nats per token'),
             ('response_length', 'reply length', 'tokens'))
PPO_KEYS = tuple(k for k, _, _ in RL_PANELS)
COLUMNS = 3
DPI = 100


def read_metrics(path: str) -> list[dict]:
  """The rows of a metrics.jsonl ([] if absent), less a last line cut short by a crash."""
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    lines = [l for l in f if l.strip()]
  return [json.loads(l) for l in lines if l.rstrip().endswith('}')]


def series(rows, key):
  """(steps, values) of `key`, the last value logged at each step (a resumed run repeats)."""
  last = {int(r['step']): float(r[key]) for r in rows if key in r and 'step' in r}
  return sorted(last), [last[s] for s in sorted(last)]


def x_label(stage: str) -> str:
  return 'iteration' if stage in RL_STAGES else 'step'


def _grid(n_panels: int):
  # pylint: disable=import-outside-toplevel
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  cols = min(COLUMNS, n_panels)
  rows = math.ceil(n_panels / cols)
  fig = Figure(figsize=(4.2 * cols, 3.3 * rows))
  FigureCanvasAgg(fig)
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  for ax in axes[n_panels:]:
    ax.set_visible(False)
  return fig, axes[:n_panels]


def _draw(ax, rows, keys, title, xlabel, ylabel):
  for key in keys:
    steps, values = series(rows, key)
    if steps:
      ax.plot(steps, values, marker='.' if len(steps) < 30 else None, label=key)
  ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
  ax.xaxis.get_major_locator().set_params(integer=True)
  ax.ticklabel_format(axis='y', useOffset=False)
  ax.grid(alpha=0.3)
  if len(keys) > 1:
    ax.legend(fontsize=8)


def write_plots(workdir: str, curve=None) -> tuple[list[str], list[str]]:
  """Writes the plots the workdir's files allow: (paths relative to workdir, what could
  not be plotted and why)."""
  os.makedirs(os.path.join(workdir, 'plots'), exist_ok=True)
  metrics = {s: read_metrics(os.path.join(workdir, s, 'metrics.jsonl')) for s in PIPELINE}
  written = []

  def save(fig, name):
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, 'plots', name), dpi=DPI)
    written.append(f'plots/{name}')

  losses_of = [s for s in PIPELINE if any(series(metrics[s], k)[0] for k in LOSS_KEYS)]
  if losses_of:
    fig, axes = _grid(len(losses_of))
    for ax, stage in zip(axes, losses_of):
      keys = [k for k in LOSS_KEYS if series(metrics[stage], k)[0]]
      _draw(ax, metrics[stage], keys, stage, x_label(stage), 'loss')
    save(fig, 'losses.png')
  skipped = [f'no loss curve for {s} (no {s}/metrics.jsonl rows with a loss)'
             for s in PIPELINE if s not in losses_of]
  for stage in RL_STAGES:  # per iteration: the proxy (RM score) beside gold accuracy
    panels = [p for p in RL_PANELS if series(metrics[stage], p[0])[0]]
    if not panels:
      skipped.append(f'no {stage} statistics (none of {", ".join(PPO_KEYS)} in '
                     f'{stage}/metrics.jsonl)')
      continue
    fig, axes = _grid(len(panels))
    for ax, (key, title, label) in zip(axes, panels):
      _draw(ax, metrics[stage], (key,), f'{stage} rollouts: {title}', 'iteration',
            f'{label} ({key})')
    save(fig, f'{stage}.png')
  if curve:
    save(_best_of_n_figure(curve), 'best_of_n.png')
  return written, skipped


def _best_of_n_figure(curve):
  fig, (ax,) = _grid(1)
  fig.set_size_inches(6.4, 4.4)
  lines = ax.plot(curve['kl_bound'], curve['gold'], marker='o', color='tab:green',
                  label='gold accuracy of the pick')
  if curve.get('pass'):
    lines += ax.plot(curve['kl_bound'], curve['pass'], marker='^', color='tab:gray',
                     linestyle='--', label='pass@n (the checker picks)')
  ax.set(xlabel='KL bound log n - (n-1)/n (nats)', ylabel='gold accuracy (share right)',
         title='best-of-n: SFT samples, the reward model picks')
  ax.set_ylim(bottom=0)
  ax.grid(alpha=0.3)
  for x, y, n in zip(curve['kl_bound'], curve['gold'], curve['n']):
    ax.annotate(f'n={n}', (x, y), textcoords='offset points', xytext=(2, 5), fontsize=7)
  right = ax.twinx()
  lines += right.plot(curve['kl_bound'], curve['rm_score'], marker='s', color='tab:blue',
                      label='RM score of the pick')
  right.set(ylabel='reward-model score (raw)')
  ax.legend(lines, [l.get_label() for l in lines], fontsize=8, loc='upper left')
  return fig
