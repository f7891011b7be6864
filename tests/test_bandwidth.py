"""A node's concurrent transfers share its bandwidth fairly (decsim.network): closed forms
for FedAvg's server, a D-PSGD node's k neighbours and MoDeST's aggregator, on a network
with no latency, bandwidth W bytes/s per node and speed v samples/s."""

import jax
import pytest

from decsim import experiment, topology
from decsim.network import uniform_network
from decsim.protocols.dpsgd import dpsgd
from decsim.protocols.fedavg import fedavg
from decsim.protocols.modest import modest

W, V, STEPS, BATCH = 2e5, 100.0, 2, 10


@pytest.fixture(scope='module')
def setup():
  config = experiment.ExperimentConfig(num_samples=2000, nodes=12, model='logistic',
                                       local_steps=STEPS, batch_size=BATCH)
  dataset, data, _ = experiment.load_data(config)
  learner, _ = experiment.make_learner(config, dataset)
  return learner, data


def _round_seconds(protocol, data) -> float:
  state = protocol.init(jax.random.key(0), data)
  _, metrics = jax.jit(protocol.round)(state, data)
  return float(metrics.sim_seconds)


def test_transfer_shares_the_slower_end():
  net = uniform_network(4, latency=0.0, bandwidth=100.0)
  assert float(net.transfer_seconds(0, 1, 100)) == pytest.approx(1.0)
  assert float(net.transfer_seconds(0, 1, 100, up_share=4)) == pytest.approx(4.0)
  assert float(net.transfer_seconds(0, 1, 100, up_share=2, down_share=3)) == pytest.approx(3.0)
  assert float(net.transfer_seconds(0, 1, 100, up_share=0)) == pytest.approx(1.0)  # at least 1


def test_fedavg_server_shares_its_bandwidth_among_the_s_clients(setup):
  """s = 5: the server sends 5 models at W/5 each, clients train, then 5 uploads share the
  server's download: 5M/W + train + 5M/W."""
  learner, data = setup
  m, s = learner.model_bytes(), 5
  net = uniform_network(12, latency=0.0, bandwidth=W, speed=V)
  seconds = _round_seconds(fedavg(learner, nodes=12, sample_size=s, network=net), data)
  assert seconds == pytest.approx(s * m / W + STEPS * BATCH / V + s * m / W, rel=1e-5)


def test_dpsgd_node_shares_its_bandwidth_among_its_k_neighbours(setup):
  """A 4-regular graph: every node uploads to 4 and downloads from 4 at W/4: train + 4M/W."""
  learner, data = setup
  m, k = learner.model_bytes(), 4
  graph = topology.build_topology('kregular', 12, degree=k, seed=0)
  net = uniform_network(12, latency=0.0, bandwidth=W, speed=V)
  seconds = _round_seconds(dpsgd(learner, nodes=12, topology=graph, network=net), data)
  assert seconds == pytest.approx(STEPS * BATCH / V + k * m / W, rel=1e-5)


def test_modest_aggregator_shares_its_bandwidth_among_the_s_participants(setup):
  """a = 1: the aggregator sends to the s participants at W/s, they train, and their s
  uploads share its download: sM/W + train + sM/W (pings take no time here)."""
  learner, data = setup
  m, s = learner.model_bytes(), 4
  net = uniform_network(12, latency=0.0, bandwidth=W, speed=V)
  seconds = _round_seconds(modest(learner, nodes=12, sample_size=s, network=net), data)
  assert seconds == pytest.approx(s * m / W + STEPS * BATCH / V + s * m / W, rel=1e-5)
