"""Gossip learning: the age-weighted merge's closed form, simultaneous arrivals summed per
receiver == a sequential merge, all-neighbour push + replace == one D-PSGD mixing step,
idle nodes untouched, one compile, and bad flags."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from decsim.network import MODEL
from decsim import experiment, metrics, simulate
from decsim.report import network_report
from decsim.experiment import ExperimentConfig
from decsim.local import make_local_update
from decsim.protocols.base import Protocol
from decsim.protocols.dpsgd import dpsgd
from decsim.protocols.gossip import gossip
from decsim.topology import Topology, build_topology, kregular, metropolis_hastings

BATCH = 8
MOA = 'merge_on_arrival'  # the tick-based merge-on-arrival gossip these tests pin


@functools.lru_cache(maxsize=None)
def _setup(nodes: int):
  """Data and a logistic learner with learning rate 0: training leaves models as merged."""
  c = ExperimentConfig(protocol='gossip', init='independent', topology='complete',
                       num_samples=400, nodes=nodes, model='logistic', partition='iid')
  dataset, data, _ = experiment.load_data(c)
  learner, apply_fn = experiment.make_learner(c, dataset)
  tx = optax.sgd(0.0)
  update = make_local_update(metrics.make_loss_fn(apply_fn), tx, 1, BATCH)
  learner = dataclasses.replace(learner, tx=tx, local_update=update, batch_size=BATCH,
                                independent_init=True, node_chunk=0)
  return learner, data


def _flat(params):
  return np.concatenate([np.asarray(x).reshape(x.shape[0], -1) for x in jax.tree.leaves(params)], 1)


def _start(protocol, data, wake, age=None):
  """Initial state with the nodes in ``wake`` waking at tick 0 and the others never."""
  state = protocol.init(jax.random.key(0), data)
  n = state.sent.shape[0]
  next_wake = jnp.where(jnp.isin(jnp.arange(n), jnp.asarray(wake)), 0, 10**6).astype(jnp.int32)
  extra = state.extra.replace(next_wake=next_wake)
  if age is not None:
    extra = extra.replace(age=jnp.asarray(age, jnp.float32).reshape(n, -1))
  return state.replace(extra=extra)


def _star(n: int) -> Topology:
  """Node 0 linked to every other node; the leaves' only neighbour is node 0."""
  return metropolis_hastings([np.arange(1, n)] + [np.array([0])] * (n - 1))


