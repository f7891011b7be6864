"""Local training of one node, and the map that runs it for many nodes.

``make_local_update`` returns a pure function for a *single* node; protocols
vectorise it over the node axis with ``map_nodes``. This is fedjax's
``for_each_client`` split: the per-client computation is written once and the
way it is batched (one ``vmap``, or sequential chunks of ``vmap`` on a CPU where
XLA's grouped convolutions are slow) is chosen separately, inside one jit.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from decsim.data.sampler import batch_ids, permutation
from decsim.types import Params, PRNGKey

LossFn = Callable[[Params, jax.Array, jax.Array], jax.Array]


class LocalResult(NamedTuple):
  params: Params
  opt_state: optax.OptState
  loss: jax.Array  # [] mean minibatch loss over the steps taken
  steps: jax.Array  # [] int32 optimiser steps taken


def make_local_update(loss_fn: LossFn, tx: optax.GradientTransformation, local_steps: int,
                      batch_size: int, local_epochs: float | None = None):
  """Builds ``update(params, opt_state, key, x, y, idx_row, size, lr_scale=None) ->
  LocalResult`` for one node; ``lr_scale`` multiplies every update (the round's learning
  rate over the base one, ``learning_rate_scale``).

  With ``local_epochs`` set, node n takes ``ceil(local_epochs * size_n / batch_size)``
  steps (its own share of data decides its work, as in FedAvg's E); the scan runs
  the maximum over nodes and masks the rest. Otherwise every node takes
  ``local_steps`` steps.
  """
  grad_fn = jax.value_and_grad(loss_fn)

  def update(params: Params, opt_state: optax.OptState, key: PRNGKey, x: jax.Array,
             y: jax.Array, idx_row: jax.Array, size: jax.Array,
             lr_scale: jax.Array | None = None) -> LocalResult:
    max_len = idx_row.shape[0]  # L
    order = permutation(key, size, max_len)  # [L]
    if local_epochs is None:
      max_steps, steps = local_steps, jnp.int32(local_steps)
    else:
      max_steps = math.ceil(local_epochs * max_len / batch_size)
      steps = jnp.ceil(local_epochs * size / batch_size).astype(jnp.int32)

    def step(carry, t):
      params, opt_state = carry
      ids = batch_ids(order, idx_row, size, t, batch_size)  # [B]
      loss, grads = grad_fn(params, x[ids], y[ids])
      updates, new_opt_state = tx.update(grads, opt_state, params)
      if lr_scale is not None:  # SGD (momentum included) and Adam: the lr scales the update
        updates = jax.tree.map(lambda u: u * lr_scale.astype(u.dtype), updates)
      new_params = optax.apply_updates(params, updates)
      if local_epochs is not None:  # nodes with less data stop early
        active = t < steps
        new_params, new_opt_state = jax.tree.map(
            lambda new, old: jnp.where(active, new, old), (new_params, new_opt_state),
            (params, opt_state))
        loss = jnp.where(active, loss, 0.0)
      return (new_params, new_opt_state), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state),
                                               jnp.arange(max_steps))
    return LocalResult(params, opt_state, losses.sum() / jnp.maximum(steps, 1), steps)

  return update


def map_nodes(fn: Callable, node_chunk: int = 0) -> Callable:
  """Maps ``fn`` over the leading (node) axis of every argument.

  ``node_chunk == 0``: one ``vmap`` over all nodes (the accelerator path).
  ``node_chunk > 0``: ``lax.map`` over chunks of that many nodes, each chunk a
  ``vmap`` — same results, bounded working set, and on a CPU the fast path for
  convolutional models. Arguments shared by all nodes must be closed over.
  """
  if node_chunk <= 0:
    return jax.vmap(fn)

  def mapped(*args):
    n = jax.tree.leaves(args)[0].shape[0]
    if node_chunk >= n:
      return jax.vmap(fn)(*args)
    return jax.lax.map(lambda a: fn(*a), args, batch_size=node_chunk)

  return mapped


def learning_rate_scale(schedule: str, lr: float, decay_rounds: int, decay_factor: float
                        ) -> Callable[[jax.Array], jax.Array] | None:
  """``round -> lr(round) / lr`` of an optax schedule indexed by round, or None for a
  constant rate (local training then does not scale at all)."""
  if schedule == 'constant':
    return None
  if schedule == 'cosine':
    rate = optax.cosine_decay_schedule(lr, decay_steps=decay_rounds)
  elif schedule == 'step':
    rate = optax.exponential_decay(lr, transition_steps=decay_rounds, decay_rate=decay_factor,
                                   staircase=True)
  else:
    raise ValueError(f'unknown lr schedule {schedule!r}: choose constant, cosine or step')
  return lambda round_: rate(round_) / lr


def make_optimizer(name: str, lr: float, momentum: float = 0.0) -> optax.GradientTransformation:
  """Local optimiser: ``sgd`` (optionally with momentum) or ``adam``."""
  if name == 'sgd':
    return optax.sgd(lr, momentum=momentum or None)
  if name == 'adam':
    return optax.adam(lr)
  raise ValueError(f'unknown optimizer {name!r}: choose sgd or adam')
