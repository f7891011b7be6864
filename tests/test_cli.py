"""The command line: bad flags give one line and exit 2; a run writes every output file."""

import json
import os
import subprocess
import sys

import pytest

BAD_FLAGS = [
    (['--protocol=fedsgd'], '--protocol'),
    (['--sample_size=500', '--nodes=100'], '--sample_size'),
    (['--protocol=dpsgd', '--degree=100', '--nodes=100'], '--degree'),
    (['--protocol=dpsgd', '--nodes=7', '--degree=3'], 'even'),
    (['--alpha=0'], '--alpha'),
    (['--rounds=10', '--eval_every=3'], 'multiple'),
    (['--nodez=3'], 'nodez'),
    (['--nodes=abc'], '--nodes'),
    (['--dataset=mnist', '--data_dir=/nonexistent/tfds'], '/nonexistent/tfds'),
    (['--protocol=dpsgd', '--topology=torus', '--nodes=13', '--degree=2'], 'torus'),
]


def _decsim(args, tmp_path, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'launch.simulate', f'--out={tmp_path / "run"}', *args],
                        capture_output=True, text=True, timeout=timeout, env=env,
                        cwd=os.path.join(os.path.dirname(__file__), '..'))


@pytest.mark.parametrize('args,named', BAD_FLAGS, ids=[a[0][0] for a in BAD_FLAGS])
def test_bad_flags_exit_2_with_one_line(args, named, tmp_path):
  proc = _decsim(args, tmp_path)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith('decsim: error:') and named in lines[0]
  assert 'Traceback' not in proc.stderr


def test_run_writes_outputs_and_table(tmp_path):
  proc = _decsim(['--num_samples=1000', '--nodes=10', '--sample_size=5', '--model=logistic',
                  '--rounds=4', '--eval_every=2', '--local_steps=1'], tmp_path)
  assert proc.returncode == 0, proc.stderr
  run = tmp_path / 'run'
  rows = [json.loads(l) for l in (run / 'metrics.jsonl').read_text().splitlines()]
  assert [r['round'] for r in rows] == [2, 4]
  assert {'round', 'accuracy', 'loss', 'sim_seconds', 'bytes_total'} <= set(rows[0])
  summary = json.loads((run / 'summary.json').read_text())
  for key in ('final_accuracy', 'best_accuracy', 'rounds', 'rounds_to_target', 'seconds_to_target',
              'bytes_to_target', 'wall_seconds', 'compile_seconds', 'node_steps_per_second'):
    assert key in summary
  assert summary['bytes_total'] == rows[-1]['bytes_total'] > 0
  config = json.loads((run / 'config.json').read_text())
  assert config['nodes'] == 10 and config['model'] == 'logistic'
  assert (run / 'accuracy.png').stat().st_size > 0
  assert 'final_accuracy' in proc.stdout


def test_divergence_stops_with_one_line_and_keeps_metrics(tmp_path):
  proc = _decsim(['--num_samples=1000', '--nodes=10', '--sample_size=5', '--model=mlp',
                  '--rounds=6', '--eval_every=2', '--lr=1e8'], tmp_path)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and 'diverged by round 2' in lines[0] and '--lr' in lines[0]
  rows = [json.loads(l) for l in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert rows[0]['round'] == 2 and rows[0]['loss'] is None  # strict JSON: null, not NaN
  assert json.loads((tmp_path / 'run' / 'summary.json').read_text())['status'] == 'diverged'
