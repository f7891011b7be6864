"""Averaging operators on stacked pytrees: every leaf has a leading node axis N.

One D-PSGD / gossip averaging step replaces node i's model by
``sum_j W_ij x_j`` (Lian et al., NeurIPS 2017). It has two forms:

* dense, ``W @ X`` with ``X`` the leaf flattened to ``[N, P]``: O(N^2 P), best
  for small N or dense graphs, where one matmul beats k gathers;
* sparse, ``sum_s w[:, s] * X[idx[:, s]]`` over the k slots of a
  ``decsim.topology.Topology``: O(N k P), the only option for large N.

``mix`` picks one from the table's shape; ``renormalize`` adapts a topology to
the nodes that are online (churn).

Variance correction (Tian et al., 2024, "Vanishing Variance Problem in Fully
Decentralized Neural-Network Systems"). Averaging k uncorrelated models shrinks
each layer's weight variance by about 1/k and with it the Xavier scale; the fix
rescales every layer about its mean after averaging so that its variance equals
a target, by default the mean variance of the models that were averaged. It is
an operator composed *after* any averaging step (D-PSGD mix, gossip merge,
FedAvg aggregation): ``variance_correct(mixed, target, VarianceCorrection())``
with the target computed by mixing the per-node per-layer variances
(``layer_variance``, one ``[N]`` vector per leaf) with the same operator.
"""

import dataclasses

import jax
import jax.numpy as jnp

from decsim.topology import Topology
from decsim.types import Params, Stacked

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


# ------------------------------------------------------- variance correction

VC_TARGETS = ('received', 'follow_beta', 'self')


@dataclasses.dataclass(frozen=True)
class VarianceCorrection:
  """How ``variance_correct`` rescales (Tian et al. 2024).

  ``target``: 'received' (plain mean of the variances of the models averaged, the
  authors' default), 'follow_beta' (their mean weighted like the models were),
  'self' (the node's own variance before averaging). ``unbiased``: variance with
  ddof=1 instead of the population variance. ``epsilon``: floor of the current
  variance in the scale factor. ``ratio``: partial correction, the std moves
  ``ratio`` of the way to the target std (1: all of it, 0: no-op). ``biases``:
  correct bias vectors too (weight tensors, ndim >= 2, always; normalisation
  scales, biases and statistics never).
  """

  target: str = 'received'
  unbiased: bool = False
  epsilon: float = 1e-12
  ratio: float = 1.0
  biases: bool = False


_NORM_LEAVES = ('scale', 'mean', 'var')  # normalisation scale and running statistics


def correctable(params: Params, biases: bool = False) -> Params:
  """A pytree of bools like ``params``: which leaves variance correction touches.

  Weight tensors (ndim >= 2 per model) always; 1-D bias vectors when ``biases``;
  anything under a normalisation layer (a path component containing 'norm',
  e.g. flax's ``GroupNorm_0``, or 'batch_stats') or a leaf named scale, mean or
  var never. The rule reads names only, so one model or a stacked pytree give
  the same answer.
  """

  def one(path, leaf):
    del leaf
    names = [str(getattr(k, 'key', getattr(k, 'name', k))).lower() for k in path]
    if any('norm' in part or part == 'batch_stats' for part in names):
      return False
    if names and names[-1] in _NORM_LEAVES:
      return False
    if names and names[-1] == 'bias':
      return biases
    return True

  return jax.tree_util.tree_map_with_path(one, params)


def layer_names(params: Params) -> list[str]:
  """'Module/leaf' names of the leaves of ``params``, in ``jax.tree.leaves`` order."""
  paths = jax.tree_util.tree_flatten_with_path(params)[0]
  return ['/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)
          for path, _ in paths]


