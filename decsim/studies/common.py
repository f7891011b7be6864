"""Writing a study: study.json, a table on stdout, and run directories per label."""

import json
import pathlib
from typing import Any

from decsim import experiment


def write_study(out_dir: pathlib.Path, name: str, runs: dict[str, dict[str, Any]],
                columns: tuple[str, ...] = ('final_accuracy', 'rounds_to_target',
                                            'seconds_to_target', 'bytes_to_target')) -> pathlib.Path:
  """Writes ``out_dir/study.json`` and prints one table row per label."""
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / 'study.json'
  path.write_text(json.dumps({'study': name, 'runs': runs}, indent=2) + '\n')
  print(format_table(runs, columns))
  return path


def format_table(runs: dict[str, dict[str, Any]], columns: tuple[str, ...]) -> str:
  def cell(v):
    if v is None:
      return '-'
    return f'{v:.4g}' if isinstance(v, float) else str(v)

  width = max([len('run')] + [len(k) for k in runs])
  lines = ['  '.join([f'{"run":<{width}}'] + [f'{c:>18}' for c in columns])]
  for label, summary in runs.items():
    lines.append('  '.join([f'{label:<{width}}'] + [f'{cell(summary.get(c)):>18}' for c in columns]))
  return '\n'.join(lines)


def run_configs(out_dir: pathlib.Path, configs: dict[str, 'experiment.ExperimentConfig']
                ) -> dict[str, dict[str, Any]]:
  """Runs each labelled config into ``out_dir/<label>``; returns their summaries."""
  runs = {}
  for label, config in configs.items():
    print(f'--- {label}', flush=True)
    runs[label] = experiment.run(config, out_dir=out_dir / label,
                                 log=lambda line, label=label: print(f'[{label}] {line}', flush=True))
  return runs
