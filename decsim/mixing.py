"""Averaging operators on stacked pytrees: every leaf has a leading node axis N.

One D-PSGD / gossip averaging step replaces node i's model by
``sum_j W_ij x_j`` (Lian et al., NeurIPS 2017). It has two forms:

* dense, ``W @ X`` with ``X`` the leaf flattened to ``[N, P]``: O(N^2 P), best
  for small N or dense graphs, where one matmul beats k gathers;
* sparse, ``sum_s w[:, s] * X[idx[:, s]]`` over the k slots of a
  ``decsim.topology.Topology``: O(N k P), the only option for large N.

``mix`` picks one from the table's shape; ``renormalize`` adapts a topology to
the nodes that are online (churn).

Variance correction (later issue). Averaging uncorrelated models shrinks each
layer's weight variance and with it the initialisation scale; Tian et al.
(2024, "Vanishing variance in gossip learning") rescale every layer about its
mean after averaging so its variance equals the mean variance of the models
averaged. That is an operator composed *after* any of the operators here (and
after MoDeST / FedAvg aggregation): ``corrected = correct(mix(topo, x), x, topo)``.
It arrives in a later issue and is deliberately not implemented here.
"""

import jax
import jax.numpy as jnp

from decsim.topology import Topology
from decsim.types import Stacked

MODES = ('auto', 'dense', 'sparse')

# ``auto`` uses the dense form up to DENSE_MAX_NODES nodes, or when k > N / 8.
# Dense costs ~N^2 P multiply-adds in one matmul; sparse ~N k P plus k gathers,
# each a pass over memory, so the crossover width k* grows linearly with N.
# Measured on the 2-core CPU dev box (jit, float32, P = 100_000 per node, min of
# 3-5 runs, compile excluded; seconds):
#   N=64   k=4    dense 0.0037  sparse 0.0060
#   N=128  k=4    dense 0.023   sparse 0.014
#   N=256  k=4    dense 0.070   sparse 0.030
#   N=256  k=16   dense 0.069   sparse 0.051
#   N=256  k=64   dense 0.069   sparse 0.27
#   N=1024 k=4    dense 0.79    sparse 0.14
#   N=1024 k=32   dense 0.80    sparse 0.50
# i.e. dense wins below N ~ 100 and for k above ~N/12 .. N/8. Accelerators favour
# the matmul more; re-time there (benchmarks/) and override with mode=.
DENSE_MAX_NODES = 96


def mix_dense(W: jax.Array, stacked: Stacked) -> Stacked:
  """``W @ X`` for every leaf X ``[N, ...]``; output keeps each leaf's dtype.

  Computed at HIGHEST precision so that float32 parameters are not rounded to
  TF32 on GPUs (an averaging step must not add noise of its own).
  """

  def one(x):
    n = x.shape[0]
    flat = x.reshape(n, -1)  # [N, P]
    dt = jnp.promote_types(W.dtype, x.dtype)
    out = jnp.matmul(W.astype(dt), flat.astype(dt),
                     precision=jax.lax.Precision.HIGHEST)  # [N, N] x [N, P]
    return out.reshape(x.shape).astype(x.dtype)

  return jax.tree.map(one, stacked)


def mix_sparse(idx: jax.Array, weights: jax.Array, stacked: Stacked) -> Stacked:
  """``sum_s weights[:, s] * X[idx[:, s]]`` for every leaf X ``[N, ...]``.

  Accumulated slot by slot (k is static and small) rather than as one gather
  ``[N, k, P]``: that measured 3.4x slower at N = 1024, k = 4, P = 1e5 on CPU
  (0.47 s vs 0.14 s), and 6x slower with 1.7x the memory at N = 4000.
  Accumulates in the promoted dtype of weights and leaf, returns the leaf dtype.
  """
  k = idx.shape[1]

  def one(x):
    dt = jnp.promote_types(weights.dtype, x.dtype)
    bcast = (-1,) + (1,) * (x.ndim - 1)
    acc = weights[:, 0].astype(dt).reshape(bcast) * x[idx[:, 0]].astype(dt)  # [N, ...]
    for s in range(1, k):
      acc = acc + weights[:, s].astype(dt).reshape(bcast) * x[idx[:, s]].astype(dt)
    return acc.astype(x.dtype)

  return jax.tree.map(one, stacked)


def use_dense(num_nodes: int, k: int) -> bool:
  """The ``auto`` rule: dense for small N (one matmul beats k passes over memory)
  or for wide tables (k > N / 8, where k gathers cost more than the matmul)."""
  return num_nodes <= DENSE_MAX_NODES or k > num_nodes / 8


def mix(topology: Topology, stacked: Stacked, mode: str = 'auto') -> Stacked:
  """Average every node's model with its neighbours' by ``topology``'s weights.

  ``mode`` is 'dense', 'sparse', or 'auto' (see ``use_dense``); the choice is
  made from static shapes, so it costs nothing under jit.
  """
  if mode not in MODES:
    raise ValueError(f'unknown mixing mode {mode!r}: use one of {", ".join(MODES)}')
  n, k = topology.idx.shape
  if mode == 'dense' or (mode == 'auto' and use_dense(n, k)):
    return mix_dense(topology.dense(), stacked)
  return mix_sparse(topology.idx, topology.weights, stacked)


def renormalize(topology: Topology, available: jax.Array) -> Topology:
  """Drop offline nodes from the averaging; jittable.

  ``available`` is ``[N] bool``. A live node zeroes the weights of its offline
  neighbours and adds that mass to its own (slot 0), so its row still sums to 1;
  an offline node's row becomes e_i (it keeps its model). An entry survives only
  if both ends are live, so a symmetric W (Metropolis-Hastings) stays symmetric
  and therefore doubly stochastic.
  """
  idx, w = topology.idx, topology.weights  # [N, k]
  keep = available[idx] & available[:, None]  # [N, k]
  kept = jnp.where(keep, w, 0.0)  # [N, k]
  lost = jnp.sum(jnp.where(keep, 0.0, w), axis=1)  # [N]
  self_w = jnp.where(available, kept[:, 0] + lost, 1.0)  # [N]
  return topology.replace(weights=kept.at[:, 0].set(self_w.astype(w.dtype)))