def layer_variance(stacked: Stacked, unbiased: bool = False) -> Stacked:
  """Per-node variance of every leaf's entries: leaves ``[N, ...]`` -> ``[N]``."""

  def one(x):
    flat = x.reshape(x.shape[0], -1).astype(jnp.float32)  # [N, P]
    ddof = 1 if unbiased and flat.shape[1] > 1 else 0
    return jnp.var(flat, axis=1, ddof=ddof)  # [N]

  return jax.tree.map(one, stacked)


def variance_correct(stacked: Stacked, target: Stacked, vc: VarianceCorrection = VarianceCorrection(),
                     where: jax.Array | None = None) -> Stacked:
  """Rescales each corrected leaf of each node about its mean to variance ``target``.

  ``target`` has one ``[N]`` vector per leaf (see ``correction_target``);
  ``where`` (``[N] bool``) limits the correction to some nodes (e.g. those that
  averaged this round). With ``ratio == 1`` and a current variance above
  ``epsilon`` the corrected leaf has exactly the target variance (up to float
  rounding) and the same mean: ``x' = m + s (x - m)``, ``s = sqrt(t / v)``.
  """
  mask = correctable(jax.tree.map(lambda x: x[0], stacked), vc.biases)
  ddof = 1 if vc.unbiased else 0

  def one(x, t, do):
    if not do:
      return x
    flat = x.reshape(x.shape[0], -1).astype(jnp.float32)  # [N, P]
    mean = jnp.mean(flat, axis=1, keepdims=True)  # [N, 1]
    var = jnp.var(flat, axis=1, ddof=ddof if flat.shape[1] > 1 else 0)  # [N]
    scale = jnp.sqrt(jnp.maximum(t, 0.0) / jnp.maximum(var, vc.epsilon))  # [N]
    scale = 1.0 + vc.ratio * (scale - 1.0)
    if where is not None:
      scale = jnp.where(where, scale, 1.0)
    out = mean + scale[:, None] * (flat - mean)
    if where is not None:  # untouched rows stay bitwise equal
      out = jnp.where(where[:, None], out, flat)
    return out.reshape(x.shape).astype(x.dtype)

  return jax.tree.map(one, stacked, target, mask)


def correction_target(vc: VarianceCorrection, own: Stacked, plain: Stacked,
                      weighted: Stacked) -> Stacked:
  """Picks the target variances ``[N]`` per leaf: the node's own ('self'), the
  plain mean over the models averaged ('received') or their weighted mean
  ('follow_beta'); the caller computes the means with its averaging operator."""
  if vc.target not in VC_TARGETS:
    raise ValueError(f'unknown variance correction target {vc.target!r}: choose one of '
                     f'{", ".join(VC_TARGETS)}')
  return {'self': own, 'received': plain, 'follow_beta': weighted}[vc.target]


def received_target(vc: VarianceCorrection, own: Stacked, received: Stacked,
                    count: jax.Array | None = None, *, weighted: Stacked | None = None,
                    weight: jax.Array | None = None, own_weight: jax.Array | None = None,
                    own_share: float | None = None) -> Stacked:
  """The variance-correction target ``[R]`` per leaf of R averaging nodes, for every
  averaging operator (Tian et al. 2024): D-PSGD's mix, the gossip merges, FedAvg's
  server average and MoDeST's aggregators.

  ``received``: per leaf ``[R]`` the sum of the layer variances of the models each
  node averaged, over ``count [R]`` models; with ``count=None`` it is already their
  plain mean (an operator that normalises its own weights). ``weighted`` / ``weight``:
  the same for the merge weights c_j, ``sum_j c_j var_j`` over ``sum_j c_j``
  (``weight=None``: already the weighted mean; ``weighted=None``: the merge is
  unweighted and 'follow_beta' equals 'received').

  The node's own model ``own`` (its variances ``[R]`` per leaf) is one of those
  averaged when ``own_weight`` or ``own_share`` is given: the plain mean is then
  ``(own + sum) / (1 + count)``; ``own_weight [R]`` joins the weighted sums with
  weight ``own_weight`` (age-weighted merge, guarded: no weight at all gives the
  plain mean); ``own_share`` w gives ``w own + (1 - w) mean(received)`` (a merge
  with a fixed self weight, gossip's half and beta). ``vc.target == 'self'``
  returns ``own``.
  """
  with_own = own_weight is not None or own_share is not None
  if count is None:
    plain = received
  else:
    cnt = jnp.maximum(count, 1).astype(jnp.float32)  # [R]
    if with_own:
      plain = jax.tree.map(lambda v, s: (v + s) / (1.0 + cnt), own, received)
    else:
      plain = jax.tree.map(lambda s: s / cnt, received)
  if own_share is not None:
    w = own_share
    follow = jax.tree.map(lambda v, s: w * v + (1 - w) * s / cnt, own, received)
  elif weighted is None:
    follow = plain
  elif weight is None:
    follow = weighted
  else:
    follow = _weighted_mean(own, weighted, weight, own_weight, plain)
  return correction_target(vc, own, plain, follow)


