"""Simulated network and churn: transfer times, round times by hand on 3 nodes, success
fractions, byte accounting, crash/join schedules, traces and bad files."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decsim import churn, experiment, network
from decsim.network import MODEL, Network
from decsim.protocols.dpsgd import dpsgd
from decsim.protocols.fedavg import fedavg
from decsim.topology import build_topology


def three_node_network(speed=(100.0, 50.0, 25.0)) -> Network:
  """Nodes on sites 0, 1, 2; latencies in seconds; node 2 uploads at 1 MB/s."""
  latency = np.array([[0.001, 0.010, 0.100], [0.010, 0.001, 0.050], [0.100, 0.050, 0.001]])
  return Network(site=jnp.arange(3, dtype=jnp.int32), latency=jnp.asarray(latency, jnp.float32),
                 upload=jnp.asarray([np.inf, np.inf, 1e6], jnp.float32),
                 download=jnp.full((3,), np.inf, jnp.float32),
                 speed=jnp.asarray(speed, jnp.float32))


def test_transfer_is_latency_plus_bytes_over_the_narrower_link():
  net = three_node_network()
  np.testing.assert_allclose(net.transfer_seconds(2, 0, 2e6), 0.100 + 2.0, rtol=1e-6)
  np.testing.assert_allclose(net.transfer_seconds(0, 2, 2e6), 0.100, rtol=1e-6)  # unlimited
  np.testing.assert_allclose(net.compute_seconds(jnp.arange(3), 100.0), [1.0, 2.0, 4.0])


def test_globe_latency_has_a_realistic_spread():
  lat = network.globe_latency(20, seed=0)
  assert lat.shape == (20, 20) and np.allclose(lat, lat.T)
  assert 0 < lat.min() and lat.max() <= 0.21 and np.diag(lat).max() < 0.002
  assert np.median(lat) > 0.03  # intercontinental, not a LAN


@pytest.fixture(scope='module')
def learner3():
  config = experiment.ExperimentConfig(num_samples=1000, nodes=3, sample_size=3, model='logistic',
                                       local_steps=2, batch_size=10)
  dataset, data, _ = experiment.load_data(config)
  learner, _ = experiment.make_learner(config, dataset)
  return learner, data


def test_fedavg_round_time_by_hand(learner3):
  learner, data = learner3
  net = three_node_network()
  protocol = fedavg(learner, nodes=3, sample_size=3, network=net, server=0)
  state, metrics = jax.jit(protocol.round)(protocol.init(jax.random.key(0), data), data)
  b = learner.model_bytes()
  # client i: download from server 0 + 20 samples at its speed + upload to 0
  per_client = [0.001 + 20 / 100 + 0.001, 0.010 + 20 / 50 + 0.010,
                0.100 + 20 / 25 + 0.100 + b / 1e6]
  np.testing.assert_allclose(metrics.sim_seconds, max(per_client), rtol=1e-5)
  # server sends 3 models, each client uploads one
  np.testing.assert_array_equal(state.sent[:, MODEL], [3 + 1, 1, 1])


def test_fedavg_success_fraction_ignores_exactly_the_slowest(learner3):
  learner, data = learner3
  net = three_node_network()
  full = fedavg(learner, nodes=3, sample_size=3, network=net, server=0, weighting='uniform')
  part = fedavg(learner, nodes=3, sample_size=3, network=net, server=0, weighting='uniform',
                success_fraction=2 / 3)
  s_full, _ = jax.jit(full.round)(full.init(jax.random.key(0), data), data)
  s_part, m_part = jax.jit(part.round)(part.init(jax.random.key(0), data), data)
  # Node rows hold each client's trained model: the aggregate must be the mean of the
  # two fastest (nodes 0 and 1), and the round must end when the second one arrives.
  fast_mean = jax.tree.map(lambda p: p[:2].mean(0), s_full.nodes.params)
  for a, b in zip(jax.tree.leaves(fast_mean), jax.tree.leaves(part.model(s_part))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m_part.sim_seconds, 0.010 + 20 / 50 + 0.010, rtol=1e-5)


def test_dpsgd_barrier_time_by_hand(learner3):
  learner, data = learner3
  net = three_node_network()
  protocol = dpsgd(learner, nodes=3, topology=build_topology('complete', 3), network=net)
  state, metrics = jax.jit(protocol.round)(protocol.init(jax.random.key(0), data), data)
  b = learner.model_bytes()
  train = np.array([20 / 100, 20 / 50, 20 / 25])
  lat = np.array([[0.001, 0.010, 0.100], [0.010, 0.001, 0.050], [0.100, 0.050, 0.001]])
  upload = np.array([np.inf, np.inf, 1e6])
  # each node uploads to its 2 neighbours at once: half its upload each
  done = [max(train[i], max(train[j] + lat[j, i] + b / (upload[j] / 2) for j in range(3)
                            if j != i)) for i in range(3)]
  np.testing.assert_allclose(metrics.sim_seconds, max(done), rtol=1e-5)
  np.testing.assert_array_equal(state.sent[:, MODEL], 2)  # one model per directed edge


def test_crash_schedule_reaches_the_fraction_at_the_requested_time():
  config = churn.ChurnConfig(crash_start_seconds=300, crash_every_seconds=60, crash_batch=5,
                             crash_fraction=0.8)
  avail = churn.make_availability(config, 100, seed=0)
  down = lambda t: int(100 - jnp.sum(avail(jax.random.key(0), 0, jnp.float32(t)).online))
  assert [down(t) for t in (0, 299.9, 300, 359, 360, 1140, 1199, 1200, 5000)] == \
      [0, 0, 5, 5, 10, 75, 75, 80, 80]
  # crashed nodes remain members (they did not announce a leave); graceful ones do not
  assert bool(jnp.all(avail(jax.random.key(0), 0, jnp.float32(5000)).member))
  graceful = churn.make_availability(dataclasses.replace(config, crash_graceful=True), 100, 0)
  assert int(jnp.sum(graceful(jax.random.key(0), 0, jnp.float32(5000)).member)) == 20


def test_join_schedule_and_bernoulli():
  avail = churn.make_availability(
      churn.ChurnConfig(join_nodes=10, join_start_seconds=60, join_every_seconds=60), 100, 0)
  online = lambda t: int(jnp.sum(avail(jax.random.key(0), 0, jnp.float32(t)).online))
  assert [online(t) for t in (0, 59, 60, 119, 120, 600, 1e4)] == [90, 90, 91, 91, 92, 100, 100]
  bern = churn.make_availability(churn.ChurnConfig(p_online=0.3), 2000, 0)
  frac = np.mean([float(jnp.mean(bern(jax.random.key(0), r, 0.0).online)) for r in range(5)])
  assert abs(frac - 0.3) < 4 * np.sqrt(0.3 * 0.7 / 10_000)


def test_trace_file_drives_availability(tmp_path):
  path = tmp_path / 'trace.csv'
  path.write_text('1,1,0\n0,1,1\n')
  avail = churn.make_availability(churn.ChurnConfig(trace_file=str(path)), 3, 0)
  rows = [np.asarray(avail(jax.random.key(0), r, 0.0).online).tolist() for r in range(3)]
  assert rows == [[True, True, False], [False, True, True], [False, True, True]]


@pytest.mark.parametrize('text,named', [('1,2,0\n0,1,1\n', '0/1'), ('1,1\n', '3 columns'),
                                        ('a,b,c\n', 'cannot be read')])
def test_bad_trace_files(tmp_path, text, named):
  path = tmp_path / 'trace.csv'
  path.write_text(text)
  with pytest.raises(churn.ChurnError, match=named):
    churn.make_availability(churn.ChurnConfig(trace_file=str(path)), 3, 0)


@pytest.mark.parametrize('text,named', [('1,2\n3\n', 'square'), ('1,x\n2,3\n', 'numeric'),
                                        ('1,-2\n2,3\n', 'negative')])
def test_bad_latency_files(tmp_path, text, named):
  path = tmp_path / 'lat.csv'
  path.write_text(text)
  with pytest.raises(network.NetworkError, match=named):
    network.load_latency(path)
  with pytest.raises(network.NetworkError, match='cannot be read'):
    network.load_latency(tmp_path / 'missing.csv')


def test_fl_server_is_the_lowest_median_latency_node():
  latency = np.full((5, 5), 0.1)  # a star: node 3 is 10 ms from everyone, the rest 100 ms apart
  latency[3, :] = latency[:, 3] = 0.01
  np.fill_diagonal(latency, 0.001)
  net = network.uniform_network(5).replace(site=jnp.arange(5, dtype=jnp.int32),
                                           latency=jnp.asarray(latency, jnp.float32))
  assert network.lowest_median_latency_node(net) == 3
