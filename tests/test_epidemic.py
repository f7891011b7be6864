"""Epidemic Learning (de Vos et al. 2023): EL-Oracle's per-round s-regular graphs, EL-Local's
pushes and merge against a per-node loop, exact averaging at full fanout, churn, bytes,
simulated time, one compile per round, determinism, bad settings and the command line."""

import dataclasses
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decsim import experiment, network, simulate
from decsim.errors import ConfigError
from decsim.protocols import epidemic
from decsim.protocols.base import Protocol, train_nodes
from decsim.report import network_report
from decsim.rng import Stream, node_keys, round_key

ROOT = os.path.join(os.path.dirname(__file__), '..')


@pytest.fixture(scope='module')
def el_config(tiny_config):
  return dataclasses.replace(tiny_config, protocol='el_local', nodes=12, el_fanout=3,
                             init='independent', rounds=4, eval_every=2)


_BUILT = {}


def _built(config):
  """The experiment of ``config`` and its jitted round, built once per module."""
  if config not in _BUILT:
    exp = experiment.build(config)
    _BUILT[config] = exp, jax.jit(exp.protocol.round)
  return _BUILT[config]


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _trained(exp, state):
  """The models after round ``state.round``'s local training, before any merge."""
  n = exp.config.nodes
  keys = node_keys(state.key, state.round, jnp.arange(n), Stream.BATCH)
  return train_nodes(exp.learner, state.nodes.params, state.nodes.opt_state, keys, exp.data).params


# ----------------------------------------------------------------------------- EL-Oracle


@pytest.mark.parametrize('nodes,fanout', [(20, 3), (16, 7), (12, 2), (10, 1), (9, 4), (8, 7)])
def test_oracle_graph_each_round_is_s_regular_symmetric_doubly_stochastic(nodes, fanout):
  base = jnp.asarray(epidemic.base_graph(nodes, fanout, seed=0))
  dense = jax.jit(jax.vmap(lambda r: epidemic.oracle_topology(base, jax.random.key(3), r).dense()))
  graphs = np.asarray(dense(jnp.arange(5)))  # [R, N, N]
  w = 1.0 / (fanout + 1)
  for W in graphs:
    np.testing.assert_allclose(np.diag(W), w, rtol=1e-6)  # own weight 1/(s+1), no self loop
    off = W - np.diag(np.diag(W))
    assert ((off > 0).sum(axis=1) == fanout).all()  # exactly s neighbours each
    np.testing.assert_allclose(off[off > 0], w, rtol=1e-6)
    np.testing.assert_array_equal(W, W.T)
    np.testing.assert_allclose(W.sum(axis=0), 1.0, rtol=1e-6)
    np.testing.assert_allclose(W.sum(axis=1), 1.0, rtol=1e-6)
  if fanout < nodes - 1:  # the complete graph is the only 7-regular graph on 8 nodes
    assert all((graphs[r] != graphs[r + 1]).any() for r in range(len(graphs) - 1))


def test_oracle_graphs_link_every_pair_equally_often():
  nodes, fanout, rounds = 12, 3, 400
  base = jnp.asarray(epidemic.base_graph(nodes, fanout, seed=1))
  adjacency = jax.jit(jax.vmap(lambda r: epidemic.oracle_topology(
      base, jax.random.key(0), r).dense() > 0))(jnp.arange(rounds))
  freq = np.asarray(adjacency).mean(axis=0)[~np.eye(nodes, dtype=bool)]  # [N (N-1)]
  # E[A_ij] = s / (N - 1) = 0.273 for a uniformly random s-regular graph; std 0.022 here.
  np.testing.assert_allclose(freq, fanout / (nodes - 1), atol=0.1)


# ----------------------------------------------------------------------------- EL-Local


