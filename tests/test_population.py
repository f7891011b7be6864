"""Population scale (issue 16): FedAvg's O(s) state is the dense-row FedAvg, bitwise; clients
without a table are functions of (seed, client); a run with generated clients holds no
N x L and no N x model array; the FL server is found without an N x N matrix."""

import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from decsim import experiment, metrics, network, simulate
from decsim.aggregation import ServerOptimizer, mean
from decsim.data import virtual
from decsim.data.sampler import NodeData
from decsim.errors import ConfigError
from decsim.local import make_local_update
from decsim.protocols import fedavg
from decsim.protocols.base import Learner, broadcast, rows_of, sample_available, train_nodes
from decsim.rng import Stream, node_keys, round_key

# ------------------------------------------- O(s) state == the dense [N, ...] rows of before

N, S, D, C = 12, 4, 5, 3


def _tiny():
  """Logistic regression on 12 nodes of random data with uneven sizes."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(N * 6, D)).astype(np.float32)
  y = rng.integers(0, C, N * 6).astype(np.int32)
  sizes = rng.integers(1, 7, N).astype(np.int32)
  data = NodeData(jnp.asarray(x), jnp.asarray(y),
                  jnp.arange(N * 6, dtype=jnp.int32).reshape(N, 6), jnp.asarray(sizes))

  def loss(params, xb, yb):
    logits = xb @ params['w'] + params['b']
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, yb))

  tx = optax.sgd(0.3, momentum=0.9)
  learner = Learner(init_params=lambda key: {'w': 0.1 * jax.random.normal(key, (D, C)),
                                             'b': jnp.zeros((C,))},
                    tx=tx, local_update=make_local_update(loss, tx, 3, 2), batch_size=2)
  return learner, data


def _dense_round(learner, data, net, state, rows):
  """FedAvg's round as it was before issue 16: every client's last model in an [N, ...]
  row; returns the new global model, the rows, the clients' ids, seconds and loss."""
  server = fedavg.ServerConfig(mean(), ServerOptimizer(), ServerOptimizer().transformation(), None)
  r = state.round
  ids, valid = sample_available(round_key(state.key, r, Stream.SAMPLE), state.available, S)
  params = broadcast(state.extra.global_params, S)
  result = train_nodes(learner, params, jax.vmap(learner.tx.init)(params),
                       node_keys(state.key, r, ids, Stream.BATCH), data, rows=ids, round_=r)
  steps = jnp.where(valid, result.steps, 0)
  n_valid = jnp.sum(valid, dtype=jnp.int32)
  finish = fedavg.finish_seconds(net, 0, ids, steps * learner.batch_size,
                                 learner.model_bytes(), n_valid)
  accepted, seconds = fedavg.accept_first(jnp.where(valid, finish, jnp.inf), valid, S)
  weights = fedavg.client_weights(data.sizes[ids], 'data_size', accepted)
  extra = fedavg.aggregate_clients(server, state.extra, result.params, weights, accepted)
  rows = fedavg.scatter_clients(rows, result.params, ids, valid)
  loss = jnp.sum(result.loss * valid) / jnp.maximum(n_valid, 1)
  return extra.global_params, rows, jnp.where(valid, ids, N), seconds, loss


def test_o_s_state_gives_the_dense_rows_metrics_bitwise():
  """Five rounds under churn (some rounds with fewer than s clients online): the global
  model, the clients' models (client_accuracy's input), the round's metrics and the
  counters are those of the dense-row layout, bit for bit; the state holds s rows."""
  learner, data = _tiny()
  net = network.uniform_network(N, bandwidth=1e5)
  protocol = fedavg.fedavg(learner, nodes=N, sample_size=S, network=net)
  state = protocol.init(jax.random.key(3), data)
  chex.assert_tree_shape_prefix(state.nodes.params, (S,))
  rows = broadcast(state.extra.global_params, N)
  step = jax.jit(protocol.round)
  dense = jax.jit(lambda state, rows: _dense_round(learner, data, net, state, rows))
  for r, online in enumerate([N, 2, N, 7, 3]):
    state = state.replace(available=jnp.arange(N) < online)
    global_ref, rows, clients, seconds, loss = dense(state, rows)
    state, m = step(state, data)
    chex.assert_trees_all_equal(protocol.model(state), global_ref)
    chex.assert_trees_all_equal(m.sim_seconds, seconds)
    chex.assert_trees_all_equal(m.train_loss, loss)
    np.testing.assert_array_equal(state.extra.clients, clients)
    ref_models, ref_valid = rows_of(rows, clients)
    models, valid = protocol.client_models(state)
    np.testing.assert_array_equal(valid, ref_valid)
    assert int(valid.sum()) == min(S, online)
    chex.assert_trees_all_equal(jax.tree.map(lambda a: a[valid], models),
                                jax.tree.map(lambda a: a[ref_valid], ref_models))
    evaluate = metrics.make_evaluate(lambda p, x: x @ p['w'] + p['b'])
    row = metrics.client_accuracy(evaluate, models, valid, data.x, data.y)
    ref = metrics.client_accuracy(evaluate, ref_models, ref_valid, data.x, data.y)
    chex.assert_trees_all_equal(row, ref)


