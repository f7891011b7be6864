"""Communication graphs for N nodes, stored as a sparse neighbour table.

A ``Topology`` holds, for every node, the ids of the nodes it averages with and
the mixing weights: ``idx[i, 0] == i`` (slot 0 is the node itself) and row ``i``
of the mixing matrix W is ``W[i, idx[i, s]] += weights[i, s]``. Unused slots
point at the node itself with weight 0, so a table of width ``k`` holds graphs of
any degree up to ``k - 1``. ``decsim.mixing`` applies it either as a dense
``W @ params`` or as ``k`` gathers.

Static graphs are built host-side (numpy / networkx / scipy) as neighbour lists
and turned into weights by the Metropolis-Hastings rule,
``w_ij = 1 / (1 + max(d_i, d_j))``, ``w_ii = 1 - sum_j w_ij``, which gives a
symmetric doubly stochastic W for any undirected graph:

  L. Xiao, S. Boyd. "Fast linear iterations for distributed averaging."
  Systems & Control Letters, 2004.

The static exponential graph (node i linked to i + 2^j mod n) is the one of

  X. Lian et al. "Can decentralized algorithms outperform centralized
  algorithms? A case study for decentralized parallel stochastic gradient
  descent." NeurIPS 2017.
  M. Assran et al. "Stochastic gradient push for distributed deep learning."
  ICML 2019.

and the time-varying one-peer exponential graph, the D-PSGD baseline of MoDeST,
is the one of

  B. Ying, K. Yuan, Y. Chen, H. Hu, P. Pan, W. Yin. "Exponential graph is
  provably efficient for decentralized deep training." NeurIPS 2021.

Graph builders return ``Neighbours``: a list of N sorted int arrays, entry ``i``
holding node i's neighbours (never i itself); the graph is undirected.
"""

import math
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
from flax import struct
from decsim.config import check
from decsim.errors import ConfigError

Neighbours = list[np.ndarray]  # N sorted int64 arrays, self excluded

TOPOLOGIES = ('ring', 'torus', 'kregular', 'erdos_renyi', 'exponential', 'complete')

_MAX_TRIES = 32  # resamples of a random graph before giving up on connectivity


class TopologyError(ConfigError):
  """A graph that cannot be built; the message names the problem and the fix."""


@struct.dataclass
class Topology:
  """Mixing weights as a neighbour table (see the module docstring)."""

  idx: jax.Array  # [N, k] int32 neighbour ids, slot 0 is the node itself
  weights: jax.Array  # [N, k] float32 mixing weights, rows sum to 1; unused slots 0

  @property
  def num_nodes(self) -> int:
    return self.idx.shape[0]

  @property
  def degree(self) -> int:
    """Slots per row, k: the largest degree plus one (the node itself)."""
    return self.idx.shape[1]

  def dense(self) -> jax.Array:
    """The mixing matrix W ``[N, N]``; a scatter-add, so it works under jit."""
    n, k = self.idx.shape
    rows = jnp.broadcast_to(jnp.arange(n)[:, None], (n, k))  # [N, k]
    w = jnp.zeros((n, n), self.weights.dtype)
    return w.at[rows, self.idx].add(self.weights)  # [N, N]


# ------------------------------------------------------------------ helpers


def _check_nodes(name: str, n: int, minimum: int = 1) -> None:
  if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < minimum:
    raise TopologyError(f'{name} graph needs an integer number of nodes >= {minimum}; '
                        f'got nodes={n!r}: change --nodes')


