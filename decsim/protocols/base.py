"""What every protocol shares: the ``Protocol`` triple, the ``Learner`` and node helpers.

A protocol is built by a plain function that closes over static configuration
and returns ``Protocol(init, round, model)`` of pure functions, in the manner of
optax's ``GradientTransformation`` and fedjax's ``FederatedAlgorithm``.
"""

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from decsim.data.sampler import NodeData
from decsim.local import LocalResult, map_nodes
from decsim.rng import Stream, node_keys
from decsim.state import RoundMetrics, SimState
from decsim.types import Params, PRNGKey, Stacked


class Protocol(NamedTuple):
  init: Callable[[PRNGKey, NodeData], SimState]
  round: Callable[[SimState, NodeData], tuple[SimState, RoundMetrics]]
  # The model the protocol delivers: FedAvg's server model, the node average of
  # a decentralized protocol. Evaluation reads it.
  model: Callable[[SimState], Params]
  # Protocols whose nodes hold different models return them here (leaves [N, ...]);
  # evaluation then also scores individual nodes. None: one model (``model``).
  node_models: Callable[[SimState], Stacked] | None = None
  # Bytes of one message of each kind (network.KINDS); None: the model's size, a
  # view of N entries and a ping (network.message_bytes).
  message_bytes: tuple[int, ...] | None = None
  # Extra values for the metrics rows, computed on the device at each evaluation.
  extra_metrics: Callable[[SimState], dict[str, jax.Array]] | None = None
  # Protocols that deliver one model (FedAvg, MoDeST) return the models their clients
  # hold after the last round's local training (leaves [s, ...]) and which of the s
  # are real ([s] bool); evaluation scores them as ``client_accuracy``.
  client_models: Callable[[SimState], tuple[Stacked, jax.Array]] | None = None


@dataclasses.dataclass(frozen=True)
class Learner:
  """How one node learns; shared by every protocol of a run."""

  init_params: Callable[[PRNGKey], Params]  # one model
  tx: optax.GradientTransformation
  local_update: Callable[..., LocalResult]  # from make_local_update
  batch_size: int  # samples per local step, for simulated compute time
  node_chunk: int = 0  # see local.map_nodes
  independent_init: bool = False  # every node its own draw (gossip setting)
  # round -> the round's learning rate over the base one (local.learning_rate_scale);
  # None: constant. Protocols pass the round to ``train_nodes``.
  lr_scale: Callable[[jax.Array], jax.Array] | None = None

  def model_bytes(self) -> int:
    shapes = jax.eval_shape(self.init_params, jax.random.key(0))
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(shapes))


def broadcast(params: Params, n: int) -> Stacked:
  """One model copied to n rows: leaves [n, ...]."""
  return jax.tree.map(lambda p: jnp.broadcast_to(p, (n, *p.shape)), params)


def init_params(learner: Learner, key: PRNGKey, n: int) -> Stacked:
  """N models: one draw broadcast (shared init) or N independent draws.

  Independent draws run in chunks of 64 so peak memory stays near the N models
  themselves (one vmap over N keys peaked at 4x).
  """
  if not learner.independent_init:
    return broadcast(learner.init_params(key), n)
  keys = jax.random.split(key, n)
  return jax.lax.map(learner.init_params, keys, batch_size=min(n, 64))


def train_nodes(learner: Learner, params: Stacked, opt_state: optax.OptState, keys: PRNGKey,
                data: NodeData, rows: jax.Array | None = None,
                round_: jax.Array | None = None) -> LocalResult:
  """Local update of the nodes in ``rows`` (all nodes when None); leaves [len(rows), ...].
  ``round_`` (the round being run) sets the learning rate of a schedule."""
  if learner.lr_scale is not None and round_ is None:
    raise ValueError('train_nodes: this learner has a learning-rate schedule; pass round_')
  scale = None if learner.lr_scale is None else learner.lr_scale(round_)
  if not isinstance(data, NodeData):  # clients without a table (decsim.data.virtual)
    rows = jnp.arange(data.num_nodes) if rows is None else rows
    idx, sizes, clients = data.client_rows(rows)  # [s, L], [s], leaves [s, ...]

    def generated(p, o, k, idx_row, size, client):
      return learner.local_update(p, o, k, *data.views(client), idx_row, size, scale)

    return map_nodes(generated, learner.node_chunk)(params, opt_state, keys, idx, sizes, clients)
  idx, sizes = (data.idx, data.sizes) if rows is None else (data.idx[rows], data.sizes[rows])

  def one(p, o, k, idx_row, size):
    return learner.local_update(p, o, k, data.x, data.y, idx_row, size, scale)

  return map_nodes(one, learner.node_chunk)(params, opt_state, keys, idx, sizes)


def where_alive(alive: jax.Array, new, old):
  """Rows of ``new`` where ``alive [N]``, of ``old`` elsewhere (leaves [N, ...])."""
  pick = lambda a, b: jnp.where(alive.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
  return jax.tree.map(pick, new, old)


def train_online(learner: Learner, state: SimState, data: NodeData, nodes: int
                 ) -> tuple[Stacked, optax.OptState, LocalResult]:
  """Every node's local update of round ``state.round`` (decentralized protocols): the
  online nodes' new models and optimiser states, the offline ones' unchanged, and the
  local result (leaves [N, ...])."""
  keys = node_keys(state.key, state.round, jnp.arange(nodes), Stream.BATCH)  # [N]
  result = train_nodes(learner, state.nodes.params, state.nodes.opt_state, keys, data,
                       round_=state.round)
  alive = state.available  # [N]
  return (where_alive(alive, result.params, state.nodes.params),
          where_alive(alive, result.opt_state, state.nodes.opt_state), result)


def sample_available(key: PRNGKey, available: jax.Array, s: int) -> tuple[jax.Array, jax.Array]:
  """``s`` distinct nodes drawn uniformly among the available ones.

  Returns ``(ids [s] int32, valid [s] bool)``; when fewer than ``s`` nodes are
  available the surplus draws are marked invalid.
  """
  scores = jax.random.uniform(key, available.shape)  # [N]
  scores = jnp.where(available, scores, -1.0)
  top, ids = jax.lax.top_k(scores, s)
  return ids.astype(jnp.int32), top >= 0.0


def weighted_average(stacked: Stacked, weights: jax.Array) -> Params:
  """sum_i w_i x_i / sum_i w_i over the leading axis; weights [n]."""
  weights = weights / jnp.sum(weights)
  return jax.tree.map(lambda x: jnp.tensordot(weights.astype(x.dtype), x, axes=1), stacked)


def rows_of(stacked: Stacked, ids: jax.Array) -> tuple[Stacked, jax.Array]:
  """Rows ``ids [s]`` of node rows ``[N, ...]`` and which are real (``ids < N``; an id
  of N or more marks no node): ``(leaves [s, ...], valid [s])``."""
  nodes = jax.tree.leaves(stacked)[0].shape[0]
  return jax.tree.map(lambda x: x[jnp.minimum(ids, nodes - 1)], stacked), ids < nodes


def node_average(stacked: Stacked) -> Params:
  return jax.tree.map(lambda x: jnp.mean(x, axis=0), stacked)
