"""Aggregators and server optimizers (decsim.aggregation): robust aggregates ignore
masked rows and outliers, the defaults are FedAvg / D-PSGD bitwise, server
optimizers change the model and still learn, and a round compiles once."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decsim import aggregation
from decsim.aggregation import ServerOptimizer
from decsim.checkpoint import Checkpointer
from decsim.data.sampler import NodeData
from decsim.local import make_local_update
from decsim.protocols.base import Learner, init_params, train_nodes, weighted_average
from decsim.protocols.dpsgd import dpsgd
from decsim.protocols.fedavg import fedavg
from decsim.rng import Stream, node_keys
from decsim.topology import build_topology

DIM, CLASSES = 5, 3


# ------------------------------------------------------------- a tiny problem

def _loss(params, x, y):
  logits = x @ params['w'] + params['b']  # [B, C]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _problem(nodes: int = 6, per_node: int = 16, seed: int = 0) -> tuple[Learner, NodeData]:
  """Multinomial logistic regression on linearly separable-ish Gaussian data."""
  rng = np.random.default_rng(seed)
  m = nodes * per_node
  x = rng.normal(size=(m, DIM)).astype(np.float32)
  y = np.argmax(x @ rng.normal(size=(DIM, CLASSES)), axis=1).astype(np.int32)
  sizes = per_node - np.arange(nodes) % 4  # unequal, so data-size weights matter
  data = NodeData(x=jnp.asarray(x), y=jnp.asarray(y),
                  idx=jnp.arange(m, dtype=jnp.int32).reshape(nodes, per_node),
                  sizes=jnp.asarray(sizes, jnp.int32))
  tx = optax.sgd(0.1)
  init = lambda key: {'w': 0.1 * jax.random.normal(key, (DIM, CLASSES)),
                      'b': jnp.zeros((CLASSES,))}
  learner = Learner(init_params=init, tx=tx, batch_size=4,
                    local_update=make_local_update(_loss, tx, local_steps=2, batch_size=4))
  return learner, data


def _run(protocol, data, rounds: int, seed: int = 0):
  state = protocol.init(jax.random.key(seed), data)
  round_ = jax.jit(protocol.round)
  for _ in range(rounds):
    state, _ = round_(state, data)
  return state


def _assert_bitwise_equal(a, b):
  unkey = lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
  la, lb = jax.tree.leaves(jax.tree.map(unkey, a)), jax.tree.leaves(jax.tree.map(unkey, b))
  assert jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb)
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------- aggregators

ROBUST = {'median': aggregation.median(), 'trimmed_mean': aggregation.trimmed_mean(0.2)}
ALL = {'mean': aggregation.mean(), **ROBUST}


def _apply(aggregator, models, weights):
  return aggregator.apply(models, jnp.asarray(weights, jnp.float32), ())[0]


@st.composite
def _rows_and_weights(draw, min_rows=1, max_rows=7):
  s = draw(st.integers(min_rows, max_rows))
  shape = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
  # No subnormals: XLA on CPU flushes them to zero in arithmetic, numpy does not.
  size = s * int(np.prod(shape))
  values = draw(st.lists(st.floats(-100, 100, width=32, allow_subnormal=False), min_size=size,
                         max_size=size))
  weights = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 3.0]), min_size=s, max_size=s))
  weights[draw(st.integers(0, s - 1))] = 1.0  # at least one row counts
  return np.asarray(values, np.float32).reshape((s, *shape)), np.asarray(weights, np.float32)


@settings(max_examples=30)
@given(_rows_and_weights())
def test_robust_aggregates_equal_the_mean_on_identical_rows(rows_weights):
  rows, weights = rows_weights
  same = np.broadcast_to(rows[0], rows.shape)
  want = _apply(aggregation.mean(), {'x': same}, weights)['x']
  np.testing.assert_allclose(want, rows[0], rtol=1e-6, atol=1e-6)
  for name, aggregator in ROBUST.items():
    np.testing.assert_allclose(_apply(aggregator, {'x': same}, weights)['x'], want, rtol=1e-6,
                               atol=1e-6, err_msg=name)


@settings(max_examples=30)
@given(_rows_and_weights())
def test_mean_is_bitwise_weighted_average(rows_weights):
  rows, weights = rows_weights
  got = _apply(aggregation.mean(), {'x': rows}, weights)['x']
  np.testing.assert_array_equal(got, weighted_average({'x': rows}, jnp.asarray(weights))['x'])


@settings(max_examples=30)
@given(_rows_and_weights(), st.sampled_from([np.inf, -np.inf, np.nan, 1e30]))
def test_rows_of_weight_zero_are_ignored(rows_weights, garbage):
  rows, weights = rows_weights
  dirty = np.where((weights == 0).reshape((-1,) + (1,) * (rows.ndim - 1)), garbage, rows)
  for name, aggregator in ALL.items():
    clean_out = _apply(aggregator, {'x': rows}, weights)['x']
    dirty_out = _apply(aggregator, {'x': dirty.astype(np.float32)}, weights)['x']
    np.testing.assert_array_equal(clean_out, dirty_out, err_msg=name)
    assert np.all(np.isfinite(clean_out)), name


@settings(max_examples=30)
@given(_rows_and_weights(), st.sampled_from([0.0, 0.1, 0.2, 0.34, 0.49]))
def test_trimmed_mean_and_median_match_numpy_on_the_valid_rows(rows_weights, trim):
  rows, weights = rows_weights
  valid = np.sort(rows[weights > 0], axis=0)
  n = len(valid)
  k = int(np.floor(trim * n))
  np.testing.assert_allclose(_apply(aggregation.trimmed_mean(trim), {'x': rows}, weights)['x'],
                             valid[k:n - k].mean(axis=0), rtol=1e-5, atol=1e-4)
  median = _apply(aggregation.median(), {'x': rows}, weights)['x']
  if n % 2:  # an odd count picks a value: exact
    np.testing.assert_array_equal(median, np.median(valid, axis=0))
  else:
    np.testing.assert_allclose(median, np.median(valid, axis=0), rtol=1e-6, atol=1e-6)


def test_trimmed_mean_zero_is_the_unweighted_mean_of_valid_rows():
  rows = np.random.default_rng(0).normal(size=(6, 4, 3)).astype(np.float32)
  weights = np.array([1, 0, 2, 5, 0, 1], np.float32)
  got = _apply(aggregation.trimmed_mean(0.0), {'x': rows}, weights)['x']
  np.testing.assert_allclose(got, rows[weights > 0].mean(axis=0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('honest', [5, 6, 9])
def test_one_outlier_moves_the_mean_but_not_the_robust_aggregates(honest):
  rng = np.random.default_rng(honest)
  good = (2.0 + 0.01 * rng.normal(size=(honest, 8))).astype(np.float32)
  rows = {'x': np.concatenate([good, np.full((1, 8), 1e6, np.float32)])}
  weights = np.ones(honest + 1, np.float32)
  low, high = good.min(axis=0), good.max(axis=0)
  for name, aggregator in ROBUST.items():
    got = np.asarray(_apply(aggregator, rows, weights)['x'])
    assert np.all((low <= got) & (got <= high)), name
  assert np.all(np.asarray(_apply(aggregation.mean(), rows, weights)['x']) > high)


def test_aggregates_keep_the_dtype_and_agree_under_jit():
  rows = {'w': jax.random.normal(jax.random.key(1), (5, 4, 2)).astype(jnp.bfloat16),
          'b': jax.random.normal(jax.random.key(2), (5, 3))}
  weights = jnp.asarray([1.0, 0.0, 1.0, 2.0, 1.0])
  for name, aggregator in ALL.items():
    eager = aggregator.apply(rows, weights, ())[0]
    jitted = jax.jit(aggregator.apply)(rows, weights, ())[0]
    assert eager['w'].dtype == jnp.bfloat16 and eager['b'].dtype == jnp.float32, name
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
      np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                 rtol=1e-6, err_msg=name)


def test_bad_names_and_settings_raise_one_line_errors():
  cases = [(lambda: aggregation.make_aggregator('x'),
            "--aggregator='x' is unknown: choose one of mean, median, trimmed_mean"),
           (lambda: aggregation.make_aggregator('trimmed_mean', 0.5), '--trim_fraction'),
           (lambda: aggregation.trimmed_mean(-0.1), '--trim_fraction'),
           (lambda: ServerOptimizer('nesterov'), '--server_optimizer'),
           (lambda: ServerOptimizer('adam', lr=0.0), '--server_lr'),
           (lambda: ServerOptimizer('sgd', momentum=1.0), '--server_momentum'),
           (lambda: ServerOptimizer('momentum', momentum=0.0), '--server_momentum'),
           (lambda: ServerOptimizer('adam', lr=0.1, momentum=0.9), '--server_momentum')]
  for make, message in cases:
    with pytest.raises(ValueError, match=message.replace('[', r'\[')) as info:
      make()
    assert '\n' not in str(info.value)
  assert aggregation.make_aggregator('median') is not None
  assert set(aggregation.AGGREGATORS) == {'mean', 'median', 'trimmed_mean'}


# ------------------------------------------------------------- server optimizers

def test_only_sgd_with_lr_one_and_no_momentum_replaces_the_global_model():
  assert ServerOptimizer().replaces_global
  assert not ServerOptimizer('sgd', lr=0.5).replaces_global
  assert not ServerOptimizer('sgd', momentum=0.5).replaces_global
  assert not ServerOptimizer('adam', lr=1.0).replaces_global
  # The step it skips is the identity in exact arithmetic: old - 1 * (old - aggregate).
  old = {'x': jnp.asarray([1.0, -2.0, 3.5])}
  aggregate = {'x': jnp.asarray([0.5, 0.25, 3.0])}
  tx = ServerOptimizer().transformation()
  new, _ = aggregation.server_step(tx, tx.init(old), old, aggregate)
  np.testing.assert_allclose(new['x'], aggregate['x'], rtol=1e-7)


def test_default_fedavg_is_bitwise_explicit_mean_with_server_sgd_lr_one():
  learner, data = _problem()
  kw = dict(nodes=6, sample_size=4, success_fraction=0.75)  # one of 4 models dropped
  default = _run(fedavg(learner, **kw), data, rounds=4)
  explicit = _run(fedavg(learner, **kw, aggregator=aggregation.mean(),
                         server_optimizer=ServerOptimizer('sgd', lr=1.0, momentum=0.0)),
                  data, rounds=4)
  _assert_bitwise_equal(default, explicit)


@functools.cache
def _plain_fedavg():
  learner, data = _problem()
  return _run(fedavg(learner, nodes=6, sample_size=4), data, rounds=3)


@pytest.mark.parametrize('optimizer', [ServerOptimizer('momentum', lr=1.0, momentum=0.9),
                                       ServerOptimizer('adam', lr=0.05),
                                       ServerOptimizer('yogi', lr=0.05),
                                       ServerOptimizer('adagrad', lr=0.05)])
def test_server_optimizers_change_the_global_model_and_stay_finite(optimizer):
  learner, data = _problem()
  plain = _plain_fedavg()
  tuned = _run(fedavg(learner, nodes=6, sample_size=4, server_optimizer=optimizer), data,
               rounds=3)
  diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), plain.extra.global_params,
                      tuned.extra.global_params)
  assert max(jax.tree.leaves(diff)) > 1e-4
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tuned.extra))


def test_server_adam_reduces_the_training_loss():
  learner, data = _problem()
  protocol = fedavg(learner, nodes=6, sample_size=4,
                    server_optimizer=ServerOptimizer('adam', lr=0.05))
  global_loss = lambda state: float(_loss(state.extra.global_params, data.x, data.y))
  start = global_loss(protocol.init(jax.random.key(0), data))
  end = global_loss(_run(protocol, data, rounds=30))
  assert end < 0.5 * start  # about 1.1 -> 0.3 over seeds 0-2


def test_robust_fedavg_round_compiles_once_and_its_state_checkpoints(tmp_path):
  learner, data = _problem()
  protocol = fedavg(learner, nodes=6, sample_size=4, aggregator=aggregation.trimmed_mean(0.25),
                    server_optimizer=ServerOptimizer('adam', lr=0.05))
  round_ = jax.jit(chex.assert_max_traces(protocol.round, n=1))
  state = protocol.init(jax.random.key(0), data)
  for _ in range(3):
    state, _ = round_(state, data)
  assert int(state.extra.server_opt_state[0].count) == 3  # adam's step count
  checkpointer = Checkpointer(tmp_path)
  checkpointer.save(3, state, {})
  checkpointer.manager.wait_until_finished()
  step, restored, _ = checkpointer.restore_latest(protocol.init(jax.random.key(0), data), print)
  checkpointer.close()
  assert step == 3
  _assert_bitwise_equal(state, restored)


# ------------------------------------------------------------- D-PSGD merge

def test_dpsgd_with_the_default_merge_passed_explicitly_is_bitwise_the_default():
  learner, data = _problem()
  graph = build_topology('ring', 6)
  default = _run(dpsgd(learner, nodes=6, topology=graph), data, rounds=3)
  explicit = _run(dpsgd(learner, nodes=6, topology=graph, merge=aggregation.mixing_merge()),
                  data, rounds=3)
  _assert_bitwise_equal(default, explicit)


def test_dpsgd_with_an_identity_merge_is_pure_local_training():
  learner, data = _problem()
  protocol = dpsgd(learner, nodes=6, topology=build_topology('ring', 6),
                   merge=lambda graph, params, alive: params)
  got = _run(protocol, data, rounds=3).nodes.params
  key = jax.random.key(0)
  params = init_params(learner, jax.random.fold_in(key, Stream.INIT), 6)
  opt_state = jax.vmap(learner.tx.init)(params)
  for r in range(3):
    keys = node_keys(key, jnp.int32(r), jnp.arange(6), Stream.BATCH)
    params, opt_state = jax.jit(train_nodes, static_argnums=0)(learner, params, opt_state, keys,
                                                               data)[:2]
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  spread = jax.tree.map(lambda x: float(jnp.std(x, axis=0).max()), got)
  assert min(jax.tree.leaves(spread)) > 0  # the nodes did not average


def test_dpsgd_refuses_a_custom_merge_with_variance_correction():
  learner, _ = _problem()
  from decsim.mixing import VarianceCorrection
  with pytest.raises(ValueError, match='merge'):
    dpsgd(learner, nodes=6, topology=build_topology('ring', 6),
          variance_correction=VarianceCorrection(), merge=lambda g, p, a: p)
