"""Simulation state: every node's model and optimiser state, stacked on a node axis.

``SimState`` is a ``flax.struct`` dataclass so that it is a pytree: it crosses
``jit``, ``lax.scan`` and orbax checkpoints as one value. Static configuration
lives in the protocol builders' closures, never here.
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from decsim.network import KINDS
from decsim.types import PRNGKey, Stacked


@struct.dataclass
class NodeState:
  """The node models, stacked: every leaf has a leading axis of size N — or, for a
  protocol whose clients are stateless (FedAvg), of size s: only the rows in flight."""

  params: Stacked  # leaves [N, ...] (FedAvg: [s, ...])
  opt_state: optax.OptState  # leaves [N, ...]


@struct.dataclass
class SimState:
  """Everything a round reads and writes.

  ``key`` is the run's root key and never changes: every random draw is derived
  from (key, round, node id, stream) by ``decsim.rng``, so two protocols that
  take the same step see the same minibatches, and a resumed run the same draws.
  """

  round: jax.Array  # [] int32, rounds completed
  key: PRNGKey  # [] root key of the run
  nodes: NodeState  # stacked over N
  clock: jax.Array  # [] float32, simulated seconds elapsed
  sent: jax.Array  # [N, K] int32 messages each node has sent, per kind (network.KINDS)
  available: jax.Array  # [N] bool, nodes online this round
  extra: Any = None  # protocol-specific pytree (e.g. FedAvg's global model)


@struct.dataclass
class RoundMetrics:
  """What one round reports; ``lax.scan`` stacks these over rounds."""

  train_loss: jax.Array  # [] mean local training loss of the nodes that trained
  sim_seconds: jax.Array  # [] simulated duration of this round
  messages: jax.Array  # [K] int32 messages sent in this round, per kind (network.KINDS)
  active_nodes: jax.Array  # [] int32, nodes that trained this round
  node_steps: jax.Array  # [] int32, local optimiser steps summed over nodes


def init_sim_state(key: PRNGKey, nodes: NodeState, extra: Any = None,
                   num_nodes: int | None = None) -> SimState:
  """Round 0 with ``nodes``' rows; ``num_nodes`` (default: the rows' count) sizes the
  per-node counters and mask when the rows are only the ones in flight."""
  n = jax.tree.leaves(nodes.params)[0].shape[0] if num_nodes is None else num_nodes
  return SimState(
      round=jnp.zeros((), jnp.int32),
      key=key,
      nodes=nodes,
      clock=jnp.zeros((), jnp.float32),
      sent=jnp.zeros((n, len(KINDS)), jnp.int32),
      available=jnp.ones((n,), bool),
      extra=extra,
  )
