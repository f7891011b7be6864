"""MoDeST with failures inside rounds: crash times in simulated seconds, an aggregator
that crashes before delivering, and the participants' re-forwarding after a failed
round (``decsim.protocols.modest``, module docstring)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest

from decsim import churn, network
from decsim.network import MODEL
from decsim.protocols import modest as modest_lib
from decsim.protocols.modest import modest

NODES, S, TIMEOUT = 12, 4, 30.0
NET = network.uniform_network(NODES, latency=0.01, speed=100.0)  # training: 0.2 s


@pytest.fixture(scope='module')
def setup():
  return conftest.small_learner(num_samples=1000, nodes=NODES, momentum=0.0)[:2]


def crash_at(times: np.ndarray):
  """An availability function: node n is up until ``times[n]`` (simulated seconds)."""
  crash_time = jnp.asarray(times, jnp.float32)

  def availability(key, round_, clock):
    del key, round_
    up = clock < crash_time
    return churn.Availability(online=up, member=jnp.ones_like(up), crash_time=crash_time)

  return availability


def run(learner, data, aggregators, times, rounds=2):
  """``rounds`` rounds with crash times ``times [N]``; returns (states after each, metrics)."""
  avail = crash_at(times)
  protocol = churn.with_churn(
      modest(learner, nodes=NODES, sample_size=S, aggregators=aggregators, ping_timeout=1.0,
             reforward_timeout=TIMEOUT, network=NET,
             availability=avail), avail)
  state = protocol.init(jax.random.key(0), data)
  step = jax.jit(chex.assert_max_traces(protocol.round, n=1))  # a round compiles once
  states, metrics = [], []
  for _ in range(rounds):
    state, m = step(state, data)
    states.append(state)
    metrics.append(m)
  return states, metrics


def crash_one_aggregator(learner, data, aggregators, healthy):
  """From a run without crashes (``healthy``: states, metrics), round 0's first aggregator
  and when its aggregate is ready; runs again with that node crashing just before: it has
  received the models but never aggregates or delivers. Returns (the node, states,
  metrics)."""
  node = int(healthy[0][0].extra.agg_ids[0])
  times = np.full(NODES, np.inf)
  times[node] = float(healthy[0][0].extra.agg_done[0]) - 1e-3
  states, metrics = run(learner, data, aggregators, times)
  return node, states, metrics


@pytest.fixture(scope='module')
def healthy_one(setup):
  return run(*setup, 1, np.full(NODES, np.inf), rounds=1)


@pytest.fixture(scope='module')
def three(setup):
  return crash_one_aggregator(*setup, 3, run(*setup, 3, np.full(NODES, np.inf), rounds=1))


@pytest.fixture(scope='module')
def one(setup, healthy_one):
  return crash_one_aggregator(*setup, 1, healthy_one)


def test_with_three_aggregators_one_crash_costs_nothing(three):
  node, states, metrics = three
  done = np.asarray(states[0].extra.agg_done)
  ids = np.asarray(states[0].extra.agg_ids)
  assert np.isinf(done[ids == node]).all()  # its aggregate is lost ...
  assert np.isfinite(done).sum() == 2  # ... the two others hold theirs
  assert int(metrics[1].active_nodes) >= S - 1  # round 1 trains (the crashed node may be sampled)
  assert float(metrics[1].sim_seconds) < TIMEOUT  # nobody waited for an acknowledgement
  assert int(metrics[1].messages[MODEL]) > 0


def test_with_one_aggregator_the_round_fails_and_its_participants_re_forward(one, setup):
  node, states, metrics = one
  assert np.isinf(np.asarray(states[0].extra.agg_done)).all()  # the only aggregate is lost
  assert np.isfinite(float(states[0].clock))
  assert float(metrics[1].sim_seconds) >= TIMEOUT  # the participants waited, then re-forwarded
  # Round 1 went on from their models (the crashed node, still up when round 1's sample
  # was searched, may be in it and cannot train).
  trained = int(metrics[1].active_nodes)
  assert trained >= S - 1
  # a = 1: each trained participant downloads and uploads one model; the round-0
  # participants still up re-forwarded theirs on top.
  up = len(set(np.asarray(states[0].extra.participants).tolist()) - {node, NODES})
  assert int(metrics[1].messages[MODEL]) == 2 * trained + up
  assert node not in np.asarray(states[1].extra.participants).tolist()


def test_re_forwarded_aggregate_is_the_mean_of_the_live_participants_models(setup, one):
  """With sf = 1 round 0's aggregate is the mean of its participants' trained models (node
  rows); after the aggregator's crash, ``reforward`` rebuilds the mean of those still
  up, held by the first live node of the sample, ready a timeout after the last send."""
  learner, _ = setup
  node, states, _ = one
  state = states[0]
  part = np.asarray(state.extra.participants)
  times = np.full(NODES, np.inf)
  times[node] = float(state.extra.sent_at)  # down by now (it crashed before aggregating)
  net = NET
  protocol = modest(learner, nodes=NODES, sample_size=S, ping_timeout=1.0,
                    reforward_timeout=TIMEOUT, network=net)
  settings = protocol.init.args[0]  # the run's static ModestSettings
  sample = jnp.asarray([7, 3, 9, 1], jnp.int32)
  live = jnp.asarray([False, True, True, True])
  reforward = jax.jit(functools.partial(modest_lib.reforward, settings, net, modest_lib.aggregate))
  recovered, senders = reforward(
      state.replace(available=jnp.asarray(times > 1e9)),
      jnp.asarray(np.where(np.arange(NODES) == node, 0.0, np.inf), jnp.float32), sample, live)
  up = part[part != node]
  assert int(jnp.sum(senders)) == len(up)
  held = modest_lib.models_held(settings, state, jnp.asarray(up))
  mean_up = jax.tree.map(lambda p: p.mean(0), held)
  for e, g in zip(jax.tree.leaves(mean_up), jax.tree.leaves(recovered.agg_params)):
    np.testing.assert_allclose(e, g[0], rtol=1e-5, atol=1e-6)
  assert int(recovered.agg_ids[0]) == 3  # the first live node of the sample
  assert float(recovered.agg_done[0]) >= float(state.extra.sent_at) + TIMEOUT


@pytest.mark.slow
def test_a_participant_that_crashes_while_training_sends_nothing(setup, healthy_one):
  """sf = 1, no crash: every aggregator gets S models. One participant crashes in the
  middle of its training: the aggregator gets S - 1, waits a ping timeout in vain, and the
  crashed node does not count as trained."""
  learner, data = setup
  healthy, hm = healthy_one
  victim = int(np.asarray(healthy[0].extra.participants)[0])
  times = np.full(NODES, np.inf)
  times[victim] = 0.1  # training: 0.03 s to 0.23 s (2 steps x 10 samples at 100/s)
  states, metrics = run(learner, data, 1, times, rounds=1)
  assert int(metrics[0].active_nodes) == S - 1 == int(hm[0].active_nodes) - 1
  assert victim not in np.asarray(states[0].extra.participants).tolist()
  assert float(metrics[0].sim_seconds) >= float(hm[0].sim_seconds) + 1.0 - 1e-3


def test_crash_times_match_the_crash_schedule():
  config = churn.ChurnConfig(crash_start_seconds=300.0, crash_every_seconds=60.0,
                             crash_batch=5, crash_fraction=0.8)
  avail = churn.make_availability(config, 100, seed=3)
  crash_time = np.asarray(avail(jax.random.key(0), 0, jnp.float32(0)).crash_time)
  assert np.isinf(crash_time).sum() == 20
  clocks = np.concatenate([np.arange(0, 1500, 7.3), 300.0 + 60.0 * np.arange(17)])
  online = jax.jit(jax.vmap(lambda t: avail(jax.random.key(0), 0, t).online))(
      jnp.asarray(clocks, jnp.float32))  # [clocks, N]
  np.testing.assert_array_equal(online, clocks[:, None] < crash_time[None, :])
