"""What `accuracy` means (README, "Metrics"): the models nodes hold. For D-PSGD and gossip
the mean over the nodes' own models, checked against a per-node loop; the node average
apart as consensus_accuracy; FedAvg's delivered model."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decsim import experiment, metrics


def _after_rounds(config, rounds=2):
  exp = experiment.build(config)
  state = jax.jit(exp.protocol.init)(jax.random.key(config.seed), exp.data)
  step = jax.jit(exp.protocol.round)
  for _ in range(rounds):
    state, _ = step(state, exp.data)
  return exp, state


def _per_node(exp, params, ids):
  """Each listed node's own (accuracy, loss), one model at a time."""
  evaluate = jax.jit(metrics.make_evaluate(exp.apply_fn))
  x, y = exp.dataset.x_test, exp.dataset.y_test
  return np.array([[float(v) for v in evaluate(jax.tree.map(lambda p: p[i], params), x, y)]
                   for i in ids])


@pytest.mark.parametrize('eval_nodes', [0, 4])
def test_dpsgd_accuracy_is_the_mean_of_the_nodes_own_models(tiny_config, eval_nodes):
  config = dataclasses.replace(tiny_config, protocol='dpsgd', nodes=10, degree=2,
                               init='independent', eval_nodes=eval_nodes)
  exp, state = _after_rounds(config)
  ids = experiment.eval_node_ids(config)
  ids = np.arange(10) if ids is None else ids
  row = jax.tree.map(float, jax.jit(exp.evaluate)(state))
  own = _per_node(exp, state.nodes.params, ids)  # [k, 2]
  assert row['accuracy'] == pytest.approx(own[:, 0].mean(), abs=1e-6)
  assert row['loss'] == pytest.approx(own[:, 1].mean(), rel=1e-5)
  assert row['accuracy_min'] == pytest.approx(own[:, 0].min(), abs=1e-6)
  assert row['accuracy_median'] == pytest.approx(np.median(own[:, 0]), abs=1e-6)
  assert row['accuracy_p10'] == pytest.approx(np.quantile(own[:, 0], 0.1), abs=1e-6)
  assert row['accuracy_max'] == pytest.approx(own[:, 0].max(), abs=1e-6)
  average = jax.tree.map(lambda p: p.mean(0, keepdims=True), state.nodes.params)
  assert row['consensus_accuracy'] == pytest.approx(_per_node(exp, average, [0])[0, 0], abs=1e-6)
  assert len(set(own[:, 0])) > 1  # the nodes differ, so the mean is not the consensus by luck


def test_eval_nodes_is_a_fixed_random_subset(tiny_config):
  config = dataclasses.replace(tiny_config, protocol='dpsgd', nodes=20, eval_nodes=5)
  ids = experiment.eval_node_ids(config)
  assert len(set(ids)) == 5 and list(ids) == sorted(ids) and 0 <= ids.min() and ids.max() < 20
  np.testing.assert_array_equal(ids, experiment.eval_node_ids(config))
  assert experiment.eval_node_ids(dataclasses.replace(config, eval_nodes=0)) is None
  assert experiment.eval_node_ids(dataclasses.replace(config, eval_nodes=20)) is None
  assert not np.array_equal(ids, experiment.eval_node_ids(dataclasses.replace(config, seed=1)))


def test_fedavg_scores_its_delivered_model_and_summary_uses_accuracy(tiny_config, tmp_path):
  exp, state = _after_rounds(tiny_config)
  row = jax.tree.map(float, jax.jit(exp.evaluate)(state))
  model = jax.tree.map(lambda p: p[None], exp.protocol.model(state))
  assert row['accuracy'] == pytest.approx(_per_node(exp, model, [0])[0, 0], abs=1e-6)
  assert 'consensus_accuracy' not in row and 'accuracy_median' not in row
  config = dataclasses.replace(tiny_config, protocol='dpsgd', degree=2, target_accuracy=0.3)
  summary = experiment.run(config, out_dir=tmp_path, log=lambda _: None)
  rows = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  hit = next((r for r in rows if r['accuracy'] >= 0.3), None)
  assert summary['rounds_to_target'] == (hit['round'] if hit else None)
  assert summary['final_accuracy'] == rows[-1]['accuracy']
  assert summary['final_consensus_accuracy'] == rows[-1]['consensus_accuracy']


def test_hold_out_splits_each_node_into_disjoint_train_and_local_test():
  from decsim.data import partition as P
  rng = np.random.default_rng(0)
  part = P.from_lists([rng.choice(1000, n, replace=False) for n in (10, 1, 7, 0, 33)])
  train, test = P.hold_out(part, 0.3, seed=4)
  for whole, a, b in zip(P.to_lists(part), P.to_lists(train), P.to_lists(test)):
    assert sorted([*a, *b]) == sorted(whole) and not set(a) & set(b)
    assert len(b) == min(int(0.3 * len(whole)), max(len(whole) - 1, 0))
  assert [len(b) for b in P.to_lists(test)] == [3, 0, 2, 0, 9]


