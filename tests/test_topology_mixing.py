"""Topologies (decsim.topology) and averaging operators (decsim.mixing).

Pins the properties the protocols rely on: Metropolis-Hastings W is symmetric,
non-negative, doubly stochastic and connected; the one-peer exponential graph
is doubly stochastic and averages exactly in tau rounds for n = 2^m; dense and
sparse mixing agree; mixing keeps the node average; churn renormalisation keeps
offline models and live rows stochastic.
"""

import math
import time

import chex
import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from decsim import mixing, topology
from decsim.topology import TopologyError

SETTINGS = settings(max_examples=30, deadline=None)

# One compile per (shapes, mode) instead of eager op-by-op dispatch: much faster.
mix = jax.jit(mixing.mix, static_argnames='mode')


def is_doubly_stochastic(W, atol=1e-6) -> bool:
  W = np.asarray(W, np.float64)
  return bool((W >= -atol).all() and np.allclose(W.sum(0), 1, atol=atol)
              and np.allclose(W.sum(1), 1, atol=atol))


def slem(W) -> float:
  """Second-largest eigenvalue modulus of a symmetric W."""
  ev = np.sort(np.abs(np.linalg.eigvalsh(np.asarray(W, np.float64))))
  return float(ev[-2]) if len(ev) > 1 else 0.0


def dense_np(topo) -> np.ndarray:
  """W from the table in numpy (no per-shape compile inside hypothesis loops)."""
  n = topo.num_nodes
  W = np.zeros((n, n), np.float64)
  np.add.at(W, (np.arange(n)[:, None], np.asarray(topo.idx)), np.asarray(topo.weights))
  return W


def to_nx(neighbours) -> nx.Graph:
  g = nx.Graph()
  g.add_nodes_from(range(len(neighbours)))
  g.add_edges_from((i, int(j)) for i, nb in enumerate(neighbours) for j in nb)
  return g


# ---------------------------------------------------------------- strategies


@st.composite
def kregular_graphs(draw):
  n = draw(st.integers(3, 40))
  k = draw(st.integers(2, n - 1).filter(lambda k: n * k % 2 == 0))
  return topology.kregular(n, k, draw(st.integers(0, 2**20)))


@st.composite
def erdos_renyi_graphs(draw):
  n = draw(st.integers(2, 40))
  p = draw(st.floats(0.3, 1.0))
  return topology.erdos_renyi(n, p, draw(st.integers(0, 2**20)))


@st.composite
def torus_graphs(draw):
  return topology.torus(draw(st.integers(3, 7)) * draw(st.integers(3, 7)))


graphs = st.one_of(
    kregular_graphs(),
    erdos_renyi_graphs(),
    st.integers(1, 40).map(topology.ring),
    torus_graphs(),
    st.integers(1, 70).map(topology.exponential),
)


# ------------------------------------------------------------------ topology


@SETTINGS
@given(graphs)
def test_metropolis_symmetric_doubly_stochastic_connected(nb):
  topo = topology.metropolis_hastings(nb)
  n = len(nb)
  assert topo.idx.shape == topo.weights.shape == (n, topo.degree)
  assert topo.idx.dtype == jnp.int32 and topo.weights.dtype == jnp.float32
  np.testing.assert_array_equal(topo.idx[:, 0], np.arange(n))  # slot 0 is self
  W = dense_np(topo)
  np.testing.assert_allclose(W, W.T, atol=1e-7)
  assert is_doubly_stochastic(W)
  # Edges carry 1 / (1 + max degree), exactly where the graph has edges.
  deg = np.array([len(x) for x in nb])
  for i in range(min(n, 5)):
    for j in nb[i]:
      assert W[i, j] == pytest.approx(1 / (1 + max(deg[i], deg[j])), rel=1e-6)
  assert (np.count_nonzero(W - np.diag(np.diag(W)), axis=1) == deg).all()
  # Connected: networkx agrees, and W mixes (SLEM < 1).
  assert nx.is_connected(to_nx(nb))
  assert topology.is_connected(nb)
  if n > 1:
    assert slem(W) < 1 - 1e-6


@pytest.mark.parametrize('n,k', [(3, 2), (10, 2), (50, 3), (16, 5), (12, 8), (12, 11), (2, 1)])
def test_kregular_degree_and_connected(n, k):
  nb = topology.kregular(n, k, seed=7)
  assert [len(x) for x in nb] == [k] * n
  g = to_nx(nb)
  assert nx.is_connected(g) and g.number_of_edges() == n * k // 2
  # Same seed, same graph.
  assert all((a == b).all() for a, b in zip(nb, topology.kregular(n, k, seed=7)))


