"""Local training: vmapped == per-node loop; chunked == vmapped; N=1 FedAvg == plain optax."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from decsim import experiment
from decsim.data.sampler import batch_ids, permutation
from decsim.local import map_nodes
from decsim.protocols.base import train_nodes
from decsim.rng import Stream, node_keys


def _setup(config, n_rows=6):
  exp = experiment.build(config)
  params = jax.vmap(exp.learner.init_params)(jax.random.split(jax.random.key(1), n_rows))
  opt = jax.vmap(exp.learner.tx.init)(params)
  keys = node_keys(jax.random.key(0), 3, jnp.arange(n_rows), Stream.BATCH)
  return exp, params, opt, keys


@pytest.mark.parametrize('model', ['mlp', 'lenet'])
def test_vmapped_update_equals_loop_over_nodes(tiny_config, model):
  config = dataclasses.replace(tiny_config, model=model, optimizer='sgd', momentum=0.9,
                               local_steps=3)
  exp, params, opt, keys = _setup(config)
  rows = jnp.arange(6)
  batched = train_nodes(dataclasses.replace(exp.learner, node_chunk=0), params, opt, keys,
                        exp.data, rows)
  for i in range(6):
    one = exp.learner.local_update(jax.tree.map(lambda p: p[i], params),
                                   jax.tree.map(lambda o: o[i], opt), keys[i], exp.data.x,
                                   exp.data.y, exp.data.idx[i], exp.data.sizes[i])
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(batched.params)):
      np.testing.assert_allclose(a, b[i], rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(one.loss, batched.loss[i], rtol=1e-5)


@pytest.mark.slow
def test_chunked_map_equals_vmap(tiny_config):
  config = dataclasses.replace(tiny_config, model='lenet', local_steps=2)
  exp, params, opt, keys = _setup(config, n_rows=7)
  results = [train_nodes(dataclasses.replace(exp.learner, node_chunk=c), params, opt, keys,
                         exp.data, jnp.arange(7)) for c in (0, 3)]  # 3 does not divide 7
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_map_nodes_with_chunk_larger_than_n():
  fn = map_nodes(lambda a: a * 2, node_chunk=10)
  np.testing.assert_array_equal(fn(jnp.arange(3.0)), jnp.arange(3.0) * 2)


def test_local_epoch_visits_every_sample_once():
  size, max_len, batch = 37, 50, 8
  idx_row = jnp.arange(100, 150)
  order = permutation(jax.random.key(0), jnp.int32(size), max_len)
  ids = jnp.concatenate([batch_ids(order, idx_row, jnp.int32(size), t, batch) for t in range(5)])
  # 5 batches of 8 = 40 draws: the first 37 are a permutation of the node's samples.
  assert sorted(np.asarray(ids[:size]).tolist()) == list(range(100, 100 + size))


def test_local_epochs_scale_steps_with_node_size(tiny_config):
  config = dataclasses.replace(tiny_config, local_epochs=1.0, batch_size=16)
  exp, params, opt, keys = _setup(config)
  result = train_nodes(exp.learner, params, opt, keys, exp.data, jnp.arange(6))
  expected = np.ceil(np.asarray(exp.data.sizes[:6]) / 16)
  np.testing.assert_array_equal(result.steps, expected)


def test_single_node_fedavg_equals_plain_optax(tiny_config):
  """N=1, s=1: a FedAvg round is the node's local SGD from the global model."""
  config = dataclasses.replace(tiny_config, nodes=1, sample_size=1, local_steps=4,
                               optimizer='adam', lr=0.01, partition='iid', rounds=3, eval_every=3)
  exp = experiment.build(config)
  state = exp.protocol.init(jax.random.key(0), exp.data)
  params = exp.protocol.model(state)
  for r in range(3):
    state, _ = jax.jit(exp.protocol.round)(state, exp.data)
    # Plain optax: fresh Adam state each round (FedAvg's stateless clients), same batches.
    key = node_keys(jax.random.key(0), r, jnp.arange(1), Stream.BATCH)[0]
    order = permutation(key, exp.data.sizes[0], exp.data.idx.shape[1])
    opt = exp.learner.tx.init(params)
    loss_fn = experiment.metrics_lib.make_loss_fn(
        lambda p, x: experiment.build_model('mlp', 10).module.apply({'params': p}, x))
    for t in range(4):
      ids = batch_ids(order, exp.data.idx[0], exp.data.sizes[0], t, config.batch_size)
      grads = jax.grad(loss_fn)(params, exp.data.x[ids], exp.data.y[ids])
      updates, opt = exp.learner.tx.update(grads, opt, params)
      params = optax.apply_updates(params, updates)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(exp.protocol.model(state))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('schedule,optimizer', [('cosine', 'sgd'), ('step', 'adam')])
