"""--replicas=R: replica i is the run of seed + i, data, graph and network included
(one after another), or with --replica_fix=data,graph,network one vmapped simulation
whose replica i has the root key seed + i and shares the rest."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from decsim import experiment, network, simulate
from decsim.errors import ConfigError
from decsim.report import network_report, replica_rows
from decsim.rng import Seeds


def test_vmapped_replica_rows_match_single_runs_of_their_root_keys(tiny_config, tmp_path):
  config = dataclasses.replace(tiny_config, protocol='dpsgd', nodes=10, degree=4, rounds=6,
                               eval_every=3, replicas=2, seed=5,
                               replica_fix='data,graph,network')
  experiment.run(config, out_dir=tmp_path / 'rep', log=lambda _: None)
  rows = [json.loads(l) for l in (tmp_path / 'rep' / 'metrics.jsonl').read_text().splitlines()]
  exp = experiment.build(dataclasses.replace(config, replicas=1))
  for i in range(2):
    single = tmp_path / f'single{i}'
    simulate.run(exp.protocol, exp.data, exp.evaluate, key=jax.random.key(5 + i), rounds=6,
                 eval_every=3,
                 report=network_report(network.message_bytes(exp.learner.model_bytes(), 10)),
                 out_dir=single, log=lambda _: None)
    singles = [json.loads(l) for l in (single / 'metrics.jsonl').read_text().splitlines()]
    for row, one in zip(rows, singles):
      assert row['round'] == one['round'] and row['replicas'] == 2
      np.testing.assert_allclose(row['accuracy_replicas'][i], one['accuracy'], atol=1e-3)
      np.testing.assert_allclose(row['loss_replicas'][i], one['loss'], rtol=1e-3)
  for row in rows:  # the reported value is the mean over replicas, std its spread
    np.testing.assert_allclose(row['accuracy'], np.mean(row['accuracy_replicas']))
    np.testing.assert_allclose(row['accuracy_std'], np.std(row['accuracy_replicas']))
  assert rows[-1]['accuracy_replicas'][0] != rows[-1]['accuracy_replicas'][1]  # seeds differ
  # the summary summarises each replica on its own: mean, sample std, 95% t-interval
  summary = json.loads((tmp_path / 'rep' / 'summary.json').read_text())
  finals = rows[-1]['accuracy_replicas']
  assert summary['final_accuracy_replicas'] == finals
  np.testing.assert_allclose(summary['final_accuracy'], np.mean(finals))
  np.testing.assert_allclose(summary['final_accuracy_std'], np.std(finals, ddof=1))
  half = 12.706204736174707 * np.std(finals, ddof=1) / np.sqrt(2)  # t(0.975, 1 dof)
  np.testing.assert_allclose(summary['final_accuracy_ci95'],
                             [np.mean(finals) - half, np.mean(finals) + half])
  best = [max(r['accuracy_replicas'][i] for r in rows) for i in range(2)]
  assert summary['best_accuracy_replicas'] == best and summary['rounds'] == 6


def _rows(path):
  return [json.loads(l) for l in (path / 'metrics.jsonl').read_text().splitlines()]


def test_independent_replica_i_is_the_single_run_of_seed_plus_i(tiny_config, tmp_path):
  """--replicas=2 --seed=5: replica 1 is the run of --seed=6, its partition and graph
  included, byte for byte; OUT merges both replicas' rows and summaries."""
  config = dataclasses.replace(tiny_config, protocol='dpsgd', nodes=10, degree=4, rounds=4,
                               eval_every=2, replicas=2, seed=5)
  experiment.run(config, out_dir=tmp_path / 'rep', log=lambda _: None)
  experiment.run(dataclasses.replace(config, replicas=1, seed=6), out_dir=tmp_path / 'six',
                 log=lambda _: None)
  own = (tmp_path / 'rep' / 'replicas' / '1' / 'metrics.jsonl').read_text()
  assert own == (tmp_path / 'six' / 'metrics.jsonl').read_text()
  six, merged = _rows(tmp_path / 'six'), _rows(tmp_path / 'rep')
  assert replica_rows(merged, 1) == [{k: r[k] for k in replica_rows(merged, 1)[0]} for r in six]
  # the data was drawn again: seed 5 and seed 6 split the samples differently
  five_idx = experiment.load_data(dataclasses.replace(config, replicas=1))[1].idx
  six_idx = experiment.load_data(dataclasses.replace(config, replicas=1, seed=6))[1].idx
  assert not np.array_equal(five_idx, six_idx)
  summary = json.loads((tmp_path / 'rep' / 'summary.json').read_text())
  finals = [merged[-1]['accuracy_replicas'][i] for i in range(2)]
  assert summary['final_accuracy_replicas'] == finals and len(summary['final_accuracy_ci95']) == 2
  assert summary['status'] == 'completed'
  saved = json.loads((tmp_path / 'rep' / 'replicas' / '0' / 'config.json').read_text())
  assert saved['seed'] == 5 and saved['seeds'] == Seeds(5, 5, 5, 5)._asdict()


def test_replica_fix_holds_the_named_parts_at_seed(tiny_config, tmp_path):
  """--replica_fix=data: replica 1 draws its graph, network and run from seed + 1 and
  its data from seed; a resumed run that already completed runs nothing again."""
  config = dataclasses.replace(tiny_config, protocol='dpsgd', nodes=10, degree=4, rounds=2,
                               eval_every=2, replicas=2, seed=5, replica_fix='data')
  assert experiment.replica_config(config, 1)[1] == Seeds(run=6, data=5, graph=6, network=6)
  experiment.run(config, out_dir=tmp_path / 'rep', log=lambda _: None)
  saved = json.loads((tmp_path / 'rep' / 'replicas' / '1' / 'config.json').read_text())
  assert saved['seeds'] == {'run': 6, 'data': 5, 'graph': 6, 'network': 6}
  before = (tmp_path / 'rep' / 'metrics.jsonl').read_text()
  lines = []
  experiment.run(dataclasses.replace(config, resume=True), out_dir=tmp_path / 'rep',
                 log=lines.append)
  assert not any(l.startswith('replica') for l in lines)  # both had completed
  assert (tmp_path / 'rep' / 'metrics.jsonl').read_text() == before


def test_replica_fix_refuses_unknown_parts(tiny_config):
  with pytest.raises(ConfigError, match=r'--replica_fix=data,seedz names seedz: choose from'):
    dataclasses.replace(tiny_config, replicas=2, replica_fix='data,seedz')
