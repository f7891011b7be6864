"""MoDeST: hash-ranked samples, equivalence with FedAvg, closed-form bytes, round time by
hand, success fraction, crash handling, and per-node views against the global view."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decsim import churn, experiment, network
from decsim.network import MODEL, PING, VIEW
from decsim.protocols.fedavg import fedavg
from decsim.protocols import modest as modest_lib
from decsim.protocols.modest import hash_ranking, modest


@pytest.fixture(scope='module')
def setup():
  config = experiment.ExperimentConfig(num_samples=2000, nodes=12, model='logistic',
                                       local_steps=2, batch_size=10, momentum=0.0, lr=0.1)
  dataset, data, _ = experiment.load_data(config)
  learner, _ = experiment.make_learner(config, dataset)
  return learner, data


def test_samples_agree_for_equal_views_and_change_with_rounds():
  eligible = jnp.arange(100) % 7 != 0
  a, va = hash_ranking(jax.random.key(3), 5, eligible, 10)
  b, vb = hash_ranking(jax.random.key(3), 5, eligible, 10)
  c, _ = hash_ranking(jax.random.key(3), 6, eligible, 10)
  np.testing.assert_array_equal(a, b)
  assert set(np.asarray(a).tolist()) != set(np.asarray(c).tolist())
  assert np.all(np.asarray(va)) and np.all(np.asarray(eligible)[np.asarray(a)])


def test_samples_are_uniform_in_the_long_run():
  """Chi-square over 2,000 rounds of s=10 among 50 nodes: each node expected 400 times.

  With 49 degrees of freedom the 0.999 quantile is 85.4; sampling without
  replacement only lowers the variance, so the statistic must stay below it.
  """
  eligible = jnp.ones((50,), bool)
  ids = jax.vmap(lambda r: hash_ranking(jax.random.key(0), r, eligible, 10)[0])(jnp.arange(2000))
  counts = np.bincount(np.asarray(ids).ravel(), minlength=50)
  chi2 = np.sum((counts - 400) ** 2 / 400)
  assert chi2 < 85.4


def test_full_sample_modest_equals_fedavg(setup):
  learner, data = setup
  fed = fedavg(learner, nodes=12, sample_size=12, weighting='uniform')
  mod = modest(learner, nodes=12, sample_size=12, aggregators=1, success_fraction=1.0)
  s_fed, s_mod = fed.init(jax.random.key(0), data), mod.init(jax.random.key(0), data)
  for _ in range(3):
    s_fed, _ = jax.jit(fed.round)(s_fed, data)
    s_mod, _ = jax.jit(mod.round)(s_mod, data)
  for a, b in zip(jax.tree.leaves(fed.model(s_fed)), jax.tree.leaves(mod.model(s_mod))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bytes_and_round_time_in_closed_form(setup):
  """Uniform network (latency L, unlimited bandwidth, speed v), no churn, s=4, a=2:
  per round s*a uploads and a*s downloads (one view each); pings: each of the a
  aggregators pings the s nodes of the next sample (a*s, and a*s replies) and each
  participant its a aggregators (s*a, and s*a replies); round time = 2L (the
  aggregators' pings of the sample, s at a time) + L (download) + 20/v (train) + 2L
  (the participants' pings, a at a time) + L (upload)."""
  learner, data = setup
  lat, speed, s, a = 0.03, 100.0, 4, 2
  net = network.uniform_network(12, latency=lat, speed=speed)
  protocol = modest(learner, nodes=12, sample_size=s, aggregators=a, network=net)
  state = protocol.init(jax.random.key(0), data)
  state, m0 = jax.jit(protocol.round)(state, data)
  before = state.sent
  state, m1 = jax.jit(protocol.round)(state, data)
  per_round = np.asarray(state.sent - before).sum(0)
  assert per_round[MODEL] == s * a + a * s and per_round[VIEW] == per_round[MODEL]
  assert per_round[PING] == 4 * s * a
  np.testing.assert_array_equal(m1.messages, per_round)
  expected = 2 * lat + lat + 20 / speed + 2 * lat + lat
  np.testing.assert_allclose([m0.sim_seconds, m1.sim_seconds], expected, rtol=1e-5)


def test_success_fraction_ignores_the_slowest_participant(setup, tmp_path):
  learner, data = setup
  speeds = np.full(12, 100.0)
  speeds[5] = 1.0  # node 5 trains 100x slower
  net = network.uniform_network(12, latency=0.01).replace(speed=jnp.asarray(speeds, jnp.float32))
  protocol = modest(learner, nodes=12, sample_size=12, success_fraction=11 / 12, network=net)
  state, metrics = jax.jit(protocol.round)(protocol.init(jax.random.key(0), data), data)
  # Every participant's trained model; the aggregate is the mean of all but node 5's.
  fast = jnp.asarray([n for n in range(12) if n != 5])
  held = modest_lib.models_held(protocol.init.args[0], state, fast)
  expected = jax.tree.map(lambda p: p.mean(0), held)
  for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(protocol.model(state))):
    np.testing.assert_allclose(e, g, rtol=1e-5, atol=1e-6)
  assert float(metrics.sim_seconds) < 1.0  # did not wait the 20 s of node 5


def test_crashed_candidates_cost_a_ping_timeout_and_leave_the_view(setup):
  learner, data = setup
  protocol = modest(learner, nodes=12, sample_size=4, ping_timeout=2.0, inactivity_threshold=50,
                    mark_down=True, network=network.uniform_network(12, latency=0.01))
  state = protocol.init(jax.random.key(0), data)
  state, _ = jax.jit(protocol.round)(state, data)
  down = jnp.zeros((12,), bool).at[jnp.arange(0, 12, 2)].set(True)  # half the nodes crash
  state = state.replace(available=~down)
  seconds, live = [], []
  for _ in range(6):
    state, m = jax.jit(protocol.round)(state, data)
    seconds.append(float(m.sim_seconds))
    live.append(int(m.active_nodes))
  # With --mark_down, probes that time out mark the node down at once: later samples
  # avoid crashed nodes long before the 50-round inactivity threshold, so rounds get
  # fast again.
  assert max(seconds) >= 2.0 and seconds[-1] < 1.0
  assert live[-1] == 4
  assert np.all(np.isfinite(seconds))


@pytest.mark.parametrize('views', ['global', 'local'])
def test_modest_keeps_learning_when_most_nodes_crash(setup, views):
  learner, data = setup
  config = churn.ChurnConfig(crash_start_seconds=1.0, crash_every_seconds=1.0, crash_batch=3,
                             crash_fraction=0.75)
  avail = churn.make_availability(config, 12, seed=0)
  protocol = churn.with_churn(
      modest(learner, nodes=12, sample_size=4, success_fraction=0.5, ping_timeout=0.5,
             inactivity_threshold=5, views=views,
             network=network.uniform_network(12, latency=0.01), availability=avail), avail)
  state = protocol.init(jax.random.key(0), data)
  chunk = jax.jit(lambda s: jax.lax.scan(lambda st, _: protocol.round(st, data), s, None,
                                         length=40))
  state, metrics = chunk(state)
  assert int(jnp.sum(state.available)) == 3  # 75% of 12 are down
  assert np.all(np.asarray(metrics.active_nodes[-10:]) >= 2)  # samples found the live nodes
  assert np.all(np.isfinite(np.asarray(metrics.train_loss)))


def test_variance_correction_at_the_aggregator(setup):
  """With the 'received' target, each layer of the aggregate has exactly the mean
  variance of the models it averaged (Tian et al. 2024), and keeps its mean."""
  from decsim import mixing
  learner, data = setup
  vc = mixing.VarianceCorrection(target='received')
  plain = modest(learner, nodes=12, sample_size=6)
  corrected = modest(learner, nodes=12, sample_size=6, variance_correction=vc)
  s_plain, _ = jax.jit(plain.round)(plain.init(jax.random.key(0), data), data)
  s_vc, _ = jax.jit(corrected.round)(corrected.init(jax.random.key(0), data), data)
  sample, _ = hash_ranking(jax.random.key(0), 0, jnp.ones((12,), bool), 6)
  trained = modest_lib.models_held(corrected.init.args[0], s_vc, sample)  # the 6 trained models
  kernel = lambda tree: tree['Dense_0']['kernel']
  target = float(jnp.mean(jax.vmap(jnp.var)(kernel(trained))))
  np.testing.assert_allclose(jnp.var(kernel(corrected.model(s_vc))), target, rtol=1e-4)
  np.testing.assert_allclose(jnp.mean(kernel(corrected.model(s_vc))),
                             jnp.mean(kernel(plain.model(s_plain))), atol=1e-6)


def _scan(protocol, data, rounds, state=None):
  state = protocol.init(jax.random.key(0), data) if state is None else state
  return jax.jit(lambda st: jax.lax.scan(lambda x, _: protocol.round(x, data), st, None,
                                         length=rounds))(state)


def test_local_views_agree_with_the_global_view_without_churn(setup):
  """Per-node views, merged on every transfer plus heartbeats, keep every healthy node
  active even with a 2-round inactivity threshold (4 of 12 nodes sampled per round),
  so samples, aggregators, models, clock and model/view messages equal the global
  view's; only the heartbeats differ: (N - s) * a minus the aggregators outside the
  sample, per round."""
  learner, data = setup
  n, s, a, rounds = 12, 4, 2, 15
  net = network.make_network(network.NetworkConfig(sites=4), n, seed=0)
  build = lambda views: modest(learner, nodes=n, sample_size=s, aggregators=a,
                               inactivity_threshold=2, views=views, network=net)
  (g_state, g_m), (l_state, l_m) = (_scan(build(v), data, rounds) for v in ('global', 'local'))
  for x, y in zip(jax.tree.leaves(build('global').model(g_state)),
                  jax.tree.leaves(build('local').model(l_state))):
    np.testing.assert_array_equal(x, y)
  np.testing.assert_array_equal(g_state.extra.agg_ids, l_state.extra.agg_ids)
  np.testing.assert_array_equal(g_m.sim_seconds, l_m.sim_seconds)
  np.testing.assert_array_equal(g_m.messages[:, :PING], l_m.messages[:, :PING])
  all_active = jnp.ones((n,), bool)
  samples = [set(np.asarray(hash_ranking(jax.random.key(0), r, all_active, s)[0]).tolist())
             for r in range(rounds + 1)]
  outside = [len(samples[r + 1] - samples[r]) for r in range(rounds)]  # aggregators not in S_r
  beats = np.asarray(l_m.messages[:, PING] - g_m.messages[:, PING])
  # aggregators (first a of S_{r+1}, no churn) that are not participants send a - 1 beats
  first_a = [set(np.asarray(hash_ranking(jax.random.key(0), r + 1, all_active, a)[0]).tolist())
             for r in range(rounds)]
  expected = [(n - s) * a - len(first_a[r] - samples[r]) for r in range(rounds)]
  np.testing.assert_array_equal(beats, expected)
  assert max(outside) > 0  # the aggregator term was exercised
  views = l_state.extra.views
  assert views.seen.shape == (n, n)
  leader = l_state.extra.agg_ids[0]
  assert bool(jnp.all(modest_lib.active_in(views, leader, rounds, 2)))


def test_local_views_drop_a_crashed_node_and_its_view_freezes(setup):
  """Node 3 crashes: participants that ping it mark it down in their own views, the
  mark reaches the aggregators with their models, and without such a ping the
  missing heartbeats age it out after the threshold. Its own row no longer changes."""
  learner, data = setup
  n, s, thr = 12, 4, 3
  protocol = modest(learner, nodes=n, sample_size=s, inactivity_threshold=thr, ping_timeout=5.0,
                    views='local', network=network.uniform_network(n, latency=0.01))
  state, _ = _scan(protocol, data, 2)
  state = state.replace(available=jnp.ones((n,), bool).at[3].set(False))
  frozen = jax.tree.map(lambda f: f[3], state.extra.views)
  state, m = _scan(protocol, data, 12, state)
  for x, y in zip(jax.tree.leaves(frozen), jax.tree.leaves(jax.tree.map(lambda f: f[3],
                                                                        state.extra.views))):
    np.testing.assert_array_equal(x, y)
  leader = state.extra.agg_ids[jnp.argmin(state.extra.agg_done)]
  active = modest_lib.active_in(state.extra.views, leader, state.round, thr)
  assert not bool(active[3]) and int(active.sum()) == n - 1
  tail = slice(thr + 2, None)
  assert np.all(np.asarray(m.active_nodes[tail]) == s)  # node 3 no longer sampled
  assert np.all(np.asarray(m.sim_seconds[tail]) < 5.0)  # nor probed


@pytest.mark.parametrize('views', ['global', 'local'])
def test_joined_nodes_enter_the_samples(setup, views):
  """4 of 12 nodes start offline and join one per simulated second: none takes part
  before it joins; all four train afterwards (their heartbeats or, in the global
  view, the membership record announce them)."""
  learner, data = setup
  avail = churn.make_availability(
      churn.ChurnConfig(join_nodes=4, join_start_seconds=1.0, join_every_seconds=1.0), 12, seed=0)
  protocol = churn.with_churn(
      modest(learner, nodes=12, sample_size=4, views=views,
             network=network.uniform_network(12, latency=0.01), availability=avail), avail)
  joiners = np.flatnonzero(~np.asarray(avail(jax.random.key(0), 0, jnp.float32(0)).member))
  assert len(joiners) == 4
  state, _ = _scan(protocol, data, 3)
  assert float(state.clock) < 1.0 and np.all(np.asarray(state.sent)[joiners] == 0)
  state, _ = _scan(protocol, data, 150, state)
  assert float(state.clock) > 6.0
  assert np.all(np.asarray(state.sent)[joiners, MODEL] > 0)


def test_a_participant_whose_view_disagrees_loses_its_model(setup):
  """Local views: one participant believes the next sample's first node is down, so
  it sends its model to another node. The round's aggregator (chosen by the first
  live participant) averages the other three, waits one ping timeout for the
  missing model (sf = 1), and the stray upload is still counted."""
  learner, data = setup
  n, s, timeout = 12, 4, 3.0
  protocol = modest(learner, nodes=n, sample_size=s, ping_timeout=timeout, views='local',
                    network=network.uniform_network(n, latency=0.01))
  state, _ = jax.jit(protocol.round)(protocol.init(jax.random.key(0), data), data)
  r, everyone = int(state.round), jnp.ones((n,), bool)
  sample = np.asarray(hash_ranking(jax.random.key(0), r, everyone, s)[0])
  first_candidate = int(hash_ranking(jax.random.key(0), r + 1, everyone, 1)[0][0])
  stray = next(int(p) for p in sample[1:] if p != first_candidate)
  views = state.extra.views
  state = state.replace(extra=state.extra.replace(
      views=views.replace(down=views.down.at[stray, first_candidate].set(r + 100))))
  state, m = jax.jit(protocol.round)(state, data)
  assert int(state.extra.agg_ids[0]) == first_candidate
  kept = [int(p) for p in sample if p != stray]
  held = modest_lib.models_held(protocol.init.args[0], state, jnp.asarray(kept))
  expected = jax.tree.map(lambda p: p.mean(0), held)
  for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(protocol.model(state))):
    np.testing.assert_allclose(e, g, rtol=1e-5, atol=1e-6)
  assert float(m.sim_seconds) >= timeout
  assert int(m.messages[MODEL]) == s + s  # every upload counted, plus the s downloads


