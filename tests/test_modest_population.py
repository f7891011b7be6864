"""Population scale for MoDeST (issue 16): the state keeps the ``s`` models in flight, not a
row per node, and gives the metrics of the row-per-node layout bit for bit."""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest

from decsim import churn, experiment, metrics, network
from decsim.protocols import modest as modest_lib
from decsim.protocols.modest import modest

NODES, S = 12, 4


@pytest.fixture(scope='module')
def setup():
  return conftest.small_learner(num_samples=600, nodes=NODES, momentum=0.9)


def _protocol(learner, node_rows, crash_time):
  """a = 1, sf = 0.75; node n crashes (for good) at simulated second ``crash_time[n]``
  (a traced array, so one compile serves every schedule); re-forward after 0.5 s."""
  def availability(key, round_, clock):
    del key, round_
    up = clock < crash_time
    return churn.Availability(online=up, member=jnp.ones_like(up), crash_time=crash_time)

  net = network.uniform_network(NODES, latency=0.01, speed=100.0)
  return churn.with_churn(
      modest(learner, nodes=NODES, sample_size=S, success_fraction=0.75, ping_timeout=0.1,
             reforward_timeout=0.5, inactivity_threshold=3, network=net,
             availability=availability, node_rows=node_rows), availability)


def _stepper(learner, data, node_rows):
  """(init, jitted round(state, crash_time [N]))."""
  init = _protocol(learner, node_rows, jnp.full((NODES,), jnp.inf)).init
  step = jax.jit(lambda state, times: _protocol(learner, node_rows, times).round(state, data))
  return init, step


@pytest.mark.slow  # two compiles of a round: ~50 s on the shared dev CPU
def test_models_in_flight_give_the_row_per_node_metrics_bitwise(setup):
  """Round 1's aggregator crashes 1 ms before its aggregate is ready (the round is lost
  and round 2's participants re-forward), then a participant crashes while training and
  nodes keep crashing: over 8 rounds the in-flight layout holds s rows, and its metrics,
  clock, byte counters, aggregates and the participants' models (client_accuracy) equal
  the row-per-node layout's, bit for bit."""
  learner, data, dataset = setup
  (init_new, step_new), (init_old, step_old) = (_stepper(learner, data, rows)
                                                for rows in ('in_flight', 'all'))
  never = jnp.full((NODES,), jnp.inf, jnp.float32)
  healthy = init_old(jax.random.key(0), data)
  for _ in range(2):
    healthy, _ = step_old(healthy, never)
  aggregator = int(healthy.extra.agg_ids[0])
  ready = float(healthy.extra.agg_done[0])
  later = [n for n in range(NODES) if n != aggregator][:3]
  times = never.at[aggregator].set(ready - 1e-3).at[jnp.asarray(later)].set(
      ready + jnp.asarray([0.7, 1.5, 2.5]))
  new, old = init_new(jax.random.key(0), data), init_old(jax.random.key(0), data)
  chex.assert_tree_shape_prefix(new.nodes.params, (S,))
  chex.assert_tree_shape_prefix(old.nodes.params, (NODES,))
  evaluate = metrics.make_evaluate(lambda p, x: x @ p['Dense_0']['kernel'] + p['Dense_0']['bias'])
  x, y = dataset.x_test[:100].reshape(100, -1), dataset.y_test[:100]
  lost = []
  for _ in range(8):
    new, m_new = step_new(new, times)
    old, m_old = step_old(old, times)
    chex.assert_trees_all_equal(m_new, m_old)
    chex.assert_trees_all_equal((new.extra, new.clock, new.sent, new.available),
                                (old.extra, old.clock, old.sent, old.available))
    models, valid = _protocol(learner, 'in_flight', never).client_models(new)
    ref_models, ref_valid = _protocol(learner, 'all', never).client_models(old)
    np.testing.assert_array_equal(valid, ref_valid)
    chex.assert_trees_all_equal(jax.tree.map(lambda a: a[valid], models),
                                jax.tree.map(lambda a: a[ref_valid], ref_models))
    chex.assert_trees_all_equal(metrics.client_accuracy(evaluate, models, valid, x, y),
                                metrics.client_accuracy(evaluate, ref_models, ref_valid, x, y))
    lost.append(not np.isfinite(np.asarray(new.extra.agg_done)).any())
  assert lost[1] and not lost[2]  # round 1 lost its aggregate; round 2 re-forwarded


def test_reforward_reads_the_same_models_from_either_layout(setup):
  """After a failed round the participants still up re-forward the models they trained:
  read from the s rows in flight or from their node rows, the aggregate, its holders
  and the senders are the same, bit for bit, and the aggregate is their mean."""
  learner, data, _ = setup
  part = jnp.asarray([5, 2, NODES, 9], jnp.int32)  # [s]; N: no participant in that slot
  up = np.asarray([True, False, False, True])  # node 2 is offline
  net = network.uniform_network(NODES, latency=0.01, speed=100.0)
  out = {}
  for rows in ('in_flight', 'all'):
    protocol = modest(learner, nodes=NODES, sample_size=S, reforward_timeout=0.5, network=net,
                      node_rows=rows)
    settings = protocol.init.args[0]  # the run's static ModestSettings
    state = protocol.init(jax.random.key(0), data)
    trained = jax.tree.map(  # [s, ...] distinct models; slot 2 holds garbage
        lambda p: p + jnp.arange(1, S + 1, dtype=p.dtype).reshape((S,) + (1,) * (p.ndim - 1)),
        jax.tree.map(lambda p: p[:S], state.nodes.params))
    state = state.replace(
        available=jnp.arange(NODES) != 2,
        nodes=state.nodes.replace(params=modest_lib.keep_trained(settings, state, part, trained)),
        extra=state.extra.replace(participants=part, sent_at=jnp.float32(1.0)))
    models, valid = modest_lib.trained_models(settings, state)
    np.testing.assert_array_equal(valid, part < NODES)
    chex.assert_trees_all_equal(jax.tree.map(lambda p: p[0], models),
                                jax.tree.map(lambda p: p[0], trained))
    out[rows] = jax.jit(lambda st: modest_lib.reforward(
        settings, net, modest_lib.aggregate, st, jnp.full((NODES,), jnp.inf),
        jnp.asarray([7, 3, 9, 1], jnp.int32), jnp.asarray([False, True, True, True])))(state)
  chex.assert_trees_all_equal(out['in_flight'], out['all'])
  recovered, senders = out['in_flight']
  np.testing.assert_array_equal(senders, up)
  expected = jax.tree.map(lambda p: p[up].mean(0), trained)
  chex.assert_trees_all_close(jax.tree.map(lambda p: p[0], recovered.agg_params), expected,
                              rtol=1e-6)


