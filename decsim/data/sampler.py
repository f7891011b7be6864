"""Device-side training data and jittable per-node minibatch gathers.

The training set lives on the device once (``x [M, ...]``, ``y [M]``) with the
partition's padded index rows; a node's minibatch is a gather through its row.
Each round a node walks a fresh random permutation of its own samples
(sampling without replacement, wrapping into a new pass when it runs out), so
one local epoch visits every sample of the node exactly once.
"""

import jax
import jax.numpy as jnp
from flax import struct

from decsim.types import PRNGKey


@struct.dataclass
class NodeData:
  """Training data on the device, passed to every ``round`` as an argument."""

  x: jax.Array  # [M, ...] features
  y: jax.Array  # [M] int32 labels
  idx: jax.Array  # [N, L] int32 sample ids per node, padded
  sizes: jax.Array  # [N] int32 valid entries per row

  @property
  def num_nodes(self) -> int:
    return self.idx.shape[0]

  @property
  def max_size(self) -> int:
    """L: the width of the index rows."""
    return self.idx.shape[1]


def permutation(key: PRNGKey, size: jax.Array, max_len: int) -> jax.Array:
  """A random order of positions ``0..size-1`` first, then the padding: [max_len]."""
  scores = jax.random.uniform(key, (max_len,))
  scores = jnp.where(jnp.arange(max_len) < size, scores, 2.0)  # padding sorts last
  return jnp.argsort(scores)


def batch_ids(order: jax.Array, idx_row: jax.Array, size: jax.Array, step: jax.Array,
              batch_size: int) -> jax.Array:
  """Sample ids of minibatch ``step`` in the node's permutation: [batch_size]."""
  positions = (step * batch_size + jnp.arange(batch_size)) % jnp.maximum(size, 1)
  return idx_row[order[positions]]