@pytest.mark.parametrize('online', [12, 9, 4, 1])
def test_local_every_online_node_sends_to_s_distinct_other_online_nodes(online):
  nodes, fanout = 12, 5
  alive = jnp.zeros((nodes,), bool).at[jnp.array([0, 2, 3, 5, 6, 8, 9, 10, 11, 1, 4, 7])[:online]
                                       ].set(True)
  draw = jax.jit(jax.vmap(lambda k: epidemic.local_targets(k, alive, fanout)))
  dst, valid = map(np.asarray, draw(jax.random.split(jax.random.key(0), 50)))  # [R, N, s]
  alive = np.asarray(alive)
  for d, v in zip(dst, valid):
    for i in range(nodes):
      sent = d[i][v[i]]
      if not alive[i]:
        assert sent.size == 0
        continue
      assert sent.size == min(fanout, online - 1)
      assert len(set(sent.tolist())) == sent.size and i not in sent and alive[sent].all()
    assert (d[~v] == nodes).all()  # unused slots point past the last node


def test_local_targets_are_uniform_over_the_other_nodes():
  nodes, fanout, rounds = 10, 3, 3000
  alive = jnp.ones((nodes,), bool)
  dst, valid = jax.jit(jax.vmap(lambda k: epidemic.local_targets(k, alive, fanout)))(
      jax.random.split(jax.random.key(1), rounds))
  counts = np.zeros((nodes, nodes))
  src = np.broadcast_to(np.arange(nodes)[None, :, None], dst.shape)
  np.add.at(counts, (src[np.asarray(valid)], np.asarray(dst)[np.asarray(valid)]), 1)
  assert (np.diag(counts) == 0).all()
  freq = (counts / rounds)[~np.eye(nodes, dtype=bool)]
  np.testing.assert_allclose(freq, fanout / (nodes - 1), atol=0.04)  # std 0.009


def _merge_reference(params, dst, valid, alive):
  """EL-Local's merge, one node at a time: own model and the received ones, equal weights."""
  out = jax.tree.map(lambda x: np.array(x, np.float64), params)
  n, s = dst.shape
  for i in range(n):
    senders = [j for j in range(n) for k in range(s) if valid[j, k] and dst[j, k] == i]
    if not alive[i] or not senders:
      continue
    for x, o in zip(jax.tree.leaves(params), jax.tree.leaves(out)):
      x = np.asarray(x, np.float64)
      o[i] = (x[i] + sum(x[j] for j in senders)) / (1 + len(senders))
  return out


def test_local_merge_equals_a_per_node_loop():
  nodes, fanout = 9, 3
  keys = jax.random.split(jax.random.key(2), 3)
  params = {'w': jax.random.normal(keys[0], (nodes, 3, 2)), 'b': jax.random.normal(keys[1], (nodes, 4))}
  alive = jnp.array([1, 1, 0, 1, 1, 1, 0, 1, 1], bool)
  dst, valid = epidemic.local_targets(keys[2], alive, fanout)
  got = jax.jit(epidemic.local_merge)(params, dst, valid, alive)
  want = _merge_reference(params, np.asarray(dst), np.asarray(valid), np.asarray(alive))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  received = np.zeros(nodes, int)
  np.add.at(received, np.asarray(dst)[np.asarray(valid)], 1)
  for g, x in zip(_leaves(got), _leaves(params)):  # nodes that got nothing are returned bitwise
    np.testing.assert_array_equal(g[received == 0], x[received == 0])
  assert (received[~np.asarray(alive)] == 0).all()


def test_local_merge_with_uniform_in_degree_preserves_the_mean():
  nodes, fanout = 10, 3
  dst = (jnp.arange(nodes)[:, None] + jnp.arange(1, fanout + 1)) % nodes  # in-degree s everywhere
  valid = jnp.ones((nodes, fanout), bool)
  params = {'w': jax.random.normal(jax.random.key(0), (nodes, 5))}
  merged = epidemic.local_merge(params, dst, valid, jnp.ones((nodes,), bool))['w']
  np.testing.assert_allclose(merged.mean(0), params['w'].mean(0), rtol=1e-5, atol=1e-6)
  assert not np.allclose(merged, params['w'])


# ------------------------------------------------------------------ the protocols' rounds


