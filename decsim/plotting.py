"""Figures of run directories' ``metrics.jsonl`` (matplotlib, headless).

``plot_runs`` overlays runs: any row key (``metric``) against rounds, simulated
seconds, bytes sent or node-steps, one panel per x axis. A run with replicas is
drawn as the mean over replicas with a 95% Student-t confidence band, and its
legend entry says so. ``style='paper'`` sizes a figure for one column of a
two-column paper (3.3 in wide per panel), with markers, a labelled target line
and sparse log-axis ticks. ``plot_accuracy`` draws one run's accuracy and, for
protocols whose nodes hold their own models, the spread over nodes. ``plot_metric_grid``
puts several metrics (rows) against several x axes (columns); ``plot_layer_variance`` draws
each layer's weight variance over its Xavier variance (the vanishing-variance study, Tian
et al. 2024).
"""

import json
import pathlib

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

# --x names -> (row key, axis label); node_steps are summed over the rows.
X_AXES = {'rounds': ('round', 'round'), 'seconds': ('sim_seconds', 'simulated seconds'),
          'bytes': ('bytes_total', 'bytes sent'), 'node_steps': ('node_steps', 'node-steps')}
STYLES = ('default', 'paper')
_PAPER = {'font.size': 7, 'axes.labelsize': 7, 'legend.fontsize': 6, 'xtick.labelsize': 6,
          'ytick.labelsize': 6, 'lines.linewidth': 1.0, 'lines.markersize': 3}


def read_metrics(run_dir: pathlib.Path) -> list[dict]:
  with open(run_dir / 'metrics.jsonl') as f:
    return [json.loads(line) for line in f if line.strip()]


def x_values(rows: list[dict], x: str) -> list[float]:
  """The x coordinate of each row; ``node_steps`` accumulates the per-row counts."""
  key = X_AXES[x][0]
  if x != 'node_steps':
    return [r[key] for r in rows]
  total, out = 0, []
  for r in rows:
    total += r.get(key) or 0
    out.append(total)
  return out


def mean_and_band(rows: list[dict], metric: str) -> tuple[list, list | None, int]:
  """The metric per row and, with replicas, its 95% t-interval ``(low, high)`` per row."""
  y = [r.get(metric) for r in rows]
  count = rows[0].get('replicas', 1) if rows else 1
  if count < 2 or f'{metric}_replicas' not in rows[0]:
    return y, None, 1
  from decsim.report import t_interval
  band = [t_interval([v for v in r[f'{metric}_replicas'] if v is not None]) for r in rows]
  return y, band, count


def _draw_run(ax, rows: list[dict], metric: str, x: str, label: str | None, **style) -> None:
  xs = x_values(rows, x)
  y, band, count = mean_and_band(rows, metric)
  if band is not None and label is not None:
    label = f'{label} (mean, 95% CI of {count})'
  (line,) = ax.plot(xs, y, label=label, **style)
  if band is not None:
    ax.fill_between(xs, [b[0] for b in band], [b[1] for b in band], color=line.get_color(),
                    alpha=0.2, lw=0)


def _finish_axis(ax, x: str, metric: str, target: float | None, paper: bool) -> None:
  if target is not None:
    ax.axhline(target, color='gray', lw=0.8, ls=':', label=f'target {target:g}')
  if x == 'bytes':
    ax.set_xscale('log')
    ax.xaxis.set_major_locator(ticker.LogLocator(numticks=5 if paper else 8))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
  ax.set_xlabel(X_AXES[x][1])
  ax.set_ylabel(metric.replace('_', ' '))
  ax.grid(alpha=0.3)


def plot_runs(path: pathlib.Path, run_dirs: dict[str, pathlib.Path],
              x_axes: tuple[str, ...] = ('seconds', 'bytes'), target: float | None = None,
              title: str = '', formats: tuple[str, ...] = ('png',), metric: str = 'accuracy',
              style: str = 'default') -> pathlib.Path:
  """``metric`` of several runs (label -> run directory) against each of ``x_axes``
  (keys of ``X_AXES``), side by side; saved as ``path`` with each suffix in ``formats``."""
  paper = style == 'paper'
  with plt.rc_context(_PAPER if paper else {}):
    width, height = (3.3, 2.3) if paper else (5, 3.6)
    fig, axes = plt.subplots(1, len(x_axes), figsize=(width * len(x_axes), height),
                             squeeze=False)
    for label, run_dir in run_dirs.items():
      rows = read_metrics(run_dir)
      for ax, x in zip(axes[0], x_axes):
        _draw_run(ax, rows, metric, x, label if ax is axes[0][0] else None,
                  marker='o' if paper else '.')
    for ax, x in zip(axes[0], x_axes):
      _finish_axis(ax, x, metric, target, paper)
    axes[0][0].legend(frameon=not paper)
    if title:
      fig.suptitle(title)
    fig.tight_layout()
    for fmt in formats:
      fig.savefig(path.with_suffix(f'.{fmt}'), dpi=300 if paper else 120)
    plt.close(fig)
  return path


