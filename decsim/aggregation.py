"""Server-side aggregation rules and server optimizers for FedAvg, and the merge
operator type of D-PSGD.

Aggregators turn the ``s`` client models a server received into one model:

* ``mean``: the weighted mean of FedAvg (McMahan et al., AISTATS 2017);
* ``median``: the coordinate-wise median, and ``trimmed_mean``: the
  coordinate-wise beta-trimmed mean (Yin et al., "Byzantine-Robust Distributed
  Learning: Towards Optimal Statistical Rates", ICML 2018). Both are unweighted
  and tolerate a fraction of arbitrary (Byzantine) client models.

Shapes are static under jit, so a round always hands over ``s`` rows; a row of
weight 0 was not received or not accepted and is ignored, whatever it holds.

Server optimizers (Reddi et al., "Adaptive Federated Optimization", ICLR 2021)
treat ``global - aggregate`` as a pseudo-gradient and step the global model with
an optax transformation: FedAvg is server SGD with learning rate 1, FedAvgM adds
momentum, FedAdam / FedYogi / FedAdagrad are the adaptive ones.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from decsim import mixing
from decsim.protocols.base import weighted_average
from decsim.topology import Topology
from decsim.types import Params, Stacked

AggState = Any  # an aggregator's server-side pytree; () when it keeps none
AGGREGATORS = ('mean', 'median', 'trimmed_mean')
SERVER_OPTIMIZERS = ('sgd', 'momentum', 'adam', 'yogi', 'adagrad')

MergeFn = Callable[[Topology, Stacked, jax.Array], Stacked]
"""D-PSGD's merge rule ``merge(graph, params, alive) -> params``.

