"""Gossip with DFL2's semantics on the simulated network (issue 14): the merge count per SGD
step equals its closed form for the buffer size, the correction target excludes the own model,
and a message lands in the tick its compute, latency and bandwidth put it in."""

import dataclasses
import functools
import math

import jax
import numpy as np
import optax
import pytest

from decsim import experiment, metrics, mixing
from decsim.experiment import ExperimentConfig
from decsim.local import make_local_update
from decsim.network import uniform_network
from decsim.protocols.gossip import gossip
from decsim.topology import build_topology

BATCH = 8


@functools.lru_cache(maxsize=None)
def _setup(nodes: int, lr: float = 0.0):
  """Data and a logistic learner (learning rate 0: training leaves models as they are)."""
  c = ExperimentConfig(protocol='gossip', init='independent', topology='ring',
                       num_samples=200, nodes=nodes, model='logistic', partition='iid')
  dataset, data, _ = experiment.load_data(c)
  learner, apply_fn = experiment.make_learner(c, dataset)
  tx = optax.sgd(lr)
  update = make_local_update(metrics.make_loss_fn(apply_fn), tx, 1, BATCH)
  learner = dataclasses.replace(learner, tx=tx, local_update=update, batch_size=BATCH,
                                independent_init=True, node_chunk=0)
  return learner, data


def _ring(n: int):
  return build_topology('ring', n, seed=0)


def _flat(params):
  return np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in jax.tree.leaves(params)], 1)


def _run(protocol, data, ticks: int):
  state = protocol.init(jax.random.key(0), data)
  step = jax.jit(protocol.round)
  history = []
  for _ in range(ticks):
    state, m = step(state, data)
    history.append((state, m))
  return history


@pytest.mark.parametrize('buffer_size', [pytest.param(1, marks=pytest.mark.slow),
                                         pytest.param(2, marks=pytest.mark.slow), 3,
                                         pytest.param(5, marks=pytest.mark.slow)])
def test_merges_per_sgd_step_equal_the_closed_form(buffer_size):
  """Ring of degree k=2, every node on the same fixed interval: each training step brings
  k models to every node at once, so a node merges every ceil(b / k) steps."""
  n, ticks = 6, 6
  learner, data = _setup(n)
  protocol = gossip(learner, nodes=n, topology=_ring(n), peers='all_neighbours', wake='fixed',
                    period_seconds=1.0, tick_seconds=1.0, buffer_size=buffer_size,
                    network=uniform_network(n, latency=0.05, speed=1000.0))
  state, _ = _run(protocol, data, ticks)[-1]
  steps = n * ticks  # every node trains once per tick
  merges = int(state.extra.merges)
  assert merges / steps == pytest.approx(1.0 / math.ceil(buffer_size / 2))
  assert int(state.sent.sum()) == 2 * steps  # one push to each of the two neighbours


def test_merge_and_correction_target_exclude_the_own_model():
  """One tick with buffer 2 on a ring: w_i <- 0.5 w_i + 0.5 mean(w_{i-1}, w_{i+1}), then every
  layer rescaled to the mean variance of the two received models (DFL2's ``others``)."""
  n = 5
  learner, data = _setup(n)
  kw = dict(nodes=n, topology=_ring(n), peers='all_neighbours', wake='fixed', period_seconds=1.0,
            network=uniform_network(n, latency=0.0, speed=1e6))
  plain = gossip(learner, **kw)
  vc = mixing.VarianceCorrection()
  corrected = gossip(learner, variance_correction=vc, **kw)
  start = plain.init(jax.random.key(0), data)
  w = _flat(start.nodes.params)
  nb = np.stack([(np.arange(n) - 1) % n, (np.arange(n) + 1) % n], 1)  # [N, 2]
  got = _flat(jax.jit(plain.round)(start, data)[0].nodes.params)
  np.testing.assert_allclose(got, 0.5 * w + 0.5 * w[nb].mean(1), rtol=1e-5, atol=1e-6)
  new = jax.jit(corrected.round)(start, data)[0].nodes.params
  var0 = mixing.layer_variance(start.nodes.params)
  var1 = mixing.layer_variance(new)
  mask = mixing.correctable(jax.tree.map(lambda x: x[0], new))
  for v0, v1, corrected_leaf in zip(jax.tree.leaves(var0), jax.tree.leaves(var1),
                                    jax.tree.leaves(mask)):
    v0, v1 = np.asarray(v0), np.asarray(v1)
    if corrected_leaf:
      np.testing.assert_allclose(v1, v0[nb].mean(1), rtol=1e-4)  # own excluded
      assert not np.allclose(v1, (v0 + v0[nb].sum(1)) / 3, rtol=1e-3)


def _first_merge_tick(**net) -> int:
  """Two nodes wake once at second 0, train 8 samples and push to each other (buffer 1):
  the tick in which they merge."""
  n = 2
  learner, data = _setup(n)
  protocol = gossip(learner, nodes=n, peers='random', wake='fixed', period_seconds=1000.0,
                    buffer_size=1, tick_seconds=1.0, network=uniform_network(n, **net))
  merges = [int(s.extra.merges) for s, _ in _run(protocol, data, 8)]
  return merges.index(2)


def _base_network() -> dict:
  nbytes = _setup(2)[0].model_bytes()
  return dict(latency=0.5, bandwidth=float(nbytes), speed=8.0)


def test_arrival_takes_compute_latency_and_transfer_time():
  """8 samples at 8/s (1 s), then 0.5 s latency and B bytes at B/s (1 s): the models land at
  2.5 s, in tick 2."""
  assert _first_merge_tick(**_base_network()) == 2


@pytest.mark.slow
def test_slower_compute_latency_or_bandwidth_delay_the_arrival():
  """Each of the three, made slower, moves the merge of the previous test to a later tick."""
  base = _base_network()
  nbytes = base['bandwidth']
  assert _first_merge_tick(**{**base, 'latency': 2.0}) == 4  # 1 + 2 + 1 s
  assert _first_merge_tick(**{**base, 'bandwidth': nbytes / 3.0}) == 4  # 1 + 0.5 + 3 s
  assert _first_merge_tick(**{**base, 'speed': 2.0}) == 5  # 4 + 0.5 + 1 s


@pytest.mark.slow
def test_network_changes_accuracy_and_bytes_over_seconds():
  """Training runs (learning rate 0.1) whose network differs: slower compute sends fewer
  models by the same simulated second, and a slow link delays merges; both change the models."""
  n, ticks = 6, 12
  learner, data = _setup(n, lr=0.1)

  def final(**net):
    protocol = gossip(learner, nodes=n, topology=_ring(n), peers='all_neighbours',
                      period_seconds=2.0, network=uniform_network(n, **net))
    state, _ = _run(protocol, data, ticks)[-1]
    return state

  fast = final(latency=0.01, speed=1000.0)
  slow_cpu = final(latency=0.01, speed=2.0)  # 4 s per 8-sample step > the 2 s period
  slow_net = final(latency=3.0, speed=1000.0)
  assert int(slow_cpu.sent.sum()) < int(fast.sent.sum())
  assert int(slow_net.extra.merges) < int(fast.extra.merges)
  for other in (slow_cpu, slow_net):
    assert not np.allclose(_flat(other.nodes.params), _flat(fast.nodes.params))