def plot_accuracy(run_dir: pathlib.Path, target: float | None = None) -> pathlib.Path:
  """One run's accuracy against rounds, saved as ``run_dir/accuracy.png``. For nodes
  holding their own models: the nodes' mean, their min-max and p10-median spread, and
  the node-average model (held by no node) dashed."""
  rows = read_metrics(run_dir)
  fig, ax = plt.subplots(figsize=(5, 3.5))
  per_node = bool(rows) and 'accuracy_median' in rows[0]
  _draw_run(ax, rows, 'accuracy', 'rounds',
            "nodes' own models (mean)" if per_node else 'accuracy', marker='.')
  if per_node:
    _draw_spread(ax, rows)
  _finish_axis(ax, 'rounds', 'test accuracy', target, paper=False)
  ax.set_title(run_dir.name)
  ax.legend(fontsize=7)
  fig.tight_layout()
  path = run_dir / 'accuracy.png'
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def _draw_spread(ax, rows: list[dict]) -> None:
  rounds = [r['round'] for r in rows]
  ax.fill_between(rounds, [r['accuracy_min'] for r in rows], [r['accuracy_max'] for r in rows],
                  color='C0', alpha=0.12, lw=0, label='nodes: min-max')
  ax.fill_between(rounds, [r['accuracy_p10'] for r in rows],
                  [r['accuracy_median'] for r in rows], color='C0', alpha=0.25, lw=0,
                  label='nodes: p10-median')
  ax.plot(rounds, [r['consensus_accuracy'] for r in rows], ls='--', color='C1',
          label='node-average model')


def plot_metric_grid(path: pathlib.Path, run_dirs: dict[str, pathlib.Path],
                     metrics: dict[str, str], x_axes: tuple[str, ...] = ('seconds', 'node_steps'),
                     target: float | None = None, log_x: tuple[str, ...] = ()) -> pathlib.Path:
  """One panel per (metric, x axis): row ``i`` is ``metrics``' i-th key (titled with its
  value), column ``j`` the j-th of ``x_axes``. A run whose rows lack a metric is left out
  of that row's panels (FedAvg has no node-average model); a run keeps its colour in all."""
  fig, axes = plt.subplots(len(metrics), len(x_axes), figsize=(5 * len(x_axes), 3.4 * len(metrics)),
                           squeeze=False)
  for i, (metric, title) in enumerate(metrics.items()):
    for k, (label, run_dir) in enumerate(run_dirs.items()):
      rows = [r for r in read_metrics(run_dir) if r.get(metric) is not None]
      for ax, x in zip(axes[i], x_axes):
        if rows:
          _draw_run(ax, rows, metric, x, label, marker='.', ms=3, color=f'C{k % 10}')
    for ax, x in zip(axes[i], x_axes):
      _finish_axis(ax, x, 'test accuracy', target, paper=False)
      ax.set_title(title, fontsize=9)
      if x in log_x:
        ax.set_xscale('log')
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def plot_layer_variance(path: pathlib.Path, run_dirs: dict[str, pathlib.Path],
                        x: str = 'seconds') -> pathlib.Path:
  """Each layer's weight variance / Xavier variance (rows' ``weight_variance/<layer>`` over
  ``xavier_variance/<layer>``) against ``x``, one log-log panel per layer."""
  data = {label: read_metrics(d) for label, d in run_dirs.items()}
  layers = sorted({k.split('/', 1)[1] for rows in data.values() for k in (rows[0] if rows else {})
                   if k.startswith('weight_variance/')})
  cols = min(3, max(1, len(layers)))
  nrows = max(1, (len(layers) + cols - 1) // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
  axes = axes.ravel()
  for label, rows in data.items():
    xs = x_values(rows, x)
    for ax, layer in zip(axes, layers):
      ax.plot(xs, [r[f'weight_variance/{layer}'] / r[f'xavier_variance/{layer}'] for r in rows],
              label=label)
  for ax, layer in zip(axes, layers):
    ax.set(title=layer, xlabel=X_AXES[x][1], ylabel='variance / Xavier', xscale='log',
           yscale='log')
    ax.axhline(1.0, color='gray', lw=0.8, ls=':')
    ax.grid(alpha=0.3)
  if layers:
    axes[0].legend(fontsize=7)
  for ax in axes[len(layers):]:
    ax.axis('off')
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path