# ----------------------------------------------------------- --study=modest_population

@pytest.mark.parametrize('quick', [True, False])
def test_population_study_compares_modest_and_fedavg_on_the_same_clients(quick):
  """Four runs: MoDeST and FedAvg under Bernoulli availability and under a crash schedule
  that takes 80% of the generated Synthetic(1, 1) clients; within a setting only the
  protocol differs, across settings only the availability."""
  from decsim.studies import modest_population
  configs = modest_population.configs(quick)
  assert sorted(configs) == ['fedavg_bernoulli', 'fedavg_crash', 'modest_bernoulli',
                             'modest_crash']
  nodes = 20_000 if quick else 1_000_000
  churn_fields = {'p_online', 'crash_start_seconds', 'crash_every_seconds', 'crash_batch',
                  'crash_fraction'}
  rest = [{k: v for k, v in dataclasses.asdict(c).items() if k not in churn_fields | {'protocol'}}
          for c in configs.values()]
  assert all(r == rest[0] for r in rest)
  assert (rest[0]['nodes'], rest[0]['sample_size'], rest[0]['dataset'], rest[0]['client_data'],
          rest[0]['aggregators']) == (nodes, 100, 'synthetic', 'generated', 1)
  crash = configs['modest_crash']
  assert math.floor(crash.crash_fraction * nodes) == 16 * crash.crash_batch  # 16 batches: 80%
  assert configs['fedavg_bernoulli'].p_online == 0.5 and crash.p_online == 1.0
  for config in configs.values():  # a valid experiment: every field checked
    experiment.ExperimentConfig(**dataclasses.asdict(config))


# ----------------------------------------------------------------- traces, a row at a time

def test_a_streamed_trace_equals_the_whole_file_read_at_once(tmp_path):
  """``load_trace`` streams the file a row at a time into its matrix: the same bool matrix
  as parsing the whole file at once, comments, blank lines and both separators included;
  a short row is still refused with one line."""
  rng = np.random.default_rng(0)
  matrix = rng.random((7, 500)) < 0.3
  lines = ['# a trace'] + [(',' if r % 2 else ' ').join(map(str, row.astype(int)))
                           for r, row in enumerate(matrix)]
  lines.insert(3, '')
  path = tmp_path / 'trace.csv'
  path.write_text('\n'.join(lines) + '\n')
  streamed = churn.load_trace(str(path), 500)
  assert streamed.dtype == bool
  np.testing.assert_array_equal(streamed, np.asarray(network.read_rows(path)) == 1)
  np.testing.assert_array_equal(streamed, matrix)
  path.write_text('\n'.join(lines[:-1] + [' '.join(lines[-1].split()[:-1])]) + '\n')
  with pytest.raises(churn.ChurnError, match='500 columns'):
    churn.load_trace(str(path), 500)


def test_large_view_rankings_are_o_s_and_shorter_ones_are_their_prefixes():
  """Above ``SPARSE_SAMPLE_MIN_NODES`` the hash ranking draws ids, not N scores: it ranks
  distinct eligible nodes only, the participants' short ranking of round r+1 is the
  start of the aggregators' long one (so the aggregators they probe are the next
  sample's first nodes), and too few eligible nodes fall back to the whole view."""
  from decsim.protocols import fedavg
  n = fedavg.SPARSE_SAMPLE_MIN_NODES
  eligible = jnp.arange(n) % 2 == 0  # half the view
  rank = jax.jit(modest_lib.hash_ranking, static_argnums=3)
  key = jax.random.key(7)
  long_ids, long_valid = rank(key, 5, eligible, 640)
  short_ids, _ = rank(key, 5, eligible, 10)
  ids = np.asarray(long_ids)
  assert bool(long_valid.all()) and len(set(ids.tolist())) == 640 and (ids % 2 == 0).all()
  np.testing.assert_array_equal(short_ids, long_ids[:10])
  # FedAvg's O(s) draw on the round's key (the old top-k of N scores ranks differently)
  from decsim.rng import Stream, round_key
  np.testing.assert_array_equal(
      ids, fedavg.sample_clients(round_key(key, 5, Stream.SAMPLE), eligible, 640)[0])
  assert not np.array_equal(ids, np.asarray(rank(key, 6, eligible, 640)[0]))  # next round
  few = jnp.zeros((n,), bool).at[jnp.arange(0, n, n // 8)].set(True)  # 8 eligible nodes
  few_ids, few_valid = rank(key, 5, few, 10)
  assert int(few_valid.sum()) == 8
  assert set(np.asarray(few_ids)[np.asarray(few_valid)].tolist()) == set(range(0, n, n // 8))
