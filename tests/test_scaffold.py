"""SCAFFOLD: on heterogeneous quadratics FedAvg stops at its biased fixed point and SCAFFOLD
reaches the global optimum; its first round is FedAvg's; messages cost two models; only
the accepted clients' variates change; c stays their weighted mean; one compile; the CLI."""

import dataclasses
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from decsim import experiment, network, simulate
from decsim.data.sampler import NodeData
from decsim.errors import ConfigError
from decsim.local import make_local_update
from decsim.protocols.base import Learner, Protocol
from decsim.protocols.fedavg import fedavg
from decsim.protocols.scaffold import correction, effective_steps, scaffold

# ------------------------------------------------- heterogeneous quadratics, closed forms
# Client i's loss is 0.5 * a_i * ||w - b_i||^2: every sample of client i is the row
# [a_i, b_i], so a minibatch's loss is the client's loss and local SGD is exact GD.
A = np.array([0.5, 1.0, 2.0, 4.0], np.float32)  # [N] curvatures
B = np.array([[1.0, -2.0], [3.0, 0.0], [-1.0, 1.0], [0.0, 4.0]], np.float32)  # [N, D] optima
N, D = B.shape
LR, K = 0.1, 10  # local steps; lr * a_i < 2, so every client's GD is stable


def _quadratic_loss(params, x, y):
  del y
  return jnp.mean(0.5 * x[:, 0] * jnp.sum((params['w'] - x[:, 1:]) ** 2, axis=-1))


def _quadratic(sizes=(4, 4, 4, 4)) -> NodeData:
  width = max(sizes)
  rows = np.concatenate([A[:, None], B], axis=1)  # [N, 1 + D]
  x = np.repeat(rows, width, axis=0)  # [N * width, 1 + D]
  return NodeData(x=jnp.asarray(x), y=jnp.zeros((N * width,), jnp.int32),
                  idx=jnp.arange(N * width, dtype=jnp.int32).reshape(N, width),
                  sizes=jnp.asarray(sizes, jnp.int32))


def _learner(tx: optax.GradientTransformation) -> Learner:
  return Learner(init_params=lambda key: {'w': jnp.zeros((D,), jnp.float32)}, tx=tx,
                 batch_size=4, local_update=make_local_update(_quadratic_loss, tx, K, 4))


def _local_tx(momentum: float, corrected: bool) -> optax.GradientTransformation:
  tx = optax.sgd(LR, momentum=momentum or None)
  return optax.chain(correction(), tx) if corrected else tx


def _rounds(protocol: Protocol, data: NodeData, rounds: int, probe=lambda state: ()):
  """The state after ``rounds`` rounds (one compile) and ``probe(state)`` after each."""
  def body(state, _):
    state, _ = protocol.round(state, data)
    return state, probe(state)

  state = protocol.init(jax.random.key(0), data)
  return jax.jit(lambda s: jax.lax.scan(body, s, None, length=rounds))(state)


def _optimum(weights: np.ndarray) -> np.ndarray:
  """argmin sum_i p_i 0.5 a_i ||w - b_i||^2 = sum p_i a_i b_i / sum p_i a_i."""
  return (weights * A) @ B / np.sum(weights * A)


def _fedavg_fixed_point() -> np.ndarray:
  """K GD steps from x give y_i = b_i + q_i (x - b_i), q_i = (1 - lr a_i)^K; the mean
  of the y_i is x at x = sum (1 - q_i) b_i / sum (1 - q_i)."""
  q = (1 - LR * A) ** K
  return (1 - q) @ B / np.sum(1 - q)


def test_fedavg_stops_at_its_biased_fixed_point_and_scaffold_reaches_the_optimum():
  data = _quadratic()
  full = dict(nodes=N, sample_size=N, weighting='uniform')
  fed, _ = _rounds(fedavg(_learner(_local_tx(0.0, False)), **full), data, 300)
  sca, _ = _rounds(scaffold(_learner(_local_tx(0.0, True)), lr=LR, **full), data, 300)
  w_star = _optimum(np.ones(N))
  fed_w = np.asarray(fed.extra.global_params['w'])
  sca_w = np.asarray(sca.extra.server.global_params['w'])
  np.testing.assert_allclose(fed_w, _fedavg_fixed_point(), atol=1e-5)
  assert np.linalg.norm(fed_w - w_star) > 0.9  # 0.932: client drift
  assert np.linalg.norm(sca_w - w_star) < 1e-5
  np.testing.assert_allclose(sca.extra.control['w'], 0.0, atol=1e-5)  # c = grad f(w*) = 0
  grads = A[:, None] * (sca_w[None] - B)  # [N, D] c_i -> grad f_i(w*)
  np.testing.assert_allclose(sca.extra.client_controls['w'], grads, atol=1e-4)


