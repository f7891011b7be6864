"""Compression operators on one model's pytree, and the bytes of the message each sends.

Every operator maps a model (or a model difference) to the dense pytree the
receiver decompresses it to; the message itself is what ``message_bytes`` prices.
They are pure functions, key-driven where random, applied leaf by leaf: ``topk``
and ``randk`` keep ``k = ceil(ratio * size)`` entries of *each leaf* (not of the
flattened model), ``qsgd`` quantises each leaf with that leaf's own norm.

* ``identity``: the model itself (``--compression=none``).
* ``topk``: the k largest-magnitude entries of each leaf, the rest zero.
* ``randk``: k entries of each leaf drawn uniformly without replacement, *unscaled*
  (no d/k factor): the biased contraction operator CHOCO-SGD uses (Koloskova et al.
  2019, Section 3: E||Q(x) - x||^2 <= (1 - k/d) ||x||^2); the scaled version is
  unbiased but not a contraction.
* ``qsgd``: stochastic quantisation to ``s`` levels (Alistarh et al., "QSGD",
  NeurIPS 2017): entry v becomes ``||x|| sign(v) l / s`` with l = floor(s|v|/||x||)
  + Bernoulli(frac), unbiased. CHOCO-SGD's version divides by
  ``tau = 1 + min(d / s^2, sqrt(d) / s)`` to make it a contraction (``scaled=True``,
  d the leaf size); ``make`` returns that one.

Message sizes: sparse operators send values (the leaf's dtype) plus int32 indices;
qsgd sends per leaf a float32 norm and per entry a sign bit and ceil(log2(s + 1))
level bits, rounded up to bytes per leaf.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from decsim.config import Component, option
from decsim.errors import ConfigError
from decsim.types import Params, PRNGKey

COMPRESSIONS = ('none', 'topk', 'randk', 'qsgd')
INDEX_BYTES = 4  # int32 index of a kept entry
NORM_BYTES = 4  # float32 norm of a qsgd leaf
COMPRESSED_PROTOCOLS = ('choco',)  # the protocols that read --compression


@dataclasses.dataclass(frozen=True)
class CompressionConfig(Component):
  """Compressed messages."""

  compression: str = option('none', 'Compression of the messages of a compressing protocol '
                            '(--protocol=choco): none, topk (largest entries per leaf), randk '
                            '(random entries per leaf, unscaled) or qsgd (Alistarh et al. 2017).',
                            choices=COMPRESSIONS)
  compression_ratio: float = option(0.1, 'topk/randk: the fraction of each leaf kept, '
                                    'k = ceil(ratio * size).', low=0, high=1, low_open=True)
  qsgd_levels: int = option(16, 'qsgd: quantisation levels s per sign.', low=1, high=2 ** 16)

  def check(self):
    protocol = getattr(self, 'protocol', None)  # the flat experiment config has one
    if protocol is not None and self.compression != 'none':
      if protocol not in COMPRESSED_PROTOCOLS:
        raise ConfigError(f'--compression={self.compression} applies only to '
                            f'--protocol={"|".join(COMPRESSED_PROTOCOLS)}: drop it or change '
                            '--protocol')


class Compressor(NamedTuple):
  name: str
  apply: Callable[[PRNGKey, Params], Params]  # one model -> what the receiver decompresses
  nbytes: int  # bytes of one message


def keep_count(size: int, ratio: float) -> int:
  """k = ceil(ratio * size), at least 1 and at most size."""
  return min(size, max(1, math.ceil(ratio * size - 1e-9)))


def identity(key: PRNGKey, params: Params) -> Params:
  del key
  return params


def _leaf_keys(key: PRNGKey, params: Params) -> Params:
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, [jax.random.fold_in(key, i) for i in range(len(leaves))])


def _scatter(x: jax.Array, idx: jax.Array) -> jax.Array:
  flat = x.ravel()  # [d]
  return jnp.zeros_like(flat).at[idx].set(flat[idx]).reshape(x.shape)


def topk(params: Params, ratio: float) -> Params:
  """Each leaf's k largest-magnitude entries, the rest zero."""
  def leaf(x):
    _, idx = jax.lax.top_k(jnp.abs(x.ravel()), keep_count(x.size, ratio))  # [k]
    return _scatter(x, idx)
  return jax.tree.map(leaf, params)


def randk(key: PRNGKey, params: Params, ratio: float) -> Params:
  """k uniformly drawn entries of each leaf, unscaled (CHOCO's biased operator)."""
  def leaf(x, k):
    idx = jax.random.choice(k, x.size, (keep_count(x.size, ratio),), replace=False)  # [k]
    return _scatter(x, idx)
  return jax.tree.map(leaf, params, _leaf_keys(key, params))


def qsgd_tau(size: int, levels: int) -> float:
  return 1.0 + min(size / levels ** 2, math.sqrt(size) / levels)


def qsgd(key: PRNGKey, params: Params, levels: int, scaled: bool = False) -> Params:
  """Each leaf quantised to ``levels`` levels of its norm, stochastically rounded
  (unbiased); ``scaled`` divides by CHOCO's tau (a contraction, biased)."""
  def leaf(x, k):
    norm = jnp.linalg.norm(x.ravel())  # []
    r = jnp.abs(x) / jnp.where(norm > 0, norm, 1.0) * levels  # in [0, s]
    low = jnp.floor(r)
    level = low + (jax.random.uniform(k, x.shape) < r - low)
    out = jnp.sign(x) * norm * level / levels
    return (out / qsgd_tau(x.size, levels) if scaled else out).astype(x.dtype)
  return jax.tree.map(leaf, params, _leaf_keys(key, params))


def message_bytes(name: str, shapes: Params, ratio: float = 1.0, levels: int = 16) -> int:
  """Bytes of one compressed model; ``shapes`` is a pytree of arrays or ShapeDtypeStructs."""
  leaves = jax.tree.leaves(shapes)
  if name == 'none':
    return sum(x.size * x.dtype.itemsize for x in leaves)
  if name in ('topk', 'randk'):
    return sum(keep_count(x.size, ratio) * (x.dtype.itemsize + INDEX_BYTES) for x in leaves)
  if name == 'qsgd':
    bits = 1 + math.ceil(math.log2(levels + 1))  # sign and level
    return sum(NORM_BYTES + math.ceil(x.size * bits / 8) for x in leaves)
  raise ConfigError(f'--compression={name!r} is unknown: choose one of {", ".join(COMPRESSIONS)}')


def make(name: str, shapes: Params, ratio: float = 1.0, levels: int = 16) -> Compressor:
  """The operator of ``--compression`` (qsgd scaled as CHOCO-SGD uses it) and its size."""
  nbytes = message_bytes(name, shapes, ratio, levels)
  ops = {'none': identity,
         'topk': lambda key, p: topk(p, ratio),
         'randk': lambda key, p: randk(key, p, ratio),
         'qsgd': lambda key, p: qsgd(key, p, levels, scaled=True)}
  return Compressor(name, ops[name], nbytes)


def from_config(c, shapes: Params) -> Compressor:
  return make(c.compression, shapes, c.compression_ratio, c.qsgd_levels)
