"""Layers shared by the models.

``PatchConv`` computes a 'SAME' convolution (or a strided one padded as PyTorch pads
it, for the ResNets) as patches @ kernel (im2col). It holds
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


def same_patches(x: jax.Array, window: Sequence[int], stride: int = 1) -> jax.Array:
  """Patches of a padded window: [B, *S, C] -> [B, *ceil(S / stride), prod(window)*C].

  Padding is ``((w - 1) // 2, w // 2)`` on every spatial axis ('SAME' at stride 1);
  with ``stride`` s the output keeps every s-th position of the stride-1 output, which
  is PyTorch's and Caffe's ``padding=(w - 1) // 2`` strided convolution (ResNet's 3x3
  stride-2 layers; a 1x1 or 2x2 stride-2 projection reads no padding on even sizes).
  The patch feature order is (window offsets row-major, then channel), matching a
  kernel ``[*window, C_in, C_out]`` reshaped to ``[-1, C_out]``.
  """
  spatial = x.shape[1:-1]
  out = [-(-size // stride) for size in spatial]  # ceil(S / stride)
  pads = [(0, 0)] + [((w - 1) // 2, w // 2) for w in window] + [(0, 0)]
  xp = jnp.pad(x, pads)
  slices = []
  for offset in itertools.product(*(range(w) for w in window)):
    index = (slice(None),) + tuple(slice(o, o + stride * (n - 1) + 1, stride)
                                   for o, n in zip(offset, out))
    slices.append(xp[index])
  return jnp.concatenate(slices, axis=-1)


class PatchConv(nn.Module):
  """Convolution as im2col + matmul, padded as ``same_patches``; same parameters as
  ``nn.Conv`` (``use_bias=False``: the kernel only, as before a normalisation)."""

  features: int
  window: Sequence[int]
  stride: int = 1
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    window = tuple(self.window)
    kernel = self.param('kernel', xavier_uniform, (*window, x.shape[-1], self.features))
    patches = same_patches(x, window, self.stride)  # [B, *S / stride, prod(window) * C_in]
    out = patches @ kernel.reshape(-1, self.features)  # [B, *S / stride, C_out]
    if self.use_bias:
      out = out + self.param('bias', nn.initializers.zeros, (self.features,))
    return out