def test_age_weighted_merge_matches_closed_form():
  learner, data = _setup(2)
  protocol = gossip(learner, nodes=2, peers='random', merge='age', mode=MOA)
  state = _start(protocol, data, wake=[0], age=[3.0, 5.0])  # node 0 pushes to node 1
  w = _flat(state.nodes.params)
  new, m = jax.jit(protocol.round)(state, data)
  got = _flat(new.nodes.params)
  np.testing.assert_allclose(got[1], (3.0 * w[0] + 5.0 * w[1]) / (3.0 + 5.0), rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(got[0], w[0])  # the sender only sends
  # Age: max of the two (Hegedus et al.), plus the samples of one local step.
  np.testing.assert_allclose(np.asarray(new.extra.age)[:, 0], [3.0, 5.0 + BATCH])
  assert int(m.messages[MODEL]) == 1 and int(m.active_nodes) == 1


def _sequential_age_merge(w, t, senders, order):
  acc_w, acc_t = w.copy(), t
  for j in order:
    acc_w = (acc_t * acc_w + senders[j][1] * senders[j][0]) / (acc_t + senders[j][1])
    acc_t = acc_t + senders[j][1]
  return acc_w


@pytest.mark.parametrize('peers', ['neighbour', 'all_neighbours'])
def test_simultaneous_arrivals_equal_sequential_age_merge(peers):
  # Star graph: all leaves wake at once and push to node 0 (segment sum for
  # 'neighbour', neighbour-slot sum for 'all_neighbours'), five arrivals in one tick.
  n = 6
  learner, data = _setup(n)
  protocol = gossip(learner, nodes=n, topology=_star(n), peers=peers, merge='age', mode=MOA)
  ages = np.array([2.0, 1.0, 4.0, 3.0, 7.0, 0.5])
  state = _start(protocol, data, wake=list(range(1, n)), age=ages)
  w = _flat(state.nodes.params)
  got = _flat(jax.jit(protocol.round)(state, data)[0].nodes.params)
  senders = {j: (w[j], ages[j]) for j in range(1, n)}
  rng = np.random.default_rng(0)
  for _ in range(3):  # any arrival order gives the same merge
    ref = _sequential_age_merge(w[0], ages[0], senders, rng.permutation(list(senders)))
    np.testing.assert_allclose(got[0], ref, rtol=2e-5, atol=1e-6)
  np.testing.assert_array_equal(got[1:], w[1:])  # the leaves only sent


def test_half_merge_of_simultaneous_arrivals():
  n = 6
  learner, data = _setup(n)
  protocol = gossip(learner, nodes=n, topology=_star(n), peers='neighbour', merge='half',
                    mode=MOA)
  state = _start(protocol, data, wake=[1, 3, 4])
  w = _flat(state.nodes.params)
  got = _flat(jax.jit(protocol.round)(state, data)[0].nodes.params)
  np.testing.assert_allclose(got[0], 0.5 * w[0] + 0.5 * w[[1, 3, 4]].mean(0), rtol=1e-5,
                             atol=1e-7)
  np.testing.assert_array_equal(got[1:], w[1:])


def test_buffer_mode_merges_once_buffer_size_models_are_held():
  n = 6
  learner, data = _setup(n)
  protocol = gossip(learner, nodes=n, topology=_star(n), peers='neighbour', merge='half',
                    buffer_size=2, mode=MOA)
  state = _start(protocol, data, wake=[1])
  state = state.replace(extra=state.extra.replace(next_wake=state.extra.next_wake.at[2].set(1)))
  w = _flat(state.nodes.params)
  step = jax.jit(protocol.round)
  one, m1 = step(state, data)  # leaf 1 -> node 0: one model held, no merge yet
  np.testing.assert_array_equal(_flat(one.nodes.params), w)
  assert int(m1.active_nodes) == 0 and int(one.extra.buffer.count[0]) == 1
  two, m2 = step(one, data)  # leaf 2 -> node 0: two held, merge both
  np.testing.assert_allclose(_flat(two.nodes.params)[0], 0.5 * w[0] + 0.25 * (w[1] + w[2]),
                             rtol=1e-5, atol=1e-7)
  assert int(m2.active_nodes) == 1 and int(two.extra.buffer.count[0]) == 0


@pytest.mark.parametrize('wake', ['uniform', 'exponential'])
def test_wake_up_intervals(wake):
  n, ticks = 10, 300
  learner, data = _setup(n)
  protocol = gossip(learner, nodes=n, peers='random', merge='half', wake=wake, delta=10, mode=MOA)
  state = protocol.init(jax.random.key(0), data)
  assert np.all((np.asarray(state.extra.next_wake) >= 0) & (np.asarray(state.extra.next_wake) < 10))
  run = jax.jit(lambda s: jax.lax.scan(lambda s, _: (protocol.round(s, data)[0],
                                                     s.extra.next_wake), s, None, length=ticks))
  _, wakes = run(state)  # [ticks, N] next wake-up at the start of each tick
  wakes = np.asarray(wakes)
  gaps = np.concatenate([np.diff(np.unique(wakes[:, i])) for i in range(n)])
  if wake == 'uniform':  # 8..12 ticks for delta = 10, all five values seen
    assert set(gaps.tolist()) == {8, 9, 10, 11, 12}
  else:  # ceil(Exp(10)): mean about 10.5, sd about 10, over ~280 gaps
    assert gaps.min() >= 1 and 8.5 < gaps.mean() < 12.5 and gaps.max() > 20


def test_push_to_all_neighbours_with_replace_is_one_dpsgd_mixing_step():
  n = 10
  learner, data = _setup(n)
  mh = metropolis_hastings(kregular(n, 3, seed=2))
  nb = (mh.weights > 0) & (mh.idx != jnp.arange(n)[:, None])
  graph = mh.replace(weights=nb / jnp.sum(nb, axis=1, keepdims=True))  # mean of neighbours
  gossip_p = gossip(learner, nodes=n, topology=graph, peers='all_neighbours', merge='replace',
                    mode=MOA)
  dpsgd_p = dpsgd(learner, nodes=n, topology=graph, mixing_mode='dense')
  g_new, g_m = jax.jit(gossip_p.round)(_start(gossip_p, data, wake=list(range(n))), data)
  d_new, _ = jax.jit(dpsgd_p.round)(dpsgd_p.init(jax.random.key(0), data), data)
  np.testing.assert_allclose(_flat(g_new.nodes.params), _flat(d_new.nodes.params), rtol=1e-5,
                             atol=1e-7)
  assert int(g_m.messages[MODEL]) == 3 * n  # every node to each of its 3 neighbours


def test_idle_nodes_do_not_change_and_max_active_rows_agree():
  n = 12
  learner, data = _setup(n)
  learner = dataclasses.replace(learner, tx=optax.sgd(0.1), local_update=make_local_update(
      lambda p, x, y: jnp.mean(jax.tree.leaves(p)[0] ** 2) + 0 * jnp.sum(x) + 0 * jnp.sum(y),
      optax.sgd(0.1), 2, BATCH))
  topo = build_topology('kregular', n, degree=3)
  full = gossip(learner, nodes=n, topology=topo, peers='neighbour', merge='half', mode=MOA)
  rows = gossip(learner, nodes=n, topology=topo, peers='neighbour', merge='half', max_active=5,
                mode=MOA)
  state = _start(full, data, wake=[0, 5])  # at most two receivers
  a, ma = jax.jit(full.round)(state, data)
  b, mb = jax.jit(rows.round)(state, data)
  before, after = _flat(state.nodes.params), _flat(a.nodes.params)
  changed = np.any(before != after, axis=1)
  assert 1 <= changed.sum() <= 2 and int(ma.active_nodes) == changed.sum()
  assert int(ma.node_steps) == 2 * changed.sum()
  np.testing.assert_allclose(_flat(b.nodes.params), after, rtol=1e-6)
  assert int(mb.active_nodes) == int(ma.active_nodes) and int(b.extra.dropped) == 0


def test_partitioned_messages_merge_only_their_partition():
  n = 2
  learner, data = _setup(n)
  protocol = gossip(learner, nodes=n, peers='random', merge='age', partitions=3, mode=MOA)
  state = _start(protocol, data, wake=[0], age=np.ones((2, 3)))
  w = _flat(state.nodes.params)
  new, _ = jax.jit(protocol.round)(state, data)
  got = _flat(new.nodes.params)
  moved = got[1] != w[1]
  part = np.arange(w.shape[1]) % 3  # interleaved partitions over the flattened model
  assert len(set(part[moved])) == 1 and moved.sum() >= 0.9 * (part == part[moved][0]).sum()
  np.testing.assert_allclose(got[1][moved], 0.5 * (w[0][moved] + w[1][moved]), rtol=1e-5, atol=1e-7)
  age = np.asarray(new.extra.age)
  assert np.all(age[1] == 1.0 + BATCH)  # every partition trained once


def test_gossip_round_compiles_once(tiny_config):
  config = dataclasses.replace(tiny_config, protocol='gossip', init='independent', rounds=6,
                               eval_every=2, gossip_peers='all_neighbours',
                               variance_correction='received')
  exp = experiment.build(config)
  wrapped = Protocol(exp.protocol.init, chex.assert_max_traces(exp.protocol.round, n=1),
                     exp.protocol.model)
  summary = simulate.run(wrapped, exp.data, exp.evaluate, key=jax.random.key(0), rounds=6,
                         eval_every=2, report=network_report((1, 1, 1)), log=lambda _: None)
  assert summary['rounds'] == 6 and summary['sim_seconds'] == pytest.approx(6.0)


@pytest.mark.parametrize('change,flag', [
    (dict(gossip_merge='average'), '--gossip_merge'),
    (dict(gossip_keep=0.0), '--gossip_keep'),
    (dict(gossip_peers='neighbour', topology='one_peer_exponential'), '--gossip_peers'),
])
def test_bad_gossip_flags(tiny_config, change, flag):
  with pytest.raises(experiment.ConfigError, match=flag) as err:
    experiment.validate(dataclasses.replace(tiny_config, protocol='gossip', init='independent',
                                            **change))
  assert '\n' not in str(err.value)