@pytest.mark.parametrize('protocol', ['dpsgd', 'fedavg'])
def test_local_accuracy_scores_the_model_each_node_holds_on_its_own_held_out_samples(
    tiny_config, protocol):
  config = dataclasses.replace(tiny_config, protocol=protocol, nodes=8, degree=2, sample_size=4,
                               init='independent' if protocol == 'dpsgd' else 'shared',
                               local_test_fraction=0.25, eval_nodes=0)
  exp, state = _after_rounds(config)
  _, _, local = experiment.load_data(config)
  row = jax.tree.map(float, jax.jit(exp.evaluate)(state))
  evaluate = jax.jit(metrics.make_evaluate(exp.apply_fn))
  x, y = np.asarray(exp.data.x), np.asarray(exp.data.y)
  own = []
  for n, held in enumerate(P_lists(local)):
    params = (jax.tree.map(lambda p: p[n], state.nodes.params) if protocol == 'dpsgd'
              else exp.protocol.model(state))
    own.append(float(evaluate(params, x[held], y[held])[0]))
    assert not set(held) & set(np.asarray(exp.data.idx)[n, :int(exp.data.sizes[n])])
  assert row['local_accuracy'] == pytest.approx(np.mean(own), abs=1e-6)
  assert row['local_accuracy_min'] == pytest.approx(min(own), abs=1e-6)
  assert row['local_accuracy_median'] == pytest.approx(np.median(own), abs=1e-6)


def _fedavg_clients_one_by_one(exp, before, clients):
  """The models FedAvg's clients of round ``before.round`` train from its global model, each
  by the single-node local update (leaves [N, ...], rows of other nodes unset), and their ids."""
  from decsim.rng import Stream, node_keys
  ids = [int(i) for i in np.asarray(clients) if i < exp.config.nodes]
  keys = node_keys(before.key, before.round, jnp.asarray(ids), Stream.BATCH)
  update = jax.jit(lambda key, row, size: exp.learner.local_update(
      exp.protocol.model(before), exp.learner.tx.init(exp.protocol.model(before)), key,
      exp.data.x, exp.data.y, row, size).params)
  rows = {i: update(keys[j], exp.data.idx[i], exp.data.sizes[i]) for j, i in enumerate(ids)}
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[
      rows.get(i, exp.protocol.model(before)) for i in range(exp.config.nodes)])
  return stacked, ids


def P_lists(part):
  from decsim.data import partition as P
  return P.to_lists(part)


@pytest.mark.parametrize('protocol,p_online', [('fedavg', 1.0), ('modest', 0.25)])
def test_client_accuracy_scores_the_models_the_last_rounds_clients_trained(tiny_config,
                                                                           protocol, p_online):
  """FedAvg and MoDeST: ``accuracy`` is the delivered model; ``client_accuracy`` and its
  quantiles are over the models the last round's clients hold after local training —
  the node rows that the last round changed (offline draws left out)."""
  config = dataclasses.replace(tiny_config, protocol=protocol, nodes=12, sample_size=6,
                               p_online=p_online, seed=3)
  exp, before = _after_rounds(config, rounds=1)
  state, _ = jax.jit(exp.protocol.round)(before, exp.data)
  if protocol == 'fedavg':  # O(s) state: each client trained again, one at a time
    trained, changed = _fedavg_clients_one_by_one(exp, before, state.extra.clients)
  else:  # O(s) state: the rows in flight, in the order of the round's participants
    trained = state.nodes.params
    changed = [i for i, node in enumerate(np.asarray(state.extra.participants)) if node < 12]
  assert 0 < len(changed) == min(6, int(np.sum(state.available)))  # offline draws drop out
  own = _per_node(exp, trained, changed)[:, 0]
  row = jax.tree.map(float, jax.jit(exp.evaluate)(state))
  assert row['client_accuracy'] == pytest.approx(own.mean(), abs=1e-6)
  assert row['client_accuracy_min'] == pytest.approx(own.min(), abs=1e-6)
  assert row['client_accuracy_p10'] == pytest.approx(np.quantile(own, 0.1), abs=1e-6)
  assert row['client_accuracy_median'] == pytest.approx(np.median(own), abs=1e-6)
  assert row['client_accuracy_max'] == pytest.approx(own.max(), abs=1e-6)
  delivered = _per_node(exp, jax.tree.map(lambda p: p[None], exp.protocol.model(state)), [0])
  assert row['accuracy'] == pytest.approx(delivered[0, 0], abs=1e-6)
  initial = jax.jit(exp.evaluate)(jax.jit(exp.protocol.init)(jax.random.key(3), exp.data))
  assert np.isnan(float(initial['client_accuracy']))  # round 0: no client has trained yet