def received_only_target(vc: VarianceCorrection, own: Stacked, merged: Stacked,
                         received: Stacked, count: jax.Array, beta: float) -> Stacked:
  """DFL2's target ``[R]`` per leaf after ``beta self + (1 - beta) mean(received)``
  (``train_average_standard`` in the authors' ``simulator_opti_model_update.hpp``):
  'received' (their ``others``) the mean variance of the ``count [R]`` received models
  (``received``: their sum), the own model excluded; 'follow_beta' ``beta var(merged) +
  (1 - beta) others``, ``merged`` being the merged model's variances; 'self' the own
  variance before merging, ``own`` (their ``train_50_average_50_fix_variance_self``;
  their ``self`` method, the merged model's own variance, is a no-op: no correction)."""
  cnt = jnp.maximum(count, 1).astype(jnp.float32)  # [R]
  others = jax.tree.map(lambda s: s / cnt, received)
  follow = jax.tree.map(lambda m, o: beta * m + (1.0 - beta) * o, merged, others)
  return correction_target(vc, own, others, follow)


def _weighted_mean(own: Stacked, weighted: Stacked, weight: jax.Array,
                   own_weight: jax.Array | None, fallback: Stacked) -> Stacked:
  """``(a own + sum_j c_j var_j) / (a + sum_j c_j)`` per leaf ``[R]`` (a = ``own_weight``,
  or no own term); ``fallback`` where the total weight is not positive."""
  total = weight if own_weight is None else own_weight + weight  # [R]
  safe = jnp.where(total > 0, total, 1.0)

  def one(v, s, p):
    num = s if own_weight is None else own_weight * v + s
    return jnp.where(total > 0, num / safe, p)

  return jax.tree.map(one, own, weighted, fallback)


def plain_weights(topology: Topology) -> Topology:
  """The same graph with every positive weight of a row replaced by 1/(their count):
  the unweighted mean over the models a node averages ('received' target)."""
  pos = (topology.weights > 0).astype(topology.weights.dtype)  # [N, k]
  return topology.replace(weights=pos / jnp.maximum(jnp.sum(pos, axis=1, keepdims=True), 1.0))


def mix_corrected(topology: Topology, stacked: Stacked, vc: VarianceCorrection | None,
                  mode: str = 'auto', where: jax.Array | None = None) -> Stacked:
  """``mix`` followed by variance correction (``vc=None``: plain ``mix``).

  The target is computed with the same operator on the per-node per-layer
  variances (``[N]`` per leaf, so mixing them costs next to nothing).
  """
  mixed = mix(topology, stacked, mode)
  if vc is None:
    return mixed
  var = layer_variance(stacked, vc.unbiased)  # [N] per leaf
  target = received_target(vc, var, mix(plain_weights(topology), var, mode),
                           weighted=mix(topology, var, mode))
  return variance_correct(mixed, target, vc, where)