def test_kregular_large_is_fast():
  t0 = time.perf_counter()
  topo = topology.build_topology('kregular', 10_000, degree=8, seed=1)
  assert time.perf_counter() - t0 < 10
  assert topo.degree == 9
  assert (np.asarray(topo.weights[:, 1:]) == np.float32(1 / 9)).all()


def test_builders_shapes():
  assert sorted(map(len, topology.torus(12))) == [4] * 12  # 3 x 4
  assert [len(x) for x in topology.ring(2)] == [1, 1]
  assert [len(x) for x in topology.exponential(8)] == [5] * 8  # +-1, +-2, 4
  assert [len(x) for x in topology.complete(5)] == [4] * 5
  for name in topology.TOPOLOGIES:
    topo = topology.build_topology(name, 16, degree=3, p=0.5)
    assert is_doubly_stochastic(topo.dense()), name
  np.testing.assert_allclose(topology.build_topology('complete', 7).dense(),
                             np.full((7, 7), 1 / 7), atol=1e-7)


def test_dense_under_jit():
  topo = topology.build_topology('ring', 6)
  np.testing.assert_array_equal(jax.jit(lambda t: t.dense())(topo), topo.dense())
  np.testing.assert_allclose(topo.dense(), dense_np(topo), atol=1e-7)


@pytest.mark.parametrize('n', [1, 2, 3, 5, 6, 7, 8, 12, 16, 33, 64])
def test_one_peer_exponential_doubly_stochastic_and_jittable(n):
  tau = max(1, math.ceil(math.log2(n)))
  chex.clear_trace_counter()  # the counter is keyed by code, shared across params

  @jax.jit
  @chex.assert_max_traces(n=1)
  def build(r):
    return topology.one_peer_exponential(n, r)

  for r in range(2 * tau + 1):
    topo = build(jnp.int32(r))
    assert topo.idx.shape == (n, 2)
    W = np.asarray(topo.dense())
    assert is_doubly_stochastic(W), (n, r)
    np.testing.assert_array_equal(W, topology.one_peer_exponential(n, r).dense())
    if n > 1:
      peers = (np.arange(n) + 2 ** (r % tau)) % n
      np.testing.assert_array_equal(topo.idx[:, 1], peers)


@pytest.mark.parametrize('n', [2, 4, 8, 16, 32])
@pytest.mark.parametrize('start', [0, 3])
def test_one_peer_exponential_exact_average_in_tau_rounds(n, start):
  tau = int(math.log2(n))
  P = np.eye(n)
  for r in range(start, start + tau):
    P = np.asarray(topology.one_peer_exponential(n, r).dense(), np.float64) @ P
  np.testing.assert_allclose(P, np.full((n, n), 1 / n), atol=1e-6)


@pytest.mark.parametrize('make,match', [
    (lambda: topology.kregular(5, 3), r'nodes\*degree even.*nodes=5, degree=3.*change --degree'),
    (lambda: topology.kregular(6, 6), r'degree < nodes.*lower --degree'),
    (lambda: topology.kregular(10, 1), r'raise --degree'),
    (lambda: topology.build_topology('kregular', 7, degree=3), r'nodes\*degree even'),
    (lambda: topology.build_topology('hypercube', 8), r"unknown topology 'hypercube'.*choose one of"),
    (lambda: topology.torus(7), r'torus.*nodes=7.*change --nodes'),
    (lambda: topology.build_topology('torus', 13), r'torus.*nodes=13.*change --nodes'),
    (lambda: topology.erdos_renyi(10, 0.0), r'p in \(0, 1\].*change --p'),
    (lambda: topology.erdos_renyi(200, 0.001), r'disconnected.*raise --p'),
    (lambda: topology.ring(0), r'nodes >= 1.*change --nodes'),
])
def test_bad_inputs_raise_topology_error(make, match):
  with pytest.raises(TopologyError, match=match) as info:
    make()
  msg = str(info.value)
  assert '\n' not in msg and ': ' in msg
  assert isinstance(info.value, ValueError)


# -------------------------------------------------------------------- mixing


def random_stacked(n, seed=0):
  """A params-like pytree stacked over n nodes (numpy draws: no per-shape compile)."""
  rng = np.random.default_rng(seed)
  return {
      'b': jnp.asarray(rng.normal(size=(n,)), jnp.float32),
      'dense': {'w': jnp.asarray(rng.normal(size=(n, 3, 4)), jnp.float32),
                'b': jnp.asarray(rng.normal(size=(n, 4)), jnp.float32)},
      'conv': jnp.asarray(rng.normal(size=(n, 2, 2, 1, 3)), jnp.bfloat16),
  }


