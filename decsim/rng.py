"""Counter-based randomness: every draw is a pure function of (root key, round, node, stream).

Deriving per-node keys with ``fold_in`` instead of splitting a carried key means
a node's minibatches in round r do not depend on which protocol runs, which other
nodes were sampled, or whether the run was resumed from a checkpoint.
"""

import enum
from typing import NamedTuple

import jax

from decsim.types import PRNGKey

MAX_SEED = 2 ** 31 - 1  # seeds are int32 (jax.random.key)

REPLICA_PARTS = ('data', 'graph', 'network')  # what --replica_fix may hold fixed


class Seeds(NamedTuple):
  """The seed of each part of a run: ``run`` (the root key: initial models, batches,
  samples, per-round draws), ``data`` (dataset generation, partition, held-out and
  evaluated nodes), ``graph`` (topology) and ``network`` (links, compute speeds and
  the churn schedule). A single run uses ``--seed`` for all; replica i of
  ``--replicas`` uses seed + i for every part not held fixed by ``--replica_fix``."""

  run: int
  data: int
  graph: int
  network: int

  @classmethod
  def of(cls, seed: int, replica: int = 0, fixed: tuple[str, ...] = ()) -> 'Seeds':
    return cls(run=seed + replica, **{part: seed + (0 if part in fixed else replica)
                                     for part in REPLICA_PARTS})


class Stream(enum.IntEnum):
  """Independent random streams; each has its own sub-key of the root key."""

  INIT = 0  # model initialisation
  BATCH = 1  # per-node minibatch order
  DROPOUT = 2  # per-node dropout / model noise
  SAMPLE = 3  # which nodes a server or protocol samples
  TOPOLOGY = 4  # time-varying graphs and peer choices
  CHURN = 5  # availability draws
  GOSSIP = 6  # gossip wake-up jitter
  MODEST = 7  # MoDeST hash ranking with --modest_stream=independent
  COMPRESS = 8  # random compression operators (randk, qsgd) of each node's messages
  TASK = 10  # RL: the questions each node samples (decsim.rl)
  ROLLOUT = 11  # RL: the completions each node generates (decsim.rl)


def round_key(key: PRNGKey, round_: jax.Array, stream: Stream) -> PRNGKey:
  """Key shared by all nodes for ``stream`` in round ``round_``."""
  return jax.random.fold_in(jax.random.fold_in(key, int(stream)), round_)


def node_keys(key: PRNGKey, round_: jax.Array, nodes: jax.Array, stream: Stream) -> PRNGKey:
  """Per-node keys ``[len(nodes)]`` for ``stream`` in round ``round_``."""
  base = round_key(key, round_, stream)
  return jax.vmap(lambda n: jax.random.fold_in(base, n))(nodes)
