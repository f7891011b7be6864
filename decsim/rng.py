"""Counter-based randomness: every draw is a pure function of (root key, round, node, stream).

Deriving per-node keys with ``fold_in`` instead of splitting a carried key means
a node's minibatches in round r do not depend on which protocol runs, which other
nodes were sampled, or whether the run was resumed from a checkpoint.
"""

import enum

import jax

from decsim.types import PRNGKey

MAX_SEED = 2 ** 31 - 1  # seeds are int32 (jax.random.key)


class Stream(enum.IntEnum):
  """Independent random streams; each has its own sub-key of the root key."""

  INIT = 0  # model initialisation
  BATCH = 1  # per-node minibatch order
  DROPOUT = 2  # per-node dropout / model noise
  SAMPLE = 3  # which nodes a server or protocol samples
  TOPOLOGY = 4  # time-varying graphs and peer choices
  CHURN = 5  # availability draws
  GOSSIP = 6  # gossip wake-up jitter
  TASK = 10  # RL: the questions each node samples (decsim.rl)
  ROLLOUT = 11  # RL: the completions each node generates (decsim.rl)


def round_key(key: PRNGKey, round_: jax.Array, stream: Stream) -> PRNGKey:
  """Key shared by all nodes for ``stream`` in round ``round_``."""
  return jax.random.fold_in(jax.random.fold_in(key, int(stream)), round_)


def node_keys(key: PRNGKey, round_: jax.Array, nodes: jax.Array, stream: Stream) -> PRNGKey:
  """Per-node keys ``[len(nodes)]`` for ``stream`` in round ``round_``."""
  base = round_key(key, round_, stream)
  return jax.vmap(lambda n: jax.random.fold_in(base, n))(nodes)