# ----------------------------------------------------------- clients without a table


def _client_config(**kw):
  return virtual.ClientDataConfig(client_data='generated', **kw)


def _base(num_classes=4, m=200):
  rng = np.random.default_rng(1)
  return rng.normal(size=(m, 3)).astype(np.float32), rng.integers(0, num_classes, m)


@pytest.mark.parametrize('kind', ['synthetic', pytest.param('virtual', marks=pytest.mark.slow)])
def test_a_client_is_a_function_of_seed_and_client_not_of_n(kind):
  """Client 7's size and samples are the same among 20 or 300 clients; another seed or
  another client gives other samples."""
  c = _client_config()
  make = ((lambda seed, n: virtual.synthetic_data(seed, n, c)) if kind == 'synthetic' else
          (lambda seed, n: virtual.virtual_data(seed, n, c, *_base(), 4, alpha=0.5)))
  positions = jnp.arange(16)
  draw = jax.jit(lambda d, client: d.samples(d.client(client), positions))
  small, large, other = make(0, 20), make(0, 300), make(1, 20)
  assert int(small.sizes[7]) == int(large.sizes[7])
  chex.assert_trees_all_equal(draw(small, 7), draw(large, 7))
  assert not np.array_equal(draw(small, 7)[0], draw(other, 7)[0])
  assert not np.array_equal(draw(small, 7)[0], draw(small, 8)[0])


def test_synthetic_client_draws_follow_leaf():
  """A Synthetic client's features scatter about its mean v with sd k^-0.6 per dimension
  k; its labels are its own softmax model's argmax."""
  c = _client_config()
  data = virtual.synthetic_data(0, 10, c)
  client = data.client(3)
  x, y = jax.jit(data.samples)(client, jnp.arange(4000))  # [4000, 60], [4000]
  sd = np.arange(1, 61) ** -0.6
  assert np.all(np.abs(x.mean(0) - client['v']) < 4 * sd / np.sqrt(4000))
  np.testing.assert_allclose(x.std(0), sd, rtol=0.1)
  np.testing.assert_array_equal(y, np.argmax(x @ client['w'] + client['b'], axis=1))


def test_virtual_clients_label_skew_follows_alpha():
  """Dirichlet(0.05) clients hold mostly one label, Dirichlet(100) ones about all four;
  every sample is a base sample of the label it carries."""
  x, y = _base()
  top = {}
  for alpha in (0.05, 100.0):
    data = virtual.virtual_data(0, 20, _client_config(), x, y, 4, alpha)
    xs, ys = jax.jit(jax.vmap(lambda i: data.samples(data.client(i), jnp.arange(100))))(
        jnp.arange(20))  # [20, 100, 3], [20, 100]
    top[alpha] = np.mean([np.bincount(row, minlength=4).max() / 100 for row in np.asarray(ys)])
    match = (np.asarray(xs)[..., None, :] == x[None, None]).all(-1)  # [20, 100, M]
    assert match.any(-1).all()
    np.testing.assert_array_equal(y[match.argmax(-1)], ys)
  assert top[0.05] > 0.8 and top[100.0] < 0.4


def test_client_sizes_are_clipped_lognormal():
  key = jax.random.key(0)
  sizes = np.asarray(virtual.client_sizes(key, jnp.arange(4000), 4.0, 2.0, 10, 2981))
  assert sizes.min() >= 10 and sizes.max() <= 2981
  inside = sizes[(sizes > 10) & (sizes < 2981)]
  assert abs(np.median(np.log(sizes)) - 4.0) < 0.15  # the lognormal's median e^mu
  assert len(inside) > 0.5 * len(sizes)
  np.testing.assert_array_equal(virtual.client_sizes(key, jnp.arange(5), 3.0, 0.0, 1, 100),
                                int(np.floor(np.exp(3.0))))


def test_bad_client_data_flags_are_one_line():
  with pytest.raises(ConfigError, match='--client_size_min=50 exceeds --client_size_max=20'):
    experiment.ExperimentConfig(client_data='generated', client_size_min=50, client_size_max=20)
  with pytest.raises(ConfigError, match='--local_test_fraction=0.2 needs clients with a table'):
    experiment.ExperimentConfig(client_data='generated', local_test_fraction=0.2)


# ----------------------------------------------- a run with generated clients, at N > 10^4

GENERATED_NODES = 20_000


