"""The per-node loop baseline: how fedjax's default backend and loop-based simulators
(decentralizepy, gossipy) run nodes — one jitted single-node call per node per round.

``loop_dpsgd_round`` runs the same D-PSGD round as decsim (local update with the
same ``local_update`` function, then Metropolis-Hastings averaging) as a Python
loop over nodes, each node's model a separate pytree.
"""

import jax
import jax.numpy as jnp
import numpy as np

from decsim.rng import Stream, node_keys


def make_loop_dpsgd_round(learner, data, topology):
  """Returns ``round(models, opt_states, r) -> (models, opt_states)`` over Python lists."""
  step = jax.jit(lambda p, o, k, idx_row, size: learner.local_update(p, o, k, data.x, data.y,
                                                                     idx_row, size))
  idx = np.asarray(topology.idx)
  weights = np.asarray(topology.weights)

  @jax.jit
  def average(models, w):  # models: k pytrees, w [k]
    return jax.tree.map(lambda *leaves: sum(wi * l for wi, l in zip(w, leaves)), *models)

  def round_(models, opt_states, r):
    n = len(models)
    keys = node_keys(jax.random.key(0), r, jnp.arange(n), Stream.BATCH)
    trained, new_opt = [], []
    for i in range(n):
      result = step(models[i], opt_states[i], keys[i], data.idx[i], data.sizes[i])
      trained.append(result.params)
      new_opt.append(result.opt_state)
    mixed = [average([trained[j] for j in idx[i]], jnp.asarray(weights[i])) for i in range(n)]
    return mixed, new_opt

  return round_


def unstack(stacked, n):
  return [jax.tree.map(lambda x: x[i], stacked) for i in range(n)]
