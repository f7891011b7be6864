"""--replicas=R runs R seeds as one vmapped simulation; replica i equals a single run
whose root key is seed + i (same data, partition and graph)."""

import dataclasses
import json

import jax
import numpy as np

from decsim import experiment, network, simulate
from decsim.report import network_report


def test_replica_rows_match_single_runs(tiny_config, tmp_path):
  config = dataclasses.replace(tiny_config, protocol='dpsgd', nodes=10, degree=4, rounds=6,
                               eval_every=3, replicas=2, seed=5)
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