def test_the_sample_is_the_first_s_nodes_that_answer(tmp_path):
  """Half of 100 nodes offline, s = 10: every round trains 10 nodes, the first 10 online
  nodes of the hash ranking; the dead ones ranked before them cost the aggregator's
  timeouts (pings 10 at a time), and stay in the view (no down marks by default)."""
  config = experiment.ExperimentConfig(protocol='modest', num_samples=2000, nodes=100,
                                       sample_size=10, model='logistic', local_steps=1,
                                       ping_timeout=5.0)
  exp = experiment.build(config)
  state = jax.jit(exp.protocol.init)(jax.random.key(0), exp.data)
  online = jnp.asarray(np.random.default_rng(0).random(100) < 0.5)
  step = jax.jit(exp.protocol.round)
  for _ in range(4):
    r = state.round
    ranked = np.asarray(hash_ranking(jax.random.key(0), r, jnp.ones(100, bool), 100)[0])
    first_live = [i for i in ranked if online[i]][:10]
    state, metrics = step(state.replace(available=online), exp.data)
    assert int(metrics.active_nodes) == 10
    assert set(np.asarray(state.extra.participants).tolist()) == set(first_live)
    last = list(ranked).index(first_live[-1])  # rank of the 10th live node
    assert float(metrics.sim_seconds) >= 5.0 * (last // 10 + 1) - 1e-3  # a timeout per batch
  assert np.all(np.asarray(state.extra.views.down) == modest_lib.NEVER)


def test_independent_stream_draws_other_samples_than_fedavg():
  """--modest_stream=shared ranks with FedAvg's sampling stream (the same clients without
  churn); independent ranks with its own."""
  everyone = jnp.ones(50, bool)
  shared = hash_ranking(jax.random.key(1), 3, everyone, 5)[0]
  own = hash_ranking(jax.random.key(1), 3, everyone, 5, modest_lib.Stream.MODEST)[0]
  fedavg_ids = jax.lax.top_k(jax.random.uniform(
      modest_lib.round_key(jax.random.key(1), 3, modest_lib.Stream.SAMPLE), (50,)), 5)[1]
  np.testing.assert_array_equal(shared, fedavg_ids)
  assert set(np.asarray(own).tolist()) != set(np.asarray(shared).tolist())


@pytest.mark.parametrize('protocol', ['modest', 'dpsgd',
                                      pytest.param('fedavg', marks=pytest.mark.slow)])
def test_rows_report_the_mean_participants_per_round(tmp_path, protocol):
  """``participants`` = nodes that trained, the mean over the row's rounds: s for FedAvg
  and MoDeST with everyone online, N for D-PSGD; null at round 0."""
  config = experiment.ExperimentConfig(protocol=protocol, num_samples=2000, nodes=12,
                                       sample_size=4, degree=2, model='logistic', rounds=4,
                                       eval_every=2, local_steps=1, eval_nodes=2)
  experiment.run(config, out_dir=tmp_path / 'run', log=lambda _: None)
  rows = [json.loads(l) for l in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert [r['participants'] for r in rows] == [None] + [12.0 if protocol == 'dpsgd' else 4.0] * 2