def test_lr_schedule_scales_the_rounds_update_by_its_rate(tiny_config, schedule, optimizer):
  """One local step from the same state: the update of round r with --lr_schedule is the
  constant-rate update times lr(r) / lr, with lr(r) the optax schedule at r (not at the
  optimiser's step count, so every protocol and a resumed run see the same rate)."""
  config = dataclasses.replace(tiny_config, model='logistic', optimizer=optimizer, momentum=0.0,
                               local_steps=1, lr=0.1, rounds=40, lr_schedule=schedule,
                               lr_decay_rounds=10, lr_decay_factor=0.5)
  exp, params, opt, keys = _setup(config)
  constant = experiment.build(dataclasses.replace(config, lr_schedule='constant')).learner
  rate = {'cosine': optax.cosine_decay_schedule(0.1, 10),
          'step': optax.exponential_decay(0.1, 10, 0.5, staircase=True)}[schedule]
  rows = jnp.arange(6)
  base = jax.tree.map(lambda a, b: a - b, train_nodes(constant, params, opt, keys, exp.data,
                                                      rows).params, params)
  for r in (0, 3, 10, 25):
    moved = jax.tree.map(lambda a, b: a - b, train_nodes(exp.learner, params, opt, keys,
                                                         exp.data, rows, r).params, params)
    for m, b in zip(jax.tree.leaves(moved), jax.tree.leaves(base)):
      np.testing.assert_allclose(m, b * float(rate(r)) / 0.1, rtol=2e-4, atol=1e-7)
  with pytest.raises(ValueError, match='pass round_'):
    train_nodes(exp.learner, params, opt, keys, exp.data, rows)


SLOW = pytest.mark.slow  # CI keeps one sampled and one decentralized protocol


@pytest.mark.parametrize('protocol', ['fedavg', 'dpsgd', *(pytest.param(p, marks=SLOW) for p in
                                                            ('scaffold', 'gossip', 'modest',
                                                             'el_oracle'))])
def test_every_protocol_trains_at_the_rounds_rate(tiny_config, protocol):
  """Each protocol passes its round to local training: a decayed run's first round equals
  the constant run's (lr(0) = lr), and a step to zero-ish rate stops the models moving."""
  config = dataclasses.replace(tiny_config, protocol=protocol, nodes=8, sample_size=4, degree=2,
                               model='logistic', optimizer='sgd', momentum=0.0, local_steps=1,
                               el_fanout=2, lr_schedule='step', lr_decay_rounds=1,
                               lr_decay_factor=1e-30)
  exp = experiment.build(config)
  state = jax.jit(exp.protocol.init)(jax.random.key(0), exp.data)
  step = jax.jit(exp.protocol.round)
  first, _ = step(state, exp.data)
  plain = experiment.build(dataclasses.replace(config, lr_schedule='constant'))
  same, _ = jax.jit(plain.protocol.round)(state, plain.data)
  for a, b in zip(jax.tree.leaves(first.nodes.params), jax.tree.leaves(same.nodes.params)):
    np.testing.assert_array_equal(a, b)
  second, _ = step(first, exp.data)
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(exp.protocol.model(second)), jax.tree.leaves(exp.protocol.model(first))))
  assert moved < 1e-6  # round 1 trains at lr * 1e-30; these merges keep the node mean
