"""Evaluation: test accuracy and loss of a model or of stacked node models, and the
consensus distance of decentralized runs (Kong et al., "Consensus Control for
Decentralized Deep Learning", ICML 2021: (1/N) sum_i ||x_i - x_bar||^2), and the
per-layer weight variance against its Xavier value at initialisation (Tian et
al. 2024, "Vanishing Variance Problem in Fully Decentralized Neural-Network
Systems").
"""

import math

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
  """``evaluate(params, x, y, valid=None) -> (accuracy, loss)`` over a whole test set,
  in batches; with ``valid [M]`` only those samples count.

  The test set is padded to a multiple of ``batch_size`` and padded rows are
  masked, so memory is bounded by one batch whatever the test set's size.
  """

  def evaluate(params: Params, x: jax.Array, y: jax.Array,
               valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    m = x.shape[0]
    b = min(batch_size, m)
    pad = (-m) % b
    xb = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)).reshape(-1, b, *x.shape[1:])
    yb = jnp.pad(y, (0, pad)).reshape(-1, b)
    valid = jnp.ones((m,), bool) if valid is None else valid
    mask = jnp.pad(valid, (0, pad)).reshape(-1, b)
    m = jnp.maximum(jnp.sum(valid), 1)

    def one_batch(args):
      xs, ys, ms = args
      logits = apply_fn(params, xs)
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, ys)
      correct = jnp.argmax(logits, -1) == ys
      return jnp.sum(correct * ms), jnp.sum(losses * ms)

    correct, loss = jax.lax.map(one_batch, (xb, yb, mask))
    return jnp.sum(correct) / m, jnp.sum(loss) / m

  return evaluate


NODE_EVAL_BATCH = 16  # node models scored at once (vmapped) by node_accuracy


def node_accuracy(evaluate: Callable, stacked: Stacked, x: jax.Array, y: jax.Array,
                  batch_size: int = NODE_EVAL_BATCH) -> dict[str, jax.Array]:
  """Each node's own model on the test set (leaves ``[k, ...]``), ``batch_size`` at a time:
  ``accuracy`` and ``loss`` (means over nodes) and the accuracy's quantiles over nodes."""
  acc, loss = jax.lax.map(lambda p: evaluate(p, x, y), stacked, batch_size=batch_size)  # [k]
  return {**_spread('accuracy', acc), 'loss': jnp.mean(loss)}


def client_accuracy(evaluate: Callable, stacked: Stacked, valid: jax.Array, x: jax.Array,
                    y: jax.Array, batch_size: int = NODE_EVAL_BATCH) -> dict[str, jax.Array]:
  """The clients' models after local training (leaves ``[s, ...]``, ``valid [s]``) on the
  test set: ``client_accuracy`` (mean over the valid ones) and its quantiles."""
  acc, _ = jax.lax.map(lambda p: evaluate(p, x, y), stacked, batch_size=batch_size)  # [s]
  return _spread('client_accuracy', jnp.where(valid, acc, jnp.nan))


def _spread(prefix: str, values: jax.Array) -> dict[str, jax.Array]:
  """Mean and quantiles over nodes of ``values [k]`` (NaN entries left out; all NaN gives
  NaN), keys ``prefix``, ``prefix_min``, ..."""
  return {prefix: jnp.nanmean(values), f'{prefix}_min': jnp.nanmin(values),
          f'{prefix}_p10': jnp.nanquantile(values, 0.1),
          f'{prefix}_median': jnp.nanmedian(values), f'{prefix}_max': jnp.nanmax(values)}


def local_accuracy(evaluate: Callable, models: Stacked | None, model: Params | None,
                   x: jax.Array, y: jax.Array, idx: jax.Array, sizes: jax.Array,
                   batch_size: int = NODE_EVAL_BATCH) -> dict[str, jax.Array]:
  """Each node on its own held-out samples ``x[idx[i, :sizes[i]]]`` (``idx [k, T]``),
  scored with its own model (``models``, leaves ``[k, ...]``) or the one delivered
  ``model``: ``local_accuracy`` (mean over nodes) and its quantiles over nodes."""
  def one(args):
    params, row, size = args
    params = model if params is None else params
    return evaluate(params, x[row], y[row], jnp.arange(row.shape[0]) < size)[0]

  acc = jax.lax.map(one, (models, idx, sizes), batch_size=batch_size)  # [k]
  return _spread('local_accuracy', acc)


def consensus_distance(stacked: Stacked) -> jax.Array:
  """(1/N) sum_i ||x_i - mean_j x_j||^2 over all parameters."""

  def leaf_sq(x):
    return jnp.sum((x - jnp.mean(x, axis=0, keepdims=True)) ** 2)

  return sum(jax.tree.leaves(jax.tree.map(leaf_sq, stacked))) / jax.tree.leaves(stacked)[0].shape[0]


def xavier_variance(shape: tuple[int, ...]) -> float:
  """Variance of a Glorot/Xavier-initialised kernel of one model: 2 / (fan_in + fan_out).

  ``shape`` is ``[*window, in, out]`` (flax's layout; a dense kernel has no window).
  """
  receptive = math.prod(shape[:-2])
  return 2.0 / (receptive * shape[-2] + receptive * shape[-1])


def weight_variance(stacked: Stacked) -> dict[str, jax.Array]:
  """Mean over nodes of each weight tensor's variance, next to its Xavier variance.

  Keys ``weight_variance/<layer>`` and ``xavier_variance/<layer>`` for every
  kernel (leaves of ndim >= 2 per model), e.g. ``weight_variance/Dense_0/kernel``.
  """
  from decsim import mixing  # metrics is imported by mixing's users; keep it one-way
  out = {}
  names = mixing.layer_names(stacked)
  for name, x in zip(names, jax.tree.leaves(stacked)):
    if x.ndim < 3 or not name.endswith('kernel'):
      continue
    var = jnp.var(x.reshape(x.shape[0], -1).astype(jnp.float32), axis=1)  # [N]
    out[f'weight_variance/{name}'] = jnp.mean(var)
    out[f'xavier_variance/{name}'] = jnp.float32(xavier_variance(x.shape[1:]))
  return out