@pytest.fixture(scope='module')
def generated_run(tmp_path_factory):
  """FedAvg on 20,000 generated Synthetic clients (auto: above the table limit) under
  Bernoulli churn, 4 rounds in 2 chunks, the round traced once."""
  c = experiment.ExperimentConfig(protocol='fedavg', nodes=GENERATED_NODES, sample_size=8,
                                  dataset='synthetic', model='logistic', rounds=4, eval_every=2,
                                  local_steps=2, p_online=0.5, num_samples=500)
  exp = experiment.build(c)
  protocol = exp.protocol._replace(round=chex.assert_max_traces(exp.protocol.round, n=1))
  out = tmp_path_factory.mktemp('generated')
  summary = simulate.run(protocol, exp.data, exp.evaluate, key=jax.random.key(0), rounds=4,
                         eval_every=2, report=experiment.make_report(c, exp), out_dir=out,
                         log=lambda _: None)
  state = jax.jit(exp.protocol.init)(jax.random.key(0), exp.data)
  return c, exp, state, summary, out


@pytest.mark.slow  # the fixture: ~40 s quiet (build, two compiles at N = 20,000)
def test_generated_run_trains_and_scores(generated_run):
  c, exp, _, summary, out = generated_run
  rows = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines()]
  assert [r['round'] for r in rows] == [0, 2, 4]
  assert all(np.isfinite(r['accuracy']) and np.isfinite(r['client_accuracy'])
             for r in rows[1:])
  assert rows[-1]['models_sent'] == 2 * 4 * 8  # no fewer than 8 of 10,000 online
  assert summary['status'] == 'completed'
  assert exp.dataset.x_test.shape == (100, virtual.SYNTHETIC_DIM)  # 20% of --num_samples


@pytest.mark.slow
def test_generated_run_holds_no_n_by_model_or_n_by_l_array(generated_run):
  """Per-node arrays are vectors or [N, K] counters; the data's only per-client array is
  its sizes; the model rows are the s in flight."""
  c, exp, state, _, _ = generated_run
  assert isinstance(exp.data, virtual.VirtualData)
  for leaf in jax.tree.leaves(state) + jax.tree.leaves(exp.data):
    if getattr(leaf, 'ndim', 0) and leaf.shape[0] == c.nodes:
      assert leaf.size <= c.nodes * 4, leaf.shape
  chex.assert_tree_shape_prefix(state.nodes.params, (c.sample_size,))


# ------------------------------------------------------------- the FL server, O(S^2 + N)


def test_lowest_median_latency_node_matches_the_n_by_n_median():
  rng = np.random.default_rng(0)
  for t in range(60):
    sites, nodes = int(rng.integers(1, 6)), int(rng.integers(1, 40))
    latency = (rng.choice([0.01, 0.02, 0.05], (sites, sites)) if t % 2
               else rng.random((sites, sites))).astype(np.float32)
    site = rng.integers(0, sites, nodes)
    net = network.Network(site=site, latency=latency, upload=None, download=None, speed=None)
    dense = int(np.argmin(np.median(latency[site][:, site], axis=1)))
    assert network.lowest_median_latency_node(net) == dense


# --------------------------------------------------------- O(s) sampling of many clients


def test_sparse_client_sampling_is_uniform_distinct_and_available():
  """Above SPARSE_SAMPLE_MIN_NODES: s distinct available ids, every available node about
  equally often; with fewer available than the draws can find, the O(N) fallback takes
  all of them."""
  n, s = fedavg.SPARSE_SAMPLE_MIN_NODES, 64
  even = jnp.arange(n) % 2 == 0
  draw = jax.jit(jax.vmap(lambda k, a: fedavg.sample_clients(k, a, s), in_axes=(0, None)))
  keys = jax.random.split(jax.random.key(0), 400)
  ids, valid = map(np.asarray, draw(keys, even))  # [400, s]
  assert valid.all() and (ids % 2 == 0).all()
  assert all(len(set(row)) == s for row in ids)
  counts = np.bincount(ids.ravel() // (n // 8), minlength=8)  # 8 equal bands of nodes
  assert counts.min() > 0.85 * counts.mean()
  few = jnp.arange(n) < 40  # 40 available: fewer than s
  ids, valid = map(np.asarray, draw(keys[:2], few))
  assert valid.sum(1).tolist() == [40, 40] and set(ids[0][valid[0]]) == set(range(40))


@pytest.mark.parametrize('protocol', ['fedavg', 'fedprox', 'scaffold'])
def test_only_scaffold_keeps_a_model_per_client(tiny_config, protocol):
  """The state's node-axis leaves (shapes only, nothing runs): FedAvg and FedProx keep the
  byte counters and the availability mask; SCAFFOLD adds its N control variates."""
  config = dataclasses.replace(tiny_config, protocol=protocol, model='logistic', momentum=0.0)
  exp = experiment.build(config)
  shapes = jax.eval_shape(exp.protocol.init, jax.random.key(0), exp.data)
  per_node = [l for l in jax.tree.leaves(shapes) if l.ndim and l.shape[0] == config.nodes]
  controls = jax.tree.leaves(shapes.extra.client_controls) if protocol == 'scaffold' else []
  assert len(per_node) == 2 + len(controls)
  model = jax.tree.leaves(exp.protocol.model(shapes))
  if protocol == 'scaffold':  # one control variate per client, shaped like the model
    assert [l.shape[1:] for l in controls] == [l.shape for l in model]
  chex.assert_tree_shape_prefix(shapes.nodes.params, (config.sample_size,))