@pytest.mark.parametrize('protocol', ['el_oracle', 'el_local'])
def test_round_is_local_training_then_the_merge(el_config, protocol):
  exp, step = _built(dataclasses.replace(el_config, protocol=protocol))
  state = exp.protocol.init(jax.random.key(5), exp.data)
  new, _ = step(state, exp.data)
  trained = _trained(exp, state)
  n, s = el_config.nodes, el_config.el_fanout
  if protocol == 'el_oracle':
    base = jnp.asarray(epidemic.base_graph(n, s, el_config.seed))
    W = epidemic.oracle_topology(base, state.key, state.round).dense()
    want = jax.tree.map(lambda x: np.einsum('ij,j...->i...', W, x), trained)
  else:
    dst, valid = epidemic.local_targets(round_key(state.key, state.round, Stream.TOPOLOGY),
                                        state.available, s)
    want = _merge_reference(trained, np.asarray(dst), np.asarray(valid), np.ones(n, bool))
  for g, w in zip(_leaves(new.nodes.params), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('protocol', ['el_oracle', 'el_local'])
def test_fanout_n_minus_1_is_exact_averaging(el_config, protocol):
  nodes = 8
  exp = experiment.build(dataclasses.replace(el_config, protocol=protocol, nodes=nodes,
                                             el_fanout=nodes - 1))
  state = exp.protocol.init(jax.random.key(0), exp.data)
  new, metrics = jax.jit(exp.protocol.round)(state, exp.data)
  for got, trained in zip(_leaves(new.nodes.params), _leaves(_trained(exp, state))):
    np.testing.assert_allclose(got, np.broadcast_to(trained.mean(0), got.shape), rtol=1e-5,
                               atol=1e-6)
  assert int(metrics.messages[network.MODEL]) == nodes * (nodes - 1)


@pytest.mark.parametrize('protocol', ['el_oracle', 'el_local'])
def test_offline_nodes_neither_train_send_nor_receive(el_config, protocol):
  exp, step = _built(dataclasses.replace(el_config, protocol=protocol))
  n, s = el_config.nodes, el_config.el_fanout
  alive = jnp.ones((n,), bool).at[jnp.array([1, 4, 7, 8])].set(False)
  state = exp.protocol.init(jax.random.key(1), exp.data).replace(available=alive)
  new, metrics = step(state, exp.data)
  off = ~np.asarray(alive)
  for tree_new, tree_old in ((new.nodes.params, state.nodes.params),
                             (new.nodes.opt_state, state.nodes.opt_state)):
    for a, b in zip(_leaves(tree_new), _leaves(tree_old)):
      np.testing.assert_array_equal(a[off], b[off])
  assert (np.asarray(new.sent[:, network.MODEL])[off] == 0).all()
  changed = [np.any(a != b, axis=tuple(range(1, a.ndim)))
             for a, b in zip(_leaves(new.nodes.params), _leaves(state.nodes.params))]
  assert np.any(changed, axis=0)[~off].all()
  sent = int(metrics.messages[network.MODEL])
  if protocol == 'el_local':  # every online node pushes s models to online nodes
    assert sent == int(alive.sum()) * s
    np.testing.assert_array_equal(np.asarray(new.sent[:, network.MODEL])[~off], s)
  else:  # the round's graph minus the edges with an offline end: symmetric, so even
    assert 0 < sent <= int(alive.sum()) * s and sent % 2 == 0
  assert int(metrics.active_nodes) == int(alive.sum())


@pytest.mark.parametrize('variant', ['oracle', 'local'])
def test_simulated_time_counts_the_upload_of_s_models(el_config, variant):
  exp = experiment.build(el_config)
  n, s, bandwidth = el_config.nodes, el_config.el_fanout, 2e6
  net = network.uniform_network(n, latency=0.05, bandwidth=bandwidth, speed=1000.0)
  protocol = epidemic.epidemic(exp.learner, nodes=n, fanout=s, variant=variant, network=net)
  state = protocol.init(jax.random.key(0), exp.data)
  _, metrics = jax.jit(protocol.round)(state, exp.data)
  train = el_config.local_steps * el_config.batch_size / 1000.0
  busiest = s  # s models share a sender's upload; the pushes a node receives its download
  if variant == 'local':
    dst, valid = epidemic.local_targets(round_key(jax.random.key(0), 0, Stream.TOPOLOGY),
                                        jnp.ones(n, bool), s)
    busiest = max(s, int(np.bincount(np.asarray(dst)[np.asarray(valid)], minlength=n).max()))
  want = train + 0.05 + busiest * exp.learner.model_bytes() / bandwidth
  np.testing.assert_allclose(float(metrics.sim_seconds), want, rtol=1e-5)


def test_round_compiles_once_and_bytes_count_s_models_per_node(el_config, tmp_path):
  wrap = lambda p: Protocol(p.init, chex.assert_max_traces(p.round, n=1), p.model, p.node_models)
  for protocol in ('el_oracle', 'el_local'):
    chex.clear_trace_counter()  # both rounds have the same source: one counter
    config = dataclasses.replace(el_config, protocol=protocol, rounds=6, eval_every=2)
    exp = experiment.build(config)
    model_bytes = exp.learner.model_bytes()
    simulate.run(wrap(exp.protocol), exp.data, exp.evaluate, key=jax.random.key(0), rounds=6,
                 eval_every=2, report=network_report(network.message_bytes(
                     model_bytes, config.nodes)), out_dir=tmp_path / protocol,
                 log=lambda _: None)  # 3 chunks of 2 rounds: one trace in all
    rows = [json.loads(line) for line in open(tmp_path / protocol / 'metrics.jsonl')]
    assert [r['round'] for r in rows] == [0, 2, 4, 6]
    per_round = config.nodes * config.el_fanout  # every node uploads s models a round
    for row in rows:
      assert row['models_sent'] == row['round'] * per_round
      assert row['bytes_model'] == row['round'] * per_round * model_bytes
      assert {'accuracy', 'consensus_accuracy', 'accuracy_min'} <= set(row)


@pytest.mark.slow  # determinism of every run is tested by the resume tests
@pytest.mark.parametrize('protocol', ['el_oracle', 'el_local'])
def test_rounds_are_deterministic_in_the_run_key(el_config, protocol):
  exp, step = _built(dataclasses.replace(el_config, protocol=protocol))
  runs = {}
  for seed in (0, 0, 1):
    state = exp.protocol.init(jax.random.key(seed), exp.data)
    state = state.replace(nodes=state.nodes.replace(
        params=exp.protocol.init(jax.random.key(0), exp.data).nodes.params))  # same models
    runs.setdefault(seed, []).append(_leaves(step(state, exp.data)[0].nodes.params))
  for a, b in zip(*runs[0]):
    np.testing.assert_array_equal(a, b)
  assert any((a != b).any() for a, b in zip(runs[0][0], runs[1][0]))  # other batches and peers


def test_bad_fanout_is_one_config_error():
  from decsim.experiment import ExperimentConfig
  with pytest.raises(ConfigError, match=r'--el_fanout=8 must be below --nodes=8 .*at most 7'):
    ExperimentConfig(protocol='el_local', nodes=8, el_fanout=8)
  with pytest.raises(ConfigError, match=r'--nodes=9 x --el_fanout=3 is odd'):
    ExperimentConfig(protocol='el_oracle', nodes=9, el_fanout=3)
  ExperimentConfig(protocol='el_local', nodes=9, el_fanout=3)  # EL-Local needs no even product
  with pytest.raises(ConfigError, match=r'--el_fanout=0 must be >= 1'):
    ExperimentConfig(protocol='el_oracle', el_fanout=0)
  with pytest.raises(ConfigError, match='at most 3'):
    epidemic.epidemic(None, nodes=4, fanout=4)
  assert ExperimentConfig().el_fanout == 7  # the paper's s


def _cli(*args, timeout=300):
  env = dict(os.environ, PYTHONPATH=os.path.abspath(ROOT))
  return subprocess.run([sys.executable, '-m', 'launch.simulate', *args], capture_output=True,
                        text=True, timeout=timeout, cwd=ROOT, env=env)


def test_cli_refuses_a_fanout_of_n_in_one_line(tmp_path):
  bad = _cli('--protocol=el_oracle', '--el_fanout=16', '--nodes=16', f'--out={tmp_path / "x"}')
  assert bad.returncode == 2
  assert [l for l in bad.stderr.splitlines() if l.strip()] == [
      'decsim: error: --el_fanout=16 must be below --nodes=16 (each node sends to s distinct '
      'other nodes): lower --el_fanout to at most 15']
  assert not (tmp_path / 'x').exists()


@pytest.mark.slow  # a fresh process: 20-40 s on the 2-core dev box
@pytest.mark.parametrize('small', [True, False])
def test_cli_run_writes_accuracy_and_consensus_accuracy(tmp_path, small):
  out = tmp_path / 'el1'
  proc = _cli('--protocol=el_local', '--el_fanout=3', '--nodes=16', '--rounds=4',
              '--eval_every=2', f'--out={out}',
              *(('--num_samples=2000', '--model=mlp') if small else ()), timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = [json.loads(line) for line in open(out / 'metrics.jsonl')]
  assert [r['round'] for r in rows] == [0, 2, 4]  # round 0: the initial models
  assert all(0 <= r['accuracy'] <= 1 and 0 <= r['consensus_accuracy'] <= 1 for r in rows)
  assert rows[-1]['models_sent'] == 4 * 16 * 3


# ------------------------------------------------------------------------------- the study


@pytest.mark.parametrize('quick', [True, False])
def test_study_runs_differ_in_protocol_only(quick):
  from decsim.studies import epidemic as study
  configs = study.configs(quick)
  assert set(configs) == {'el_oracle', 'el_local', 'dpsgd'}
  shared = [{k: v for k, v in dataclasses.asdict(c).items() if k != 'protocol'}
            for c in configs.values()]
  assert all(s == shared[0] for s in shared)  # same data, partition, network, seed, target
  c = configs['dpsgd']
  assert (c.topology, c.degree, c.el_fanout) == ('kregular', c.el_fanout, study.FANOUT)
  if not quick:
    assert (c.nodes, c.el_fanout, c.partition, c.alpha) == (96, 7, 'dirichlet', 0.1)


def test_study_reads_targets_from_the_first_row_that_reaches_them():
  from decsim.studies import epidemic as study
  rows = [{'round': 5, 'accuracy': 0.5, 'sim_seconds': 2.0, 'node_steps': 100, 'bytes_total': 10},
          {'round': 10, 'accuracy': 0.72, 'sim_seconds': 4.0, 'node_steps': 100, 'bytes_total': 20},
          {'round': 15, 'accuracy': 0.7, 'sim_seconds': 6.0, 'node_steps': 100, 'bytes_total': 30}]
  got = study.to_targets(rows, (0.6, 0.7, 0.8))
  assert (got['rounds_to_0.6'], got['seconds_to_0.6'], got['node_steps_to_0.6'],
          got['bytes_to_0.6']) == (10, 4.0, 200, 20)
  assert got['rounds_to_0.7'] == 10 and got['rounds_to_0.8'] is None
  assert got['node_steps_to_0.8'] is None


@pytest.mark.slow
def test_quick_epidemic_study_writes_table_and_plots(tmp_path):
  from decsim import studies
  runs = studies.get_study('epidemic')(tmp_path, quick=True)
  study = json.loads((tmp_path / 'study.json').read_text())
  assert study['study'] == 'epidemic' and list(study['runs']) == ['el_oracle', 'el_local', 'dpsgd']
  for label, summary in runs.items():
    assert summary['rounds'] == 6 and summary['final_accuracy'] > 0.1
    assert (tmp_path / label / 'metrics.jsonl').exists()
  assert (tmp_path / 'epidemic.png').stat().st_size > 0
  assert (tmp_path / 'epidemic_consensus.png').stat().st_size > 0