def test_effective_steps_are_the_momentum_displacement_of_a_constant_gradient():
  tx, g = optax.sgd(LR, momentum=0.9), jnp.ones((1,))
  w, state = jnp.zeros((1,)), tx.init(jnp.zeros((1,)))
  for k in range(1, 13):
    updates, state = tx.update(g, state, w)
    w = optax.apply_updates(w, updates)
    np.testing.assert_allclose(-w[0] / LR, effective_steps(jnp.array([k]), 0.9)[0], rtol=1e-5)
  np.testing.assert_array_equal(effective_steps(jnp.array([0, 3]), 0.0), [0.0, 3.0])


def test_momentum_divides_by_the_effective_steps_and_k_would_diverge():
  data = _quadratic()
  full = dict(nodes=N, sample_size=N, weighting='uniform', lr=LR)
  learner = _learner(_local_tx(0.9, True))
  sca, _ = _rounds(scaffold(learner, momentum=0.9, **full), data, 300)
  naive, _ = _rounds(scaffold(learner, momentum=0.0, **full), data, 40)  # (x - y) / (K lr)
  w_star = _optimum(np.ones(N))
  assert np.linalg.norm(sca.extra.server.global_params['w'] - w_star) < 1e-4
  assert not np.linalg.norm(naive.extra.server.global_params['w'] - w_star) < 10


def test_data_size_weights_partial_participation_and_stragglers_keep_c_the_weighted_mean():
  """s = 3 of 4 clients, the server keeps the first 2 to arrive; p_i = n_i / n."""
  data = _quadratic(sizes=(1, 2, 3, 6))
  p = np.asarray(data.sizes, np.float32) / np.sum(data.sizes)
  protocol = scaffold(_learner(_local_tx(0.0, True)), nodes=N, sample_size=3, lr=LR,
                      weighting='data_size', success_fraction=0.5)
  gap = lambda state: jnp.max(jnp.abs(  # c - sum_i p_i c_i
      state.extra.control['w'] - jnp.tensordot(p, state.extra.client_controls['w'], axes=1)))
  state, gaps = _rounds(protocol, data, 400, gap)
  assert float(jnp.max(gaps)) < 1e-5
  assert float(jnp.max(jnp.abs(state.extra.client_controls['w']))) > 0.1  # not all zero
  np.testing.assert_allclose(state.extra.server.global_params['w'], _optimum(p), atol=1e-4)


def test_a_learner_without_the_correction_is_refused():
  with pytest.raises(ValueError, match=r'scaffold\.correction\(\)'):
    scaffold(_learner(_local_tx(0.0, False)), nodes=N, sample_size=N, lr=LR)


# ------------------------------------------------------ the experiment and the CLI

BANDWIDTH_MBPS = 1.0


@pytest.fixture(scope='module')
def two_rounds(tiny_config):
  """FedAvg and SCAFFOLD on the same config (momentum 0.9, s = 5 of N = 20, 1 Mbit/s
  links): per protocol the experiment and its states and metrics of rounds 0, 1, 2."""
  out = {}
  for protocol in ('fedavg', 'scaffold'):
    config = dataclasses.replace(tiny_config, protocol=protocol, model='logistic', sites=1,
                                 upload_mbps=BANDWIDTH_MBPS, download_mbps=BANDWIDTH_MBPS)
    exp = experiment.build(config)
    round_ = jax.jit(exp.protocol.round)
    states = [exp.protocol.init(jax.random.key(0), exp.data)]
    metrics = []
    for _ in range(2):
      state, m = round_(states[-1], exp.data)
      states.append(state)
      metrics.append(m)
    out[protocol] = (config, exp, states, metrics)
  return out


