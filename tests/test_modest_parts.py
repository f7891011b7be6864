"""The pieces of a MoDeST round on tiny arrays: hash ranking, view merges, probing with
timeouts, arrival-order collection, the aggregation rule and membership of views."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decsim.network import uniform_network
from decsim.protocols import modest as m

N = 6


def _views(rng, rows=2):
  ints = lambda: jnp.asarray(rng.integers(-5, 20, (rows, N)), jnp.int32)
  return m.Views(seen=ints(), down=ints(), joins=ints())


@pytest.mark.parametrize('seed', range(3))
def test_hash_ranking_is_a_permutation_of_the_eligible_nodes(seed):
  eligible = jnp.array([True, False, True, True, False, True])
  ids, valid = m.hash_ranking(jax.random.key(seed), jnp.int32(4), eligible, N)
  ids, valid = np.asarray(ids), np.asarray(valid)
  assert sorted(ids[valid]) == [0, 2, 3, 5]
  assert valid.sum() == 4 and np.all(valid[:4])  # eligible nodes first, then invalid slots
  # A shorter ranking is its prefix: every node with the same view agrees on it.
  short, _ = m.hash_ranking(jax.random.key(seed), jnp.int32(4), eligible, 2)
  np.testing.assert_array_equal(short, ids[:2])


def test_view_merge_is_elementwise_max_commutative_and_idempotent():
  rng = np.random.default_rng(0)
  a, b = _views(rng), _views(rng)
  ab, ba = m.merge_views(a, b), m.merge_views(b, a)
  for f in ('seen', 'down', 'joins'):
    np.testing.assert_array_equal(getattr(ab, f), np.maximum(getattr(a, f), getattr(b, f)))
    np.testing.assert_array_equal(getattr(ab, f), getattr(ba, f))
    np.testing.assert_array_equal(getattr(m.merge_views(ab, b), f), getattr(ab, f))
    np.testing.assert_array_equal(getattr(m.merge_views(a, a), f), getattr(a, f))


def test_active_in_needs_membership_recent_sighting_and_no_later_timeout():
  views = m.Views(seen=jnp.array([[10, 10, 10, 2, 10, 10]]),
                  down=jnp.array([[m.NEVER, 11, 9, m.NEVER, m.NEVER, 10]]),
                  joins=jnp.array([[1, 1, 1, 1, 2, 3]]))
  active = m.active_in(views, 0, jnp.int32(12), 5)
  np.testing.assert_array_equal(active, [True, False, True, False, False, False])


def test_views_of_lets_an_online_node_know_itself():
  rng = np.random.default_rng(1)
  vw = _views(rng, rows=N)
  counter = jnp.arange(N, dtype=jnp.int32) + 100
  online = jnp.array([True, False, True, True, True, True])
  out = m.views_of(vw, jnp.array([0, 1]), online, counter, jnp.int32(50))
  assert out.seen[0, 0] == 50 and out.joins[0, 0] == 100  # node 0 online: knows itself
  assert out.seen[1, 1] == vw.seen[1, 1] and out.joins[1, 1] == vw.joins[1, 1]  # offline
  np.testing.assert_array_equal(out.down, vw.down[jnp.array([0, 1])])


def _probe_all_offline():
  cand = jnp.array([[1, 2, 3], [2, 3, 1]])
  valid = jnp.array([[True, True, True], [True, True, False]])
  out = m.probe(cand, valid, jnp.array([0, 4]), jnp.zeros(N, bool)[cand], uniform_network(N),
                aggregators=2, ping_timeout=2.5)
  return valid, out


def test_probe_with_every_candidate_offline_finds_no_aggregator():
  _, (_, chosen_ok, _, responsive, _) = _probe_all_offline()
  assert not np.any(responsive) and not np.any(chosen_ok)


def test_probe_with_every_candidate_offline_charges_the_timeouts():
  """Was an under-count: probing stopped at the last responsive candidate, so with none
  answering no candidate was pinged or charged its timeout."""
  valid, (_, _, probed, _, seconds) = _probe_all_offline()
  np.testing.assert_array_equal(probed, valid)  # every valid candidate pinged
  np.testing.assert_allclose(seconds, [2 * 2.5, 1 * 2.5])  # batches of a = 2 pings


def test_probe_stops_at_the_first_responsive_candidates():
  network = uniform_network(N, latency=0.1)
  online = jnp.array([True, False, True, False, True, True])
  cand = jnp.array([[1, 2, 3, 4, 5]])
  chosen, chosen_ok, probed, _, seconds = m.probe(cand, jnp.ones((1, 5), bool), jnp.array([0]),
                                                   online[cand], network, aggregators=2,
                                                   ping_timeout=2.0)
  np.testing.assert_array_equal(chosen[0], [2, 4])
  assert np.all(chosen_ok)
  np.testing.assert_array_equal(probed[0], [True, True, True, True, False])
  # pings go a = 2 at a time: {1, 2} and {3, 4}, each batch waits for its timed-out ping
  np.testing.assert_allclose(seconds, [2 * 2.0], rtol=1e-6)


def test_aggregate_is_the_mean_of_the_models_received():
  models = {'w': jnp.arange(12.0).reshape(4, 3), 'b': jnp.array([1.0, 2.0, 4.0, 8.0])}
  out = m.aggregate(models, jnp.array([1.0, 0.0, 1.0, 1.0]))
  np.testing.assert_allclose(out['w'], np.asarray(models['w'])[[0, 2, 3]].mean(0), rtol=1e-6)
  np.testing.assert_allclose(out['b'], (1 + 4 + 8) / 3, rtol=1e-6)
  zero = m.aggregate(models, jnp.zeros(4))
  assert not np.any(zero['w']) and not np.any(zero['b'])
  # Boolean "received" flags work as 0/1 weights; weights are relative.
  flags = m.aggregate(models, jnp.array([True, False, True, True]))
  np.testing.assert_allclose(flags['w'], out['w'], rtol=1e-6)
  np.testing.assert_allclose(m.aggregate(models, jnp.array([2.0, 0.0, 2.0, 2.0]))['w'], out['w'],
                             rtol=1e-6)


def test_collect_takes_the_first_arrivals_and_waits_in_vain_for_missing_ones():
  settings = m.ModestSettings(nodes=N, sample_size=3, aggregators=2, wait_for=2, candidates=N,
                              search=N, ping_timeout=2.0, inactivity_threshold=5, local=False,
                              model_bytes=0, mark_down=False, stream=m.Stream.SAMPLE)
  network = uniform_network(N, latency=0.5)
  sends = jnp.array([[True, True], [True, False], [True, False]])
  plan = m.RoundPlan(sample=jnp.array([0, 1, 2]), live=jnp.ones(3, bool), search=None,
                     cand=None, probed=None, responsive=None, chosen_ok=sends,
                     agg_ids=jnp.array([4, 5]),
                     agg_valid=jnp.ones(2, bool), sends=sends, part_vw=None)
  sent_at = jnp.array([3.0, 1.0, 2.0])
  take, done, n_sent = m.collect(settings, network, plan, sent_at, jnp.full(N, jnp.inf))
  np.testing.assert_array_equal(take, [[False, True], [True, False], [True, False]])
  np.testing.assert_array_equal(n_sent, [3, 1])
  np.testing.assert_allclose(done, [2.5, 3.5 + 2.0])  # aggregator 1 got 1 of 2: a timeout more
  np.testing.assert_allclose(m.take_weights(take), [[0, 1], [0.5, 0], [0.5, 0]])
  # Node 5 (aggregator 1) crashes at 4.0, before its wait ends: its aggregate is lost.
  # Node 1 crashes at 1.2, before its model reaches node 4: node 4 takes 0's and 2's.
  crash = jnp.full(N, jnp.inf).at[5].set(4.0).at[1].set(1.2)
  take, done, _ = m.collect(settings, network, plan, sent_at, crash)
  np.testing.assert_array_equal(take[:, 0], [True, False, True])
  np.testing.assert_allclose(done[0], 3.5)
  assert np.isinf(done[1])


def test_global_views_mark_online_seen_and_timed_out_down():
  vw = m.Views(seen=jnp.zeros((1, N), jnp.int32), down=jnp.full((1, N), m.NEVER),
               joins=jnp.ones((1, N), jnp.int32))
  online = jnp.array([True, True, False, True, False, True])
  cand = jnp.array([[2, 4, 1], [2, 4, 1]])
  timed_out = jnp.array([[True, False, False], [False, True, False]])
  counter = jnp.array([1, 1, 1, 2, 1, 1], jnp.int32)
  search_down = jnp.array([1, N])  # the sample search timed out on node 1 (N: no node)
  out = m.global_views(vw, online, counter, cand, timed_out, search_down, jnp.int32(7))
  np.testing.assert_array_equal(out.seen[0], np.where(online, 7, 0))
  np.testing.assert_array_equal(out.down[0] == 7, [False, True, True, False, True, False])
  np.testing.assert_array_equal(out.joins[0], counter)


def test_probe_finding_fewer_than_a_searches_the_whole_ranking():
  network = uniform_network(N, latency=0.1)
  online = jnp.array([True, False, True, False, False, False])
  cand = jnp.array([[1, 2, 3, 4, 5]])  # only node 2 answers; a = 2
  chosen, chosen_ok, probed, _, seconds = m.probe(cand, jnp.ones((1, 5), bool), jnp.array([0]),
                                                   online[cand], network, aggregators=2,
                                                   ping_timeout=2.0)
  assert chosen[0, 0] == 2 and chosen_ok.tolist() == [[True, False]]
  assert np.all(probed)  # the search went on past node 2 to the end of the ranking
  np.testing.assert_allclose(seconds, [3 * 2.0], rtol=1e-6)  # {1, 2}, {3, 4}, {5}: a dead each


def _loop_ping_batches(responsive, valid, rtt, need, width, timeout):
  """ping_batches one batch at a time, as a person would count it."""
  probed, found, seconds, pos = [False] * len(valid), [False] * len(valid), 0.0, 0
  while pos < len(valid) and sum(found) < need:
    batch = [i for i in range(pos, min(pos + width, len(valid))) if valid[i]]
    for i in batch:
      probed[i] = True
      if responsive[i] and sum(found) < need:
        found[i] = True
    seconds += max([rtt[i] if responsive[i] else timeout for i in batch], default=0.0)
    pos += width
  return probed, found, seconds


@pytest.mark.parametrize('seed', range(20))
def test_ping_batches_equals_a_loop_over_batches(seed):
  rng = np.random.default_rng(seed)
  c, need, width = int(rng.integers(1, 12)), int(rng.integers(1, 5)), int(rng.integers(1, 5))
  responsive, valid = rng.random(c) < 0.5, rng.random(c) < 0.8
  valid[:int(rng.integers(0, c + 1))] |= True  # valid entries mostly first, as in a ranking
  rtt = rng.random(c)
  probed, found, seconds = m.ping_batches(jnp.asarray(responsive), jnp.asarray(valid),
                                          jnp.asarray(rtt, jnp.float32), need, width, 3.0)
  want = _loop_ping_batches(responsive & valid, valid, rtt, need, width, 3.0)
  np.testing.assert_array_equal(probed, want[0])
  np.testing.assert_array_equal(found, want[1])
  np.testing.assert_allclose(seconds, want[2], rtol=1e-6)
