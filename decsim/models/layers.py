"""Layers shared by the models.

``PatchConv`` computes a 'SAME' convolution as patches @ kernel (im2col). It holds
the same parameter as ``flax.linen.Conv`` (a ``[*window, C_in, C_out]`` kernel and a
bias) and computes the same function, but vectorises over the node axis as a
batched matmul instead of a grouped convolution. Measured on XLA's CPU backend
(jax 0.10.2, 2 cores, LeNet-5, batch 32, N=100): ``vmap(nn.Conv)`` 37
node-steps/s, ``lax.map(nn.Conv)`` 55, a Python loop of jitted ``nn.Conv`` steps
193, ``lax.map(PatchConv, batch_size=4)`` 179 (see BUILD_NOTES.md).
"""

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

xavier_uniform = nn.initializers.xavier_uniform()


def same_patches(x: jax.Array, window: Sequence[int]) -> jax.Array:
  """Patches of a 'SAME'-padded, stride-1 window: [B, *S, C] -> [B, *S, prod(window)*C].

  The patch feature order is (window offsets row-major, then channel), matching a
  kernel ``[*window, C_in, C_out]`` reshaped to ``[-1, C_out]``.
  """
  spatial = x.shape[1:-1]
  pads = [(0, 0)] + [((w - 1) // 2, w // 2) for w in window] + [(0, 0)]
  xp = jnp.pad(x, pads)
  slices = []
  for offset in itertools.product(*(range(w) for w in window)):
    index = (slice(None),) + tuple(slice(o, o + s) for o, s in zip(offset, spatial))
    slices.append(xp[index])
  return jnp.concatenate(slices, axis=-1)


class PatchConv(nn.Module):
  """'SAME' stride-1 convolution as im2col + matmul; same parameters as ``nn.Conv``."""

  features: int
  window: Sequence[int]

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    window = tuple(self.window)
    kernel = self.param('kernel', xavier_uniform, (*window, x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    patches = same_patches(x, window)  # [B, *S, prod(window) * C_in]
    return patches @ kernel.reshape(-1, self.features) + bias