def test_first_round_is_fedavg_bitwise_and_the_second_is_corrected(two_rounds):
  """c = c_i = 0 in round 1: the correction adds exact zeros."""
  (_, fed, fed_states, fed_metrics), (_, sca, sca_states, sca_metrics) = (
      two_rounds['fedavg'], two_rounds['scaffold'])
  chex.assert_trees_all_equal(fed.protocol.model(fed_states[1]), sca.protocol.model(sca_states[1]))
  chex.assert_trees_all_equal(fed_states[1].nodes.params, sca_states[1].nodes.params)
  for field in ('train_loss', 'messages', 'active_nodes', 'node_steps'):
    chex.assert_trees_all_equal(getattr(fed_metrics[0], field), getattr(sca_metrics[0], field))
  assert not np.array_equal(fed.protocol.model(fed_states[2])['Dense_0']['kernel'],
                            sca.protocol.model(sca_states[2])['Dense_0']['kernel'])


def test_messages_cost_two_models_in_bytes_and_in_time(two_rounds):
  priced, seconds = {}, {}
  for protocol, (config, exp, states, metrics) in two_rounds.items():
    assert int(metrics[0].messages[network.MODEL]) == 2 * config.sample_size
    priced[protocol] = experiment.message_bytes(config, exp.protocol, exp.learner)
    seconds[protocol] = float(states[1].clock)
  model_bytes = two_rounds['fedavg'][1].learner.model_bytes()
  assert priced['fedavg'][network.MODEL] == model_bytes
  assert priced['scaffold'] == (2 * model_bytes, *priced['fedavg'][1:])
  # one more model down and one more up, each through the server's bandwidth shared by s
  extra = 2 * config.sample_size * model_bytes / (BANDWIDTH_MBPS * 1e6 / 8)
  np.testing.assert_allclose(seconds['scaffold'] - seconds['fedavg'], extra, rtol=1e-4)


def test_only_the_sampled_clients_variates_change(two_rounds):
  config, _, states, _ = two_rounds['scaffold']

  def changed(before, after):  # [N] rows that differ anywhere
    rows = jax.tree.map(lambda a, b: np.any(np.asarray(a != b).reshape(a.shape[0], -1), axis=1),
                        before, after)
    return np.any(np.stack(jax.tree.leaves(rows)), axis=0)

  for before, after in zip(states[:-1], states[1:]):
    trained = np.zeros(config.nodes, bool)  # the round's clients, from its O(s) state
    trained[np.asarray(after.extra.server.clients)] = True  # no churn: all s are real
    assert trained.sum() == 5
    np.testing.assert_array_equal(changed(before.extra.client_controls,
                                          after.extra.client_controls), trained)


def test_round_compiles_once(tiny_config):
  config = dataclasses.replace(tiny_config, protocol='scaffold', model='logistic', rounds=6,
                               eval_every=2)
  exp = experiment.build(config)
  protocol = exp.protocol._replace(round=chex.assert_max_traces(exp.protocol.round, n=1))
  simulate.run(protocol, exp.data, exp.evaluate, key=jax.random.key(0), rounds=6, eval_every=2,
               report=experiment.make_report(config, exp), log=lambda _: None)


def test_bad_config_is_one_line_naming_the_flag():
  with pytest.raises(ConfigError, match='--optimizer=adam.*use --optimizer=sgd'):
    experiment.ExperimentConfig(protocol='scaffold', optimizer='adam')
  with pytest.raises(ConfigError, match='--sample_size=30 must be in 1..--nodes=20'):
    experiment.ExperimentConfig(protocol='scaffold', nodes=20, sample_size=30)


@pytest.mark.slow  # a fresh process: 20-40 s on the 2-core dev box
def test_cli_runs_end_to_end(tmp_path):
  args = ['--protocol=scaffold', '--rounds=4', '--eval_every=2', '--nodes=20', '--sample_size=5',
          '--num_samples=1000', '--model=logistic']
  proc = subprocess.run([sys.executable, '-m', 'launch.simulate', f'--out={tmp_path}', *args],
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'),
                        cwd=os.path.join(os.path.dirname(__file__), '..'))
  assert proc.returncode == 0, proc.stderr
  rows = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['round'] for r in rows] == [0, 2, 4]  # round 0: the initial model
  assert rows[0]['models_sent'] == 0
  assert all(np.isfinite(r['accuracy']) for r in rows)
  exp = experiment.build(experiment.ExperimentConfig(protocol='scaffold', nodes=20,
                                                     sample_size=5, num_samples=1000,
                                                     model='logistic'))
  assert rows[-1]['models_sent'] == 4 * 2 * 5  # per round: 5 downloads and 5 uploads
  assert rows[-1]['bytes_model'] == rows[-1]['models_sent'] * 2 * exp.learner.model_bytes()
