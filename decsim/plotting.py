"""Plots of a run directory's ``metrics.jsonl`` (matplotlib, headless)."""

import json
import pathlib

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: pathlib.Path) -> list[dict]:
  with open(run_dir / 'metrics.jsonl') as f:
    return [json.loads(line) for line in f if line.strip()]


def _line_with_band(ax, rows: list[dict], x_key: str, **kwargs) -> None:
  """Accuracy against ``x_key``; with replicas, a band of one standard deviation."""
  x = [r[x_key] for r in rows]
  y = [r['accuracy'] for r in rows]
  (line,) = ax.plot(x, y, **kwargs)
  if rows and rows[0].get('accuracy_std') is not None:
    std = [r['accuracy_std'] for r in rows]
    ax.fill_between(x, [a - s for a, s in zip(y, std)], [a + s for a, s in zip(y, std)],
                    color=line.get_color(), alpha=0.2, lw=0)


def plot_accuracy(run_dir: pathlib.Path, target: float | None = None) -> pathlib.Path:
  """Test accuracy against rounds, saved as ``run_dir/accuracy.png``."""
  rows = read_metrics(run_dir)
  fig, ax = plt.subplots(figsize=(5, 3.5))
  _line_with_band(ax, rows, 'round', marker='.')
  if 'consensus_accuracy' in (rows[0] if rows else {}):
    ax.lines[0].set_label("nodes' own models (mean)")
    ax.plot([r['round'] for r in rows], [r['consensus_accuracy'] for r in rows], ls='--',
            label='node-average model (held by no node)')
    ax.legend()
  if target is not None:
    ax.axhline(target, color='gray', lw=0.8, ls=':')
  ax.set_xlabel('round')
  ax.set_ylabel('test accuracy')
  ax.set_title(run_dir.name)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  path = run_dir / 'accuracy.png'
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


AXES = {'round': 'round', 'sim_seconds': 'simulated seconds', 'bytes_total': 'bytes sent'}


def plot_runs(path: pathlib.Path, run_dirs: dict[str, pathlib.Path],
              x_keys: tuple[str, ...] = ('sim_seconds', 'bytes_total'),
              target: float | None = None, title: str = '',
              formats: tuple[str, ...] = ('png',)) -> pathlib.Path:
  """Test accuracy of several runs against each of ``x_keys``, side by side.

  Saved as ``path`` with each suffix in ``formats`` (e.g. png and svg).
  """
  fig, axes = plt.subplots(1, len(x_keys), figsize=(5 * len(x_keys), 3.6), squeeze=False)
  for label, run_dir in run_dirs.items():
    rows = read_metrics(run_dir)
    for ax, key in zip(axes[0], x_keys):
      _line_with_band(ax, rows, key, label=label)
  for ax, key in zip(axes[0], x_keys):
    if target is not None:
      ax.axhline(target, color='gray', lw=0.8, ls=':')
    if key == 'bytes_total':
      ax.set_xscale('log')
    ax.set_xlabel(AXES.get(key, key))
    ax.set_ylabel('test accuracy')
    ax.grid(alpha=0.3)
  axes[0][0].legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  for fmt in formats:
    fig.savefig(path.with_suffix(f'.{fmt}'), dpi=120)
  plt.close(fig)
  return path