def _undirected(n: int, edges: np.ndarray) -> np.ndarray:
  """Both directions of every edge, deduplicated, no self loops, sorted ``[E, 2]``."""
  src, dst = edges[:, 0], edges[:, 1]
  loop = src == dst
  src, dst = src[~loop], dst[~loop]
  keys = np.unique(np.concatenate([src * n + dst, dst * n + src]))  # 1-D: fast
  return np.stack([keys // n, keys % n], 1)


def _neighbours_from_edges(n: int, edges: np.ndarray) -> Neighbours:
  """Undirected, deduplicated, self-loop-free neighbour lists from edges ``[E, 2]``."""
  edges = np.asarray(edges, np.int64).reshape(-1, 2)  # [E, 2]
  both = _undirected(n, edges)  # [E', 2] sorted by (src, dst)
  counts = np.bincount(both[:, 0], minlength=n)  # [N]
  return np.split(both[:, 1], np.cumsum(counts)[:-1])


def _edges_from_neighbours(neighbours: Sequence[Iterable[int]]) -> tuple[int, np.ndarray]:
  """``(n, directed edges [E, 2])`` with both directions, deduplicated, no self loops."""
  n = len(neighbours)
  cols = [np.asarray(sorted(nb) if isinstance(nb, (set, frozenset)) else nb,
                     np.int64).reshape(-1) for nb in neighbours]
  lens = np.array([len(c) for c in cols], np.int64)  # [N]
  src = np.repeat(np.arange(n, dtype=np.int64), lens)
  dst = np.concatenate(cols) if n else np.zeros(0, np.int64)
  if dst.size and (dst.min() < 0 or dst.max() >= n):
    raise TopologyError(f'neighbour ids must lie in [0, {n}); got ids in '
                        f'[{dst.min()}, {dst.max()}]: fix the neighbour lists')
  return n, _undirected(n, np.stack([src, dst], 1))


def _connected(n: int, edges: np.ndarray) -> bool:
  if n <= 1:
    return True
  edges = np.asarray(edges, np.int64).reshape(-1, 2)
  adj = scipy.sparse.coo_matrix(
      (np.ones(len(edges), np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
  n_comp, _ = scipy.sparse.csgraph.connected_components(adj, directed=False)
  return n_comp == 1


def is_connected(neighbours: Sequence[Iterable[int]]) -> bool:
  """Whether the undirected graph given by neighbour lists is connected."""
  n, edges = _edges_from_neighbours(neighbours)
  return _connected(n, edges)


# ------------------------------------------------------------ graph builders


def ring(n: int) -> Neighbours:
  """Cycle 0-1-...-(n-1)-0 (a single edge for n=2)."""
  _check_nodes('ring', n)
  i = np.arange(n)
  return _neighbours_from_edges(n, np.stack([i, (i + 1) % n], 1))


def _torus_shape(n: int) -> tuple[int, int] | None:
  for r in range(math.isqrt(n), 2, -1):
    if n % r == 0 and n // r >= 3:
      return r, n // r
  return None


def torus(n: int) -> Neighbours:
  """2-D wrap-around grid of r x c nodes, r <= c, r and c >= 3, as square as n allows."""
  _check_nodes('torus', n)
  shape = _torus_shape(n)
  if shape is None:
    ok = [m for m in range(max(9, n - 16), n + 17) if _torus_shape(m)]
    near = ', '.join(str(m) for m in sorted(ok, key=lambda m: abs(m - n))[:3])
    raise TopologyError(f'torus graph needs nodes = rows*cols with rows, cols >= 3; got '
                        f'nodes={n}: change --nodes (e.g. {near}) or use another topology')
  r, c = shape
  i = np.arange(n)
  row, col = i // c, i % c
  right = row * c + (col + 1) % c
  down = ((row + 1) % r) * c + col
  return _neighbours_from_edges(n, np.concatenate([np.stack([i, right], 1),
                                                   np.stack([i, down], 1)]))


def _seeds(seed: int):
  """The seed itself, then a reproducible stream of fresh seeds for resampling."""
  yield int(seed)
  rng = np.random.default_rng(seed)
  while True:
    yield int(rng.integers(2**31 - 1))


def kregular(n: int, k: int, seed: int = 0) -> Neighbours:
  """A uniformly random connected k-regular graph (resampled until connected).

  k = 2 draws a random Hamiltonian cycle directly (a random 2-regular graph is
  almost never connected for large n); k > (n-1)/2 draws the complement of a
  random (n-1-k)-regular graph, which is uniform too and much faster.
  """
  _check_nodes('kregular', n)
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
    raise TopologyError(f'k-regular graph needs an integer degree >= 0; got degree={k!r}: '
                        'change --degree')
  if k >= n:
    raise TopologyError(f'k-regular graph needs degree < nodes; got nodes={n}, degree={k}: '
                        f'lower --degree to at most {n - 1} or raise --nodes')
  if n > 2 and k < 2:
    raise TopologyError(f'k-regular graph with degree {k} is disconnected for nodes={n} > 2: '
                        'raise --degree to at least 2')
  if (n * k) % 2:
    raise TopologyError(f'k-regular graph needs nodes*degree even; got nodes={n}, '
                        f'degree={k}: change --degree or --nodes')
  if n == 1:
    return [np.zeros(0, np.int64)]
  if k == n - 1:
    return complete(n)
  seeds = _seeds(seed)
  for _ in range(_MAX_TRIES):
    s = next(seeds)
    if k == 2:
      perm = np.random.default_rng(s).permutation(n)
      edges = np.stack([perm, np.roll(perm, -1)], 1)
    elif k > (n - 1) // 2:
      g = nx.random_regular_graph(n - 1 - k, n, seed=s)
      adj = np.ones((n, n), bool)
      np.fill_diagonal(adj, False)
      e = np.asarray(g.edges(), np.int64).reshape(-1, 2)
      adj[e[:, 0], e[:, 1]] = adj[e[:, 1], e[:, 0]] = False
      edges = np.argwhere(np.triu(adj))
    else:
      g = nx.random_regular_graph(k, n, seed=s)
      edges = np.asarray(g.edges(), np.int64).reshape(-1, 2)
    if _connected(n, edges):
      return _neighbours_from_edges(n, edges)
  raise TopologyError(f'k-regular graph with nodes={n}, degree={k} was disconnected in '
                      f'{_MAX_TRIES} draws: raise --degree')


def erdos_renyi(n: int, p: float, seed: int = 0) -> Neighbours:
  """G(n, p), each pair linked with probability p, resampled until connected.

  Drawn with geometric skips over the n*n cells (keeping i < j), so the cost is
  O(n^2 p), vectorised.
  """
  _check_nodes('erdos_renyi', n)
  if not 0.0 < p <= 1.0:
    raise TopologyError(f'erdos_renyi graph needs edge probability p in (0, 1]; got p={p}: '
                        'change --p')
  if n == 1:
    return [np.zeros(0, np.int64)]
  cells = n * n
  seeds = _seeds(seed)
  for _ in range(_MAX_TRIES):
    rng = np.random.default_rng(next(seeds))
    if p == 1.0:
      pos = np.arange(cells, dtype=np.int64)
    else:
      # Enough geometric gaps to pass the end with overwhelming probability.
      mean = cells * p
      draws = int(mean + 8 * math.sqrt(mean) + 16)
      pos = np.cumsum(rng.geometric(p, size=draws).astype(np.int64)) - 1
      while pos[-1] < cells:
        more = np.cumsum(rng.geometric(p, size=draws).astype(np.int64)) + pos[-1]
        pos = np.concatenate([pos, more])
      pos = pos[pos < cells]
    i, j = pos // n, pos % n
    edges = np.stack([i, j], 1)[i < j]
    if _connected(n, edges):
      return _neighbours_from_edges(n, edges)
  hint = math.log(n) / n
  raise TopologyError(f'erdos_renyi graph with nodes={n}, p={p} was disconnected in '
                      f'{_MAX_TRIES} draws: raise --p above ln(nodes)/nodes = {hint:.3g}')


def exponential(n: int) -> Neighbours:
  """Static exponential graph: i linked to (i + 2^j) mod n, j = 0..floor(log2(n-1)).

  Undirected version (each link also taken backwards), so degrees are at most
  2 * (floor(log2(n-1)) + 1).
  """
  _check_nodes('exponential', n)
  if n == 1:
    return [np.zeros(0, np.int64)]
  hops = 2 ** np.arange(int(math.floor(math.log2(n - 1))) + 1)  # [J]
  i = np.repeat(np.arange(n), len(hops))
  j = (i + np.tile(hops, n)) % n
  return _neighbours_from_edges(n, np.stack([i, j], 1))


def complete(n: int) -> Neighbours:
  """Every pair of nodes linked."""
  _check_nodes('complete', n)
  all_ids = np.arange(n, dtype=np.int64)
  return [np.delete(all_ids, i) for i in range(n)]


# ----------------------------------------------------------------- weights


def metropolis_hastings(neighbours: Sequence[Iterable[int]]) -> Topology:
  """Metropolis-Hastings weights of an undirected graph (Xiao & Boyd 2004).

  ``w_ij = 1 / (1 + max(d_i, d_j))`` on edges, ``w_ii = 1 - sum_j w_ij``: W is
  symmetric and doubly stochastic. ``neighbours[i]`` lists node i's neighbours
  (arrays, lists or sets); the graph is made undirected and self loops dropped.
  The table has ``k = 1 + max degree`` slots.
  """
  n, edges = _edges_from_neighbours(neighbours)
  if n == 0:
    raise TopologyError('metropolis_hastings needs at least one node; got 0: '
                        'pass one neighbour list per node')
  src, dst = edges[:, 0], edges[:, 1]  # sorted by src
  deg = np.bincount(src, minlength=n)  # [N]
  k = 1 + int(deg.max(initial=0))
  w_edge = 1.0 / (1.0 + np.maximum(deg[src], deg[dst]))  # [E] float64
  start = np.concatenate([[0], np.cumsum(deg)[:-1]])  # [N]
  slot = 1 + np.arange(len(src)) - start[src]  # [E]
  idx = np.repeat(np.arange(n, dtype=np.int64)[:, None], k, 1)  # [N, k]
  w = np.zeros((n, k))  # [N, k]
  idx[src, slot] = dst
  w[src, slot] = w_edge
  w[:, 0] = 1.0 - w[:, 1:].sum(1)
  return Topology(idx=jnp.asarray(idx, jnp.int32), weights=jnp.asarray(w, jnp.float32))


def uniform_complete(n: int) -> Topology:
  """W = J/n: every node averages all n models with weight 1/n (exact FedAvg)."""
  _check_nodes('complete', n)
  i = np.arange(n)
  idx = (i[:, None] + i[None, :]) % n  # [N, N], slot 0 is self
  return Topology(idx=jnp.asarray(idx, jnp.int32),
                  weights=jnp.full((n, n), 1.0 / n, jnp.float32))


def one_peer_exponential(n: int, round_: jax.Array | int) -> Topology:
  """Time-varying one-peer exponential graph of Ying et al. (2021); jittable in ``round_``.

  With ``tau = ceil(log2 n)`` and ``s = 2^(round_ mod tau)``, node i averages its
  model with that of node ``(i + s) mod n``, weights 1/2 and 1/2 (row i of W has
  1/2 at i and at i + s, as in the paper). Since ``i -> i + s mod n`` is a
  permutation for every n, W = (I + P_s) / 2 is doubly stochastic for every n,
  not only powers of two (columns: node j's model reaches j and j - s). In
  message terms node i *sends* to ``(i - s) mod n``. For n a power of two the
  product of tau consecutive W's is exactly J/n. ``idx`` is ``[N, 2]``.
  """
  _check_nodes('one_peer_exponential', n)
  tau = max(1, math.ceil(math.log2(n)))  # n = 1: one shift of 1 mod 1 = self
  r = jnp.asarray(round_, jnp.int32)
  shift = jnp.left_shift(jnp.int32(1), r % tau)  # [] int32, 2^(r mod tau) < n
  i = jnp.arange(n, dtype=jnp.int32)
  idx = jnp.stack([i, (i + shift) % n], 1)  # [N, 2]
  return Topology(idx=idx, weights=jnp.full((n, 2), 0.5, jnp.float32))


def build_topology(name: str, nodes: int, *, degree: int = 4, p: float = 0.1,
                   seed: int = 0) -> Topology:
  """A static topology by name, Metropolis-Hastings weighted.

  ``degree`` is used by 'kregular' and ``p`` by 'erdos_renyi'; ``seed`` by both.
  'complete' gives W = J/n exactly. The time-varying one-peer exponential graph
  is not here: it depends on the round, see ``one_peer_exponential``.
  """
  if name not in TOPOLOGIES:
    raise TopologyError(f'unknown topology {name!r}: choose one of {", ".join(TOPOLOGIES)}')
  if name == 'complete':
    return uniform_complete(nodes)
  if name == 'ring':
    nb = ring(nodes)
  elif name == 'torus':
    nb = torus(nodes)
  elif name == 'kregular':
    nb = kregular(nodes, degree, seed)
  elif name == 'erdos_renyi':
    nb = erdos_renyi(nodes, p, seed)
  else:
    nb = exponential(nodes)
  if not is_connected(nb):
    raise TopologyError(f'{name} graph with nodes={nodes} is disconnected: '
                        'change --topology or its parameters')
  return metropolis_hastings(nb)


def check_graph(c) -> None:
  """The graph checks of a decentralized protocol on the whole experiment config."""
  check(c.nodes >= 2, f'--protocol={c.protocol} needs --nodes >= 2')
  if c.topology == 'kregular':
    check(c.degree < c.nodes,
          f'--degree={c.degree} must be in 1..{c.nodes - 1} (below --nodes): lower --degree')
    check(c.nodes * c.degree % 2 == 0,
          f'--nodes={c.nodes} x --degree={c.degree} is odd: a k-regular graph needs an even '
          'product; change --degree or --nodes')


def from_config(c, seed: int):
  """The graph of ``--topology`` drawn with ``seed`` (a function of the round for
  one_peer_exponential)."""
  if c.topology == 'one_peer_exponential':
    return lambda r: one_peer_exponential(c.nodes, r)
  return build_topology(c.topology, c.nodes, degree=c.degree, p=c.edge_probability, seed=seed)