``graph`` is the round's topology already renormalised to the live nodes,
``params`` the N trained models (leaves ``[N, ...]``) and ``alive`` ``[N]`` bool
the nodes online this round; it returns the N models after merging. Rows of
offline nodes must come back unchanged.
"""


class Aggregator(NamedTuple):
  """``apply(models, weights, state) -> (aggregate, state)`` with ``models``
  leaves ``[s, ...]`` and ``weights`` ``[s]`` float32 >= 0 (0: not received).

  With no positive weight the aggregate is undefined (NaN or inf); callers keep
  the old model then, as FedAvg does.
  """

  init: Callable[[Params], AggState]  # from the initial global model
  apply: Callable[[Stacked, jax.Array, AggState], tuple[Params, AggState]]


def mean() -> Aggregator:
  """The weighted mean ``sum_i w_i x_i / sum_i w_i``: ``base.weighted_average``
  on the rows with weight > 0 (the others are zeroed first, so an inf or NaN
  there cannot leak in through ``0 * inf``; finite rows give bitwise
  ``weighted_average``'s result)."""

  def apply(models: Stacked, weights: jax.Array, state: AggState) -> tuple[Params, AggState]:
    kept = jax.tree.map(lambda x: jnp.where(_rows(weights > 0, x), x, 0), models)  # [s, ...]
    return weighted_average(kept, weights), state

  return Aggregator(lambda params: (), apply)


def median() -> Aggregator:
  """Coordinate-wise median of the rows with weight > 0, unweighted; for an even
  count the mean of the two middle values."""

  def apply(models: Stacked, weights: jax.Array, state: AggState) -> tuple[Params, AggState]:
    return jax.tree.map(lambda x: _masked_median(x, weights > 0), models), state

  return Aggregator(lambda params: (), apply)


def trimmed_mean(trim_fraction: float) -> Aggregator:
  """Per coordinate, drop the floor(trim_fraction * n) smallest and largest of the
  n rows with weight > 0 and average the rest, unweighted (Yin et al., ICML 2018)."""
  if not 0 <= trim_fraction < 0.5:
    raise ValueError(f'--trim_fraction={trim_fraction} must be in [0, 0.5)')

  def apply(models: Stacked, weights: jax.Array, state: AggState) -> tuple[Params, AggState]:
    valid = weights > 0  # [s]
    return jax.tree.map(lambda x: _masked_trimmed_mean(x, valid, trim_fraction), models), state

  return Aggregator(lambda params: (), apply)


def make_aggregator(name: str, trim_fraction: float = 0.1) -> Aggregator:
  if name == 'mean':
    return mean()
  if name == 'median':
    return median()
  if name == 'trimmed_mean':
    return trimmed_mean(trim_fraction)
  raise ValueError(f'--aggregator={name!r} is unknown: choose one of {", ".join(AGGREGATORS)}')


def _rows(mask: jax.Array, x: jax.Array) -> jax.Array:
  """A row mask ``[s]`` shaped to broadcast against ``x`` ``[s, ...]``."""
  return mask.reshape((-1,) + (1,) * (x.ndim - 1))


def _sorted_valid(x: jax.Array, valid: jax.Array) -> jax.Array:
  """``x`` ``[s, ...]`` sorted along the rows in float32 (float64 stays), invalid
  rows pushed to +inf so the n valid values come first in every coordinate."""
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  return jnp.sort(jnp.where(_rows(valid, x), x.astype(dtype), jnp.inf), axis=0)  # [s, ...]


def _masked_median(x: jax.Array, valid: jax.Array) -> jax.Array:
  ordered = _sorted_valid(x, valid)  # [s, ...]
  n = jnp.sum(valid, dtype=jnp.int32)
  low = jax.lax.dynamic_index_in_dim(ordered, jnp.maximum(n - 1, 0) // 2, keepdims=False)
  high = jax.lax.dynamic_index_in_dim(ordered, n // 2, keepdims=False)
  return ((low + high) / 2).astype(x.dtype)


def _masked_trimmed_mean(x: jax.Array, valid: jax.Array, trim_fraction: float) -> jax.Array:
  ordered = _sorted_valid(x, valid)  # [s, ...]
  s = x.shape[0]
  n = jnp.sum(valid, dtype=jnp.int32)
  # floor(trim_fraction * n) in Python float arithmetic, tabulated for the static n <= s.
  trim = jnp.asarray([math.floor(trim_fraction * k) for k in range(s + 1)], jnp.int32)[n]
  rank = jnp.arange(s)
  kept = _rows((rank >= trim) & (rank < n - trim), ordered)  # [s, 1, ...]
  total = jnp.sum(jnp.where(kept, ordered, 0), axis=0)
  return (total / (n - 2 * trim).astype(ordered.dtype)).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class ServerOptimizer:
  """How the server turns the aggregate into the next global model.

  ``sgd`` with ``lr == 1`` and ``momentum == 0`` is plain FedAvg: its step
  ``old - 1 * (old - aggregate)`` equals the aggregate in exact arithmetic but
  not always in float32, so then ``replaces_global`` is true and the server
  takes the aggregate itself as the new global model (bitwise FedAvg) and keeps
  no optimizer state. ``momentum`` is used by ``sgd`` and ``momentum`` (FedAvgM);
  ``adam``, ``yogi`` and ``adagrad`` keep optax's defaults (beta1 = 0.9).
  """

  name: str = 'sgd'
  lr: float = 1.0
  momentum: float = 0.0

  def __post_init__(self):
    make_server_optimizer(self.name, self.lr, self.momentum)  # validates

  @property
  def replaces_global(self) -> bool:
    return self.name == 'sgd' and self.lr == 1 and self.momentum == 0

  def transformation(self) -> optax.GradientTransformation:
    return make_server_optimizer(self.name, self.lr, self.momentum)


def make_server_optimizer(name: str, lr: float, momentum: float = 0.0
                          ) -> optax.GradientTransformation:
  """The optax transformation of a server optimizer (Reddi et al., ICLR 2021)."""
  if name not in SERVER_OPTIMIZERS:
    raise ValueError(f'--server_optimizer={name!r} is unknown: choose one of '
                     f'{", ".join(SERVER_OPTIMIZERS)}')
  if not lr > 0:
    raise ValueError(f'--server_lr={lr} must be > 0')
  if not 0 <= momentum < 1:
    raise ValueError(f'--server_momentum={momentum} must be in [0, 1)')
  if name == 'momentum' and momentum == 0:
    raise ValueError('--server_momentum must be in (0, 1) with --server_optimizer=momentum')
  if name in ('adam', 'yogi', 'adagrad') and momentum != 0:
    raise ValueError(f'--server_momentum applies to sgd and momentum, not {name}')
  if name in ('sgd', 'momentum'):
    return optax.sgd(lr, momentum=momentum or None)
  return {'adam': optax.adam, 'yogi': optax.yogi, 'adagrad': optax.adagrad}[name](lr)


def server_step(tx: optax.GradientTransformation, opt_state: optax.OptState, old_global: Params,
                aggregate: Params) -> tuple[Params, optax.OptState]:
  """One server step on the pseudo-gradient ``old_global - aggregate``."""
  pseudo_grad = jax.tree.map(lambda old, new: old - new, old_global, aggregate)
  updates, opt_state = tx.update(pseudo_grad, opt_state, old_global)
  return optax.apply_updates(old_global, updates), opt_state


def mixing_merge(variance_correction: mixing.VarianceCorrection | None = None,
                 mode: str = 'auto') -> MergeFn:
  """D-PSGD's default merge: ``mixing.mix_corrected`` on the live rows."""

  def merge(graph: Topology, params: Stacked, alive: jax.Array) -> Stacked:
    return mixing.mix_corrected(graph, params, variance_correction, mode, where=alive)

  return merge
