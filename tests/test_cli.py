"""The command line: bad flags give one line and exit 2; a run writes every output file."""

import json
import os
import subprocess
import sys
from unittest import mock

import pytest

# Files the table refers to as {tmp}/NAME; written by _bad_files below.
BAD_FILES = {
    'lat_ragged.csv': '1,2\n3\n',
    'lat_words.csv': 'a,b\nc,d\n',
    'trace_values.csv': '1,2\n',
    'speeds_short.txt': '100\n',
    'bad.flags': '--nodes=five\n',
    'unknown.flags': '--bogus_flag=1\n',
}

# Run as a subprocess each (the CLI as users run it).
BAD_FLAGS = [
    (['--protocol=fedsgd'], '--protocol'),
    (['--sample_size=500', '--nodes=100'], '--sample_size'),
    (['--protocol=dpsgd', '--degree=100', '--nodes=100'], '--degree'),
    (['--protocol=dpsgd', '--nodes=7', '--degree=3'], 'even'),
    (['--alpha=0'], '--alpha'),
    (['--nodez=3'], 'nodez'),
    (['--nodes=abc'], '--nodes'),
    (['--dataset=mnist', '--data_dir=/nonexistent/tfds'], '/nonexistent/tfds'),
    (['--protocol=dpsgd', '--topology=torus', '--nodes=13', '--degree=2'], 'torus'),
]

# The rest of the bad-input table runs the same entry point in-process (one JAX start).
BAD_INPUTS = BAD_FLAGS + [
    (['--protocol=modest', '--aggregators=0'], '--aggregators'),
    (['--protocol=modest', '--sample_size=0'], '--sample_size'),
    (['--protocol=modest', '--views=local', '--nodes=20000', '--sample_size=10'], '--views=local'),
    (['--success_fraction=1.5'], '--success_fraction'),
    (['--latency_file={tmp}/missing.csv'], 'cannot be read'),
    (['--latency_file={tmp}/lat_ragged.csv'], 'square'),
    (['--latency_file={tmp}/lat_words.csv'], 'numeric'),
    (['--trace_file={tmp}/trace_values.csv', '--nodes=2', '--sample_size=1'], '--trace_file'),
    (['--compute_file={tmp}/speeds_short.txt'], '--compute_file'),
    (['--crash_fraction=1.5'], '--crash_fraction'),
    (['--p_online=0'], '--p_online'),
    (['--join_nodes=100', '--nodes=100'], '--join_nodes'),
    (['--checkpoint_every=7'], '--checkpoint_every'),
    (['--flagfile={tmp}/bad.flags'], '--nodes'),
    (['--flagfile={tmp}/unknown.flags'], 'bogus_flag'),
    (['--flagfile={tmp}/missing.flags'], 'missing.flags'),
    (['--model=resnet'], '--model'),
    (['--partition=natural'], 'natural'),
    (['--local_steps=0'], '--local_steps'),
    (['--batch_size=0'], '--batch_size'),
    (['--lr=-1'], '--lr'),
    (['--init=independent'], '--init'),
    (['--eval_every=0'], '--eval_every'),
    (['--mixing=fast', '--protocol=dpsgd'], '--mixing'),
    (['--protocol=dpsgd', '--topology=erdos_renyi', '--edge_probability=0.001'], 'erdos'),
    (['--sites=0'], '--sites'),
    (['positional'], 'unexpected arguments'),
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


def test_bad_input_table_is_large_enough():
  assert len(BAD_INPUTS) >= 25


@pytest.mark.parametrize('args,named', BAD_INPUTS, ids=[a[0][0] for a in BAD_INPUTS])
def test_bad_input_exits_2_with_one_line_and_keeps_results(args, named, tmp_path, capsys):
  from launch import simulate
  for name, text in BAD_FILES.items():
    (tmp_path / name).write_text(text)
  previous = tmp_path / 'run' / 'metrics.jsonl'  # results of an earlier run in the same --out
  previous.parent.mkdir()
  previous.write_text('{"round": 10, "accuracy": 0.5}\n')
  argv = ['decsim', f'--out={tmp_path / "run"}', *(a.format(tmp=tmp_path) for a in args)]
  simulate.FLAGS.unparse_flags()
  with mock.patch.object(sys, 'argv', argv), pytest.raises(SystemExit) as exit_:
    simulate.run_main()
  simulate.FLAGS.unparse_flags()
  assert exit_.value.code == 2
  lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert len(lines) == 1, lines
  assert lines[0].startswith('decsim: error:') and named in lines[0], lines[0]
  assert previous.read_text() == '{"round": 10, "accuracy": 0.5}\n'
  assert sorted(p.name for p in previous.parent.iterdir()) == ['metrics.jsonl']


def test_run_writes_outputs_and_table(tmp_path):
  proc = _decsim(['--num_samples=1000', '--nodes=10', '--sample_size=5', '--model=logistic',
                  '--rounds=4', '--eval_every=2', '--local_steps=1'], tmp_path)
  assert proc.returncode == 0, proc.stderr
  run = tmp_path / 'run'
  rows = [json.loads(l) for l in (run / 'metrics.jsonl').read_text().splitlines()]
  assert [r['round'] for r in rows] == [0, 2, 4]  # the initial model, then every eval_every
  assert {'round', 'accuracy', 'loss', 'sim_seconds', 'bytes_total'} <= set(rows[0])
  initial = rows[0]  # nothing trained, sent or simulated yet; the model is scored
  assert (initial['sim_seconds'], initial['bytes_total'], initial['node_steps']) == (0.0, 0, 0)
  assert initial['train_loss'] is None and 0 < initial['accuracy'] < 0.5
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
  assert rows[1]['round'] == 2 and rows[1]['loss'] is None  # strict JSON: null, not NaN
  assert json.loads((tmp_path / 'run' / 'summary.json').read_text())['status'] == 'diverged'


def test_compilation_cache_flag_points_jax_at_its_directory_and_empty_turns_it_off(tmp_path):
  """--compilation_cache=DIR: compiled programs land in DIR (a second run loads them);
  an empty value turns the cache off. The session's own cache is restored after."""
  import jax
  import jax.numpy as jnp
  from decsim import xla_cache
  session = jax.config.jax_compilation_cache_dir
  try:
    assert xla_cache.enable(str(tmp_path / 'xla')) == str(tmp_path / 'xla')
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)  # tiny programs

    def on(x):
      return jnp.sin(x) * 3.0 + 17.0

    def off(x):
      return jnp.cos(x) * 5.0 - 3.0

    names = lambda: [p.name for p in (tmp_path / 'xla').iterdir()]
    jax.jit(on).lower(jnp.ones(7)).compile()
    assert any(n.startswith('jit_on-') for n in names())
    assert xla_cache.enable('') is None and not jax.config.jax_enable_compilation_cache
    jax.jit(off).lower(jnp.ones(9)).compile()
    assert not any(n.startswith('jit_off-') for n in names())
    (tmp_path / 'file').write_text('not a directory')
    from decsim.errors import ConfigError
    with pytest.raises(ConfigError, match='--compilation_cache=.*cannot be made'):
      xla_cache.enable(str(tmp_path / 'file' / 'xla'))
  finally:
    xla_cache.enable(session or '')
