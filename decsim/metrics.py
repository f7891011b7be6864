"""Evaluation: test accuracy and loss of a model or of stacked node models, and the
consensus distance of decentralized runs (Kong et al., "Consensus Control for
Decentralized Deep Learning", ICML 2021: (1/N) sum_i ||x_i - x_bar||^2).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from decsim.types import Params, Stacked

ApplyFn = Callable[[Params, jax.Array], jax.Array]  # (params, x [B, ...]) -> logits [B, C]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def make_loss_fn(apply_fn: ApplyFn):
  """Mean cross-entropy of one minibatch: the local training objective."""

  def loss_fn(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    return cross_entropy(apply_fn(params, x), y)

  return loss_fn


def make_evaluate(apply_fn: ApplyFn, batch_size: int = 1000):
  """``evaluate(params, x, y) -> (accuracy, loss)`` over a whole test set, in batches.

  The test set is padded to a multiple of ``batch_size`` and padded rows are
  masked, so memory is bounded by one batch whatever the test set's size.
  """

  def evaluate(params: Params, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    m = x.shape[0]
    b = min(batch_size, m)
    pad = (-m) % b
    xb = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(-1, b, *x.shape[1:])
    yb = jnp.pad(y, (0, pad)).reshape(-1, b)
    mask = (jnp.arange(m + pad) < m).reshape(-1, b)

    def one_batch(args):
      xs, ys, ms = args
      logits = apply_fn(params, xs)
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, ys)
      correct = jnp.argmax(logits, -1) == ys
      return jnp.sum(correct * ms), jnp.sum(losses * ms)

    correct, loss = jax.lax.map(one_batch, (xb, yb, mask))
    return jnp.sum(correct) / m, jnp.sum(loss) / m

  return evaluate


def consensus_distance(stacked: Stacked) -> jax.Array:
  """(1/N) sum_i ||x_i - mean_j x_j||^2 over all parameters."""

  def leaf_sq(x):
    return jnp.sum((x - jnp.mean(x, axis=0, keepdims=True)) ** 2)

  return sum(jax.tree.leaves(jax.tree.map(leaf_sq, stacked))) / jax.tree.leaves(stacked)[0].shape[0]
