"""The pieces of a gossip tick on tiny arrays: inbox sums per receiver, the merge rules'
closed forms, buffer semantics, peer choice, partition masks, message counts, and the
one variance-correction target function against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decsim import mixing
from decsim.protocols import gossip as g
from decsim.topology import metropolis_hastings

N = 4


def _params():
  """Two leaves with distinct rows: w [N, 3], b [N]."""
  w = jnp.arange(N * 3, dtype=jnp.float32).reshape(N, 3) + 1.0
  return {'b': jnp.array([10.0, 20.0, 30.0, 40.0]), 'w': w}


def _pids(params, partitions=1):
  return g.partition_ids(jax.tree.map(lambda x: x[0], params), partitions)


def _inbox(settings, params, src, dst, valid, age=None, p_src=None):
  var = mixing.layer_variance(params)
  age = jnp.ones((N, settings.partitions)) if age is None else age
  p_src = jnp.zeros(src.shape, jnp.int32) if p_src is None else p_src
  return g.inbox_of(params, var, age, src, dst, valid, p_src, _pids(params, settings.partitions),
                    jax.random.key(0), settings), var


# Pushes 0 -> 2, 1 -> 2, 2 -> 0; node 3's message is not valid.
SRC = jnp.array([[0], [1], [2], [3]])
DST = jnp.array([[2], [2], [0], [1]])
VALID = jnp.array([[True], [True], [True], [False]])


def test_push_inbox_sums_exactly_the_sent_rows_per_receiver():
  params = _params()
  inbox, var = _inbox(g.GossipSettings(nodes=N), params, SRC, DST, VALID)
  w = np.asarray(params['w'])
  expected = np.stack([w[2], np.zeros(3), w[0] + w[1], np.zeros(3)])
  np.testing.assert_array_equal(inbox.num['w'], expected)
  np.testing.assert_array_equal(inbox.count, [1, 0, 2, 0])
  np.testing.assert_array_equal(inbox.den['w'][:, 0], [1, 0, 2, 0])  # [N, 1]: unmasked
  v = np.asarray(var['w'])
  np.testing.assert_allclose(inbox.var_sum['w'], [v[2], 0, v[0] + v[1], 0], rtol=1e-6)


def test_age_inbox_weights_by_sender_age_and_keeps_the_largest_age():
  params = _params()
  age = jnp.array([[1.0], [3.0], [5.0], [7.0]])
  settings = g.GossipSettings(nodes=N, merge='age')
  inbox, _ = _inbox(settings, params, SRC, DST, VALID, age=age)
  w = np.asarray(params['w'])
  np.testing.assert_allclose(inbox.num['w'][2], 1 * w[0] + 3 * w[1])
  np.testing.assert_allclose(inbox.weight_sum, [5.0, 0.0, 4.0, 0.0])
  np.testing.assert_array_equal(inbox.age_max[:, 0], [5.0, 0.0, 3.0, 0.0])


def test_pull_inbox_equals_the_neighbour_sums():
  topo = metropolis_hastings([np.array([1, 3]), np.array([0, 2]), np.array([1, 3]),
                              np.array([2, 0])])  # a ring
  settings = g.GossipSettings(nodes=N, peers='all_neighbours')
  send = jnp.array([True, False, True, True])
  src, dst, valid = g.messages(jax.random.key(1), send, jnp.ones(N, bool), settings, topo)
  params = _params()
  inbox, _ = _inbox(settings, params, src, dst, valid)
  w, on = np.asarray(params['w']), np.asarray(send)
  ring = {0: [1, 3], 1: [0, 2], 2: [1, 3], 3: [2, 0]}
  expected = np.stack([sum(w[j] for j in ring[i] if on[j]) for i in range(N)])
  np.testing.assert_allclose(inbox.num['w'], expected)
  np.testing.assert_array_equal(inbox.count, [sum(on[j] for j in ring[i]) for i in range(N)])


@pytest.mark.parametrize('merge,beta', [('half', 0.5), ('beta', 0.3), ('replace', 0.0)])
def test_fixed_weight_merges_closed_form(merge, beta):
  params = _params()
  settings = g.GossipSettings(nodes=N, merge=merge, beta=beta)
  inbox, var = _inbox(settings, params, SRC, DST, VALID)
  merged, _, _ = g.merge_rows(params, inbox, jnp.ones((N, 1)), var, _pids(params), settings)
  w = np.asarray(params['w'])
  got = np.asarray(merged['w'])
  np.testing.assert_allclose(got[2], beta * w[2] + (1 - beta) * (w[0] + w[1]) / 2, rtol=1e-6)
  np.testing.assert_allclose(got[0], beta * w[0] + (1 - beta) * w[2], rtol=1e-6)
  np.testing.assert_array_equal(got[[1, 3]], w[[1, 3]])  # nothing arrived: unchanged


def test_age_merge_closed_form_and_new_age():
  params = _params()
  age = jnp.array([[2.0], [3.0], [4.0], [9.0]])
  settings = g.GossipSettings(nodes=N, merge='age')
  inbox, var = _inbox(settings, params, SRC, DST, VALID, age=age)
  merged, new_age, _ = g.merge_rows(params, inbox, age, var, _pids(params), settings)
  w = np.asarray(params['w'])
  np.testing.assert_allclose(merged['w'][2], (4 * w[2] + 2 * w[0] + 3 * w[1]) / 9, rtol=1e-6)
  np.testing.assert_allclose(merged['w'][0], (2 * w[0] + 4 * w[2]) / 6, rtol=1e-6)
  np.testing.assert_array_equal(new_age[:, 0], [4.0, 3.0, 4.0, 9.0])  # max(own, received)


def test_buffer_acts_only_once_buffer_size_models_are_held():
  params = _params()
  settings = g.GossipSettings(nodes=N, buffer_size=3)
  buffer = g.empty_inbox(params, N, 1, False)
  alive = jnp.ones(N, bool)
  inbox, _ = _inbox(settings, params, SRC, DST, VALID)  # node 2 gets 2 models
  held, acts = g.held_inbox(settings, buffer, inbox, alive)
  assert not np.any(acts)
  held, acts = g.held_inbox(settings, held, inbox, alive)  # node 2 holds 4, node 0 holds 2
  np.testing.assert_array_equal(acts, [False, False, True, False])
  np.testing.assert_array_equal(held.num['w'][2], 2 * np.asarray(inbox.num['w'][2]))
  emptied = g.emptied_buffer(held, jnp.array([2, N, N, N]), N)
  np.testing.assert_array_equal(emptied.count, [2, 0, 0, 0])
  assert not np.any(emptied.num['w'][2])
  # A third tick: node 0 reaches 3 models and acts; node 2, offline, does not.
  _, acts = g.held_inbox(settings, held, inbox, jnp.array([True, True, False, True]))
  np.testing.assert_array_equal(acts, [True, False, False, False])


def test_random_push_never_targets_the_sender_and_needs_a_live_target():
  settings = g.GossipSettings(nodes=N)
  send = jnp.array([True, True, False, True])
  alive = jnp.array([True, False, True, True])
  for seed in range(5):
    src, dst, valid = g.messages(jax.random.key(seed), send, alive, settings, None)
    assert np.all(np.asarray(src) != np.asarray(dst))
    np.testing.assert_array_equal(valid[:, 0], send & alive[dst[:, 0]])


def test_neighbour_push_stays_on_the_graph():
  star = metropolis_hastings([np.arange(1, N)] + [np.array([0])] * (N - 1))
  settings = g.GossipSettings(nodes=N, peers='neighbour')
  target, ok = g.push_targets(jax.random.key(3), settings, star)
  assert target[0] in (1, 2, 3) and np.all(np.asarray(target[1:]) == 0) and np.all(ok)


def test_partition_masks_select_one_partition_per_message():
  params = _params()
  settings = g.GossipSettings(nodes=N, partitions=2)
  pids = _pids(params, 2)
  part = jnp.array([0, 1, 1, 0])
  m = g.element_mask(jax.random.key(0), 1, params['w'], pids['w'], SRC[:, 0], DST[:, 0], part,
                     settings)
  np.testing.assert_array_equal(m, np.asarray(pids['w'])[None] == np.asarray(part)[:, None])
  # Flat offsets run over one model's leaves in order: b (one element), then w's three.
  np.testing.assert_array_equal(pids['b'], 0)
  np.testing.assert_array_equal(pids['w'], [1, 0, 1])


def test_message_counts_count_valid_messages_per_sender():
  src = jnp.array([[0, 1], [0, 2], [3, 3]])
  valid = jnp.array([[True, True], [True, False], [False, True]])
  np.testing.assert_array_equal(g.message_counts(valid, src, N), [2, 1, 0, 1])


def test_extra_metrics_and_message_bytes():
  state = type('S', (), {'extra': g.GossipState(next_wake=jnp.zeros(N, jnp.int32),
                                                age=jnp.zeros((N, 1)),
                                                dropped=jnp.int32(7))})()
  metrics = g.extra_metrics(state)
  assert list(metrics) == ['gossip_dropped'] and int(metrics['gossip_dropped']) == 7
  assert g.message_bytes(1000, partitions=4) == 250
  assert g.message_bytes(1000, keep_prob=0.25) == 250


def test_bad_settings_raise():
  with pytest.raises(ValueError, match='merge'):
    g.check_settings(g.GossipSettings(nodes=N, merge='mean'), None)
  with pytest.raises(ValueError, match='topology'):
    g.check_settings(g.GossipSettings(nodes=N, peers='neighbour'), None)


# ------------------------------------------------------------- the VC target


def _np_target(target, own, received, count, weighted=None, weight=None, own_weight=None,
               own_share=None):
  """Independent NumPy version of mixing.received_target for one leaf."""
  own, received = np.asarray(own, np.float64), np.asarray(received, np.float64)
  cnt = np.maximum(count, 1)
  with_own = own_weight is not None or own_share is not None
  plain = (own + received) / (1 + cnt) if with_own else received / cnt
  if own_share is not None:
    follow = own_share * own + (1 - own_share) * received / cnt
  elif weighted is None:
    follow = plain
  else:
    a = 0.0 if own_weight is None else np.asarray(own_weight)
    total = a + np.asarray(weight)
    follow = np.where(total > 0, (a * own + weighted) / np.where(total > 0, total, 1), plain)
  return {'self': own, 'received': plain, 'follow_beta': follow}[target]


@pytest.mark.parametrize('target', mixing.VC_TARGETS)
@pytest.mark.parametrize('form', ['no_own', 'share', 'age', 'weighted_no_own'])
def test_received_target_equals_numpy(target, form):
  rng = np.random.default_rng(0)
  own, received = rng.uniform(0.1, 2, 5), rng.uniform(0, 6, 5)
  count = np.array([0, 1, 2, 3, 4])
  weighted, weight = rng.uniform(0, 20, 5), np.array([0.0, 1.0, 5.0, 2.0, 3.0])
  kw = {'no_own': {}, 'share': dict(own_share=0.3),
        'age': dict(weighted=weighted, weight=weight, own_weight=np.array([0.0, 2, 0, 1, 4])),
        'weighted_no_own': dict(weighted=weighted, weight=weight)}[form]
  vc = mixing.VarianceCorrection(target=target)
  as_tree = lambda x: None if x is None else {'k': jnp.asarray(x, jnp.float32)}
  got = mixing.received_target(
      vc, as_tree(own), as_tree(received), jnp.asarray(count), weighted=as_tree(kw.get('weighted')),
      weight=None if 'weight' not in kw else jnp.asarray(kw['weight'], jnp.float32),
      own_weight=None if 'own_weight' not in kw else jnp.asarray(kw['own_weight'], jnp.float32),
      own_share=kw.get('own_share'))
  np.testing.assert_allclose(got['k'], _np_target(target, own, received, count, **kw), rtol=1e-6)


def test_received_target_of_means_is_the_means():
  own, mean, wmean = ({'k': jnp.array([x])} for x in (1.0, 2.0, 3.0))
  pick = lambda t: float(mixing.received_target(mixing.VarianceCorrection(target=t), own, mean,
                                                weighted=wmean)['k'][0])
  assert (pick('self'), pick('received'), pick('follow_beta')) == (1.0, 2.0, 3.0)
