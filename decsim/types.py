"""Type aliases used across decsim.

A *stacked* pytree has a leading node axis of size N on every leaf: leaf ``i`` of
node ``n`` is ``leaf[n]``. All N node models live in one such pytree.
"""

from typing import Any

import jax

Params = Any  # a flax params pytree of one model
Stacked = Any  # a pytree whose every leaf has a leading node axis [N, ...]
PRNGKey = jax.Array  # a typed key from jax.random.key
Metrics = dict[str, jax.Array]