TOPOS = {
    'ring7': lambda: topology.build_topology('ring', 7),
    'torus12': lambda: topology.build_topology('torus', 12),
    'kregular20': lambda: topology.build_topology('kregular', 20, degree=5, seed=3),
    'erdos_renyi15': lambda: topology.build_topology('erdos_renyi', 15, p=0.3, seed=1),
    'exponential10': lambda: topology.build_topology('exponential', 10),
    'complete6': lambda: topology.uniform_complete(6),
    'one_peer10': lambda: topology.one_peer_exponential(10, 3),
}


def assert_trees_close(a, b, atol=1e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(
      np.asarray(x, np.float32), np.asarray(y, np.float32),
      atol=atol if x.dtype == jnp.float32 else 3e-2), a, b)


@pytest.mark.parametrize('name', sorted(TOPOS))
def test_dense_equals_sparse(name):
  topo = TOPOS[name]()
  x = random_stacked(topo.num_nodes, seed=len(name))
  d = mix(topo, x, mode='dense')
  s = mix(topo, x, mode='sparse')
  assert_trees_close(d, s)
  assert_trees_close(mixing.mix(topo, x), d)  # eager, auto
  assert_trees_close(jax.jit(mixing.mix_sparse)(topo.idx, topo.weights, x), s)
  jax.tree.map(lambda a, b, c: (a.shape == b.shape == c.shape
                                and a.dtype == b.dtype == c.dtype) or pytest.fail('shape/dtype'),
               x, d, s)


@pytest.mark.parametrize('name', sorted(TOPOS))
@pytest.mark.parametrize('mode', ['dense', 'sparse'])
def test_mixing_keeps_node_average_and_consensus(name, mode):
  topo = TOPOS[name]()
  n = topo.num_nodes
  x = jax.tree.map(lambda l: l.astype(jnp.float32), random_stacked(n, seed=1))
  y = mix(topo, x, mode=mode)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a.mean(0), b.mean(0), atol=1e-5), x, y)
  same = jax.tree.map(lambda l: jnp.broadcast_to(l[:1], l.shape), x)  # every node node 0
  assert_trees_close(mix(topo, same, mode=mode), same, atol=1e-6)


def test_uniform_complete_is_fedavg():
  x = jax.tree.map(lambda l: l.astype(jnp.float32), random_stacked(9))
  for mode in ('dense', 'sparse'):
    y = mix(topology.uniform_complete(9), x, mode=mode)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        b, jnp.broadcast_to(a.mean(0), a.shape), atol=1e-6), x, y)


def test_auto_rule_and_bad_mode():
  assert mixing.use_dense(64, 5) and mixing.use_dense(1000, 300)
  assert not mixing.use_dense(256, 5)
  assert not mixing.use_dense(1024, 9)
  with pytest.raises(ValueError, match=r"unknown mixing mode 'fast'.*auto, dense, sparse"):
    mixing.mix(topology.uniform_complete(3), {'w': jnp.zeros((3, 2))}, 'fast')


@pytest.mark.parametrize('name', ['kregular20', 'exponential10', 'one_peer10'])
def test_renormalize(name):
  topo = TOPOS[name]()
  n = topo.num_nodes
  available = jax.random.bernoulli(jax.random.key(4), 0.6, (n,)).at[0].set(False).at[1].set(True)
  rt = jax.jit(mixing.renormalize)(topo, available)
  W = np.asarray(rt.dense(), np.float64)
  av = np.asarray(available)
  np.testing.assert_allclose(W.sum(1), 1, atol=1e-6)  # every row, live or not
  np.testing.assert_array_equal(W[~av], np.eye(n)[~av])  # offline rows are e_i
  off = W[np.ix_(av, ~av)]
  assert (off == 0).all()  # no live node takes an offline model
  assert (W >= 0).all()
  # Live nodes keep the weights of live neighbours.
  W0 = np.asarray(topo.dense(), np.float64)
  live = np.outer(av, av) & ~np.eye(n, dtype=bool)
  np.testing.assert_allclose(W[live], W0[live], atol=1e-7)
  x = random_stacked(n, seed=2)
  y = mix(rt, x, mode='sparse')
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[~av], b[~av]), x, y)
  if name != 'one_peer10':  # symmetric W stays symmetric, hence doubly stochastic
    np.testing.assert_allclose(W, W.T, atol=1e-7)
    assert is_doubly_stochastic(W)
