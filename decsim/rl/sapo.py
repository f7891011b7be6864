"""SAPO: swarm RL post-training with shared rollouts, all N policies in one round.

Gensyn (2025), "Sharing is Caring: Efficient LM Post-Training with Collective RL
Experience Sharing". Every round each node

1. samples I questions and generates G completions for each with its own policy;
2. shares its I groups with the swarm: the pool ``[N, I, G, T]``;
3. draws J groups shared by *other* nodes (filter ``nonzero_advantage`` — drop
   groups whose rewards are all equal, then uniform — in the paper's controlled
   runs; or ``uniform``, ``top_k`` by mean reward, ``first_k`` in pool order);
4. scores them with its own verifier and re-encodes them under its own policy
   (teacher-forced log-probabilities become the "old" policy of the ratio); and
5. takes a GRPO step on its I local + J external groups.

Here every step is array algebra over the node axis: one vmapped sampler, one
``top_k`` over a ``[N, N*I]`` score matrix for the draws, one gather for the
external groups, one vmapped GRPO update. Options: churn (an offline node
neither shares nor trains), staleness (external groups come from the pool of
round r - d), and per-node counts of bytes shared.

All nodes run the same verifier program, so re-scoring the pool once is what
every node's own re-scoring would give.

The policy is anything with ``rollouts`` (``policy.Rollouts``): the small
character transformer, or a pretrained Qwen2 model (``lm_policy``), whose
completions ``rollouts.task_tokens`` turns into the task alphabet for the verifier.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from decsim import rng
from decsim.local import map_nodes
from decsim.rl import grpo as grpo_lib
from decsim.rl import policy as policy_lib
from decsim.rl import tasks
from decsim.state import NodeState
from decsim.types import PRNGKey, Stacked

FILTERS = ('nonzero_advantage', 'uniform', 'top_k', 'first_k')


class SapoConfig(NamedTuple):
  nodes: int = 8
  local_groups: int = 4  # I
  external_groups: int = 4  # J
  generations: int = 8  # G
  completion_len: int = 6  # T
  temperature: float = 1.0
  filter: str = 'nonzero_advantage'
  task_mix: tuple[float, ...] = (1.0,) * len(tasks.TASKS)  # weights of source.names
  source: tasks.TaskSource = tasks.PROCEDURAL  # questions and their verifier
  churn: float = 0.0  # probability that a node is offline in a round
  staleness: int = 0  # d: external groups come from round r - d
  grpo: grpo_lib.GRPOConfig = grpo_lib.GRPOConfig()
  node_chunk: int = 0  # see decsim.local.map_nodes


class Pool(NamedTuple):
  """What the swarm shares in one round."""

  questions: tasks.Questions  # leaves [N, I, ...]
  completions: jax.Array  # [N, I, G, T]
  rewards: jax.Array  # [N, I, G] scored by the verifier
  online: jax.Array  # [N] bool, the sharer was online (offline nodes share nothing)


@struct.dataclass
class SapoState:
  round: jax.Array  # [] int32, rounds completed
  key: PRNGKey  # [] root key; every draw comes from decsim.rng
  nodes: NodeState  # params, Adam state; leaves [N, ...]
  bytes_shared: jax.Array  # [N] int32, bytes each node has shared so far
  history: Any = None  # Pool with leaves [d, ...]: the last d pools (staleness d > 0)
  ref_params: Any = None  # leaves [N, ...]: the base models (reference KL only)


@struct.dataclass
class SapoMetrics:
  reward: jax.Array  # [] mean reward of the online nodes' own completions
  node_reward: jax.Array  # [N] mean reward of each node's own completions
  exact: jax.Array  # [] fraction of own completions scoring 1.0
  loss: jax.Array  # [] mean GRPO loss of the nodes that trained
  external_groups: jax.Array  # [] mean external groups per training node
  signal_fraction: jax.Array  # [] trained groups whose rewards are not all equal
  bytes_shared: jax.Array  # [] bytes shared this round, all nodes
  active_nodes: jax.Array  # [] int32 nodes online


class Sapo(NamedTuple):
  init: Any  # (key, params [N, ...]) -> SapoState
  round: Any  # (state) -> (state, SapoMetrics)


def select_external(key: PRNGKey, rewards: jax.Array, online: jax.Array, j: int,
                    filter: str) -> tuple[jax.Array, jax.Array]:
  """Which shared groups each node trains on: ``idx [N, J]`` into the flat pool ``[N*I]``, ``valid [N, J]``.

  A node never draws its own groups or those of an offline node; with fewer
  than J eligible groups the rest of its row is marked invalid.
  """
  n, i = rewards.shape[:2]
  owner = jnp.arange(n * i) // i  # [N*I]
  eligible = (owner[None, :] != jnp.arange(n)[:, None]) & online[owner][None, :]  # [N, N*I]
  u = jax.random.uniform(key, (n, n * i))
  if filter == 'nonzero_advantage':
    eligible &= grpo_lib.nonzero_advantage(rewards).reshape(-1)[None, :]
    score = u
  elif filter == 'uniform':
    score = u
  elif filter == 'top_k':
    score = rewards.mean(-1).reshape(-1)[None, :] + 1e-3 * u  # ties broken at random
  elif filter == 'first_k':
    score = jnp.broadcast_to(-jnp.arange(n * i, dtype=jnp.float32), (n, n * i))
  else:
    raise ValueError(f'--filter={filter!r} is unknown: choose one of {", ".join(FILTERS)}')
  top, idx = jax.lax.top_k(jnp.where(eligible, score, -jnp.inf), j)
  return idx, top > -jnp.inf


def shared_bytes(prompt: jax.Array, completions: jax.Array) -> jax.Array:
  """Bytes a node shares for its groups ``[N, I, ...]``: one byte per character, prompt once per group
  (``completions`` in task tokens)."""
  prompt_chars = (prompt != tasks.PAD).sum((-1, -2))
  completion_chars = policy_lib.completion_mask(completions).sum((-1, -2, -3))
  return (prompt_chars + completion_chars).astype(jnp.int32)  # [N]


def sapo(policy: policy_lib.Policy, config: SapoConfig) -> Sapo:
  """Builds SAPO's ``init`` and ``round`` for ``config.nodes`` policies."""
  if config.filter not in FILTERS:
    raise ValueError(f'--filter={config.filter!r} is unknown: choose one of {", ".join(FILTERS)}')
  tx, update = grpo_lib.make_grpo(policy, config.grpo)

  def init(key: PRNGKey, params: Stacked) -> SapoState:
    return sapo_init(policy, config, tx, key, params)

  def round_(state: SapoState) -> tuple[SapoState, SapoMetrics]:
    return sapo_round(policy, config, update, state)

  return Sapo(init, round_)


def sapo_init(policy: policy_lib.Policy, config: SapoConfig, tx, key: PRNGKey,
              params: Stacked) -> SapoState:
  """Round 0: the given policies, fresh optimiser states, d empty pools (staleness d)."""
  n = config.nodes
  history = None
  if config.staleness > 0:  # d empty pools (all sharers offline)
    pool = jax.eval_shape(functools.partial(share, policy, config, r=0, params=params,
                                            online=jnp.ones((n,), bool)), key)
    history = jax.tree.map(lambda x: jnp.zeros((config.staleness, *x.shape), x.dtype), pool)
  return SapoState(round=jnp.zeros((), jnp.int32), key=key,
                   nodes=NodeState(params, jax.vmap(tx.init)(params)),
                   bytes_shared=jnp.zeros((n,), jnp.int32), history=history,
                   ref_params=params if config.grpo.kl_coef > 0 else None)


def rollout(policy: policy_lib.Policy, config: SapoConfig, params: Any, key: PRNGKey,
            prompts: jax.Array) -> jax.Array:
  """One node's G completions of each of its prompts ``[I, P]``: ``[I, G, T]``."""
  i, g = config.local_groups, config.generations
  flat = jnp.repeat(prompts, g, axis=0)  # [I*G, P]
  out = policy.rollouts.sample(params, key, flat, config.completion_len, config.temperature)
  return out.reshape(i, g, config.completion_len)


def questions(source: tasks.TaskSource, shape: tuple[int, ...], mix: tuple[float, ...],
              key: PRNGKey) -> tasks.Questions:
  """One node's questions from ``source`` (leaves with leading ``shape``)."""
  return source.sample(key, shape, mix)


def share(policy: policy_lib.Policy, config: SapoConfig, key: PRNGKey, r: jax.Array,
          params: Stacked, online: jax.Array, first_node: int = 0) -> Pool:
  """Every node's I questions and G completions each, scored by the source's verifier.

  The ``config.nodes`` nodes are swarm nodes ``first_node, first_node + 1, ...`` (their keys)."""
  n, i, source = config.nodes, config.local_groups, config.source
  node_ids = first_node + jnp.arange(n)
  qkeys = rng.node_keys(key, r, node_ids, rng.Stream.TASK)
  q = jax.vmap(functools.partial(questions, source, (i,), config.task_mix))(qkeys)  # [N, I, ...]
  skeys = rng.node_keys(key, r, node_ids, rng.Stream.ROLLOUT)
  completions = map_nodes(functools.partial(rollout, policy, config), config.node_chunk)(
      params, skeys, q.prompt)  # [N, I, G, T]
  rewards = source.score(policy.rollouts.task_tokens(completions), q)  # [N, I, G]
  return Pool(q, completions, rewards, online)


def online_nodes(config: SapoConfig, key: PRNGKey, r: jax.Array) -> jax.Array:
  """``[N] bool``: the nodes online in round r (each offline with probability ``churn``)."""
  n = config.nodes
  if config.churn > 0:
    return ~jax.random.bernoulli(rng.round_key(key, r, rng.Stream.CHURN), config.churn, (n,))
  return jnp.ones((n,), bool)


def stale_pool(config: SapoConfig, history: Any, pool: Pool, r: jax.Array) -> tuple[Pool, Any]:
  """The pool external groups come from (round r's, or round r - d's once there is one)
  and the history of the last d pools after round r."""
  if config.staleness <= 0:
    return pool, history
  stale = jax.tree.map(lambda h: h[0], history)
  shared = jax.tree.map(lambda old, new: jnp.where(r >= config.staleness, old, new), stale, pool)
  history = jax.tree.map(lambda h, x: jnp.concatenate([h[1:], x[None]]), history, pool)
  return shared, history


def training_batch(policy: policy_lib.Policy, config: SapoConfig, key: PRNGKey, r: jax.Array,
                   pool: Pool, shared: Pool) -> tuple[grpo_lib.Batch, jax.Array]:
  """Each node's I own groups plus J groups drawn from others' in ``shared``, re-scored
  with its verifier. Returns (the GRPO batch, leaves [N, I+J, ...], valid [N, J])."""
  n, i, j = config.nodes, config.local_groups, config.external_groups
  if j == 0:
    return grpo_lib.Batch(pool.questions.prompt, pool.completions, pool.rewards,
                          jnp.ones((n, i))), jnp.zeros((n, 0), bool)
  idx, valid = draw_external(config, key, r, shared)  # [N, J]
  return external_batch(policy, config.source, pool, shared, idx, valid), valid


def draw_external(config: SapoConfig, key: PRNGKey, r: jax.Array,
                  shared: Pool) -> tuple[jax.Array, jax.Array]:
  """Round r's draws of every node: ``idx [N, J]`` into the flat pool ``[N*I]``, and
  ``valid [N, J]``."""
  return select_external(rng.round_key(key, r, rng.Stream.SAMPLE), shared.rewards,
                         shared.online, config.external_groups, config.filter)


def external_batch(policy: policy_lib.Policy, source: tasks.TaskSource, pool: Pool, shared: Pool,
                   idx: jax.Array, valid: jax.Array,
                   encode=lambda completions: completions) -> grpo_lib.Batch:
  """The GRPO batch of the nodes of ``pool`` (leaves ``[n, I, ...]``): their own groups and the
  groups ``idx [n, J]`` of ``shared`` (leaves ``[N, I, ...]``), whose completions ``encode``
  turns into the policy's tokens, re-scored with the verifier on what the policy trains on."""
  q, completions, rewards = pool.questions, pool.completions, pool.rewards
  flat = lambda x: x.reshape(-1, *x.shape[2:])[idx]  # [n, J, ...]
  ext_q = jax.tree.map(flat, shared.questions)
  ext_completions = encode(flat(shared.completions))  # [n, J, G, T]
  ext_rewards = source.score(policy.rollouts.task_tokens(ext_completions), ext_q)  # [n, J, G]
  n, i = rewards.shape[:2]
  return grpo_lib.Batch(
      prompts=jnp.concatenate([q.prompt, ext_q.prompt], 1),  # [n, I+J, P]
      completions=jnp.concatenate([completions, ext_completions], 1),  # [n, I+J, G, T]
      rewards=jnp.concatenate([rewards, ext_rewards], 1),  # [n, I+J, G]
      weight=jnp.concatenate([jnp.ones((n, i)), valid.astype(jnp.float32)], 1))  # [n, I+J]


def train_node(update, use_ref: bool, params: Any, opt_state: Any, batch: grpo_lib.Batch,
               ref_params: Any):
  """One node's GRPO update (``ref_params`` only with a KL term)."""
  return update(params, opt_state, batch, ref_params if use_ref else None)


def sapo_metrics(rewards: jax.Array, online: jax.Array, batch: grpo_lib.Batch, valid: jax.Array,
                 loss: jax.Array, sent: jax.Array) -> SapoMetrics:
  """The round's metrics over the online nodes (own ``rewards [N, I, G]``, ``loss [N]``)."""
  onf = online.astype(jnp.float32)
  active = jnp.maximum(onf.sum(), 1.0)
  node_reward = rewards.mean((1, 2))
  trained = batch.weight * onf[:, None]  # [N, I+J]
  return SapoMetrics(
      reward=(node_reward * onf).sum() / active,
      node_reward=node_reward,
      exact=((rewards >= 1.0).mean((1, 2)) * onf).sum() / active,
      loss=(loss * onf).sum() / active,
      external_groups=(valid.sum(-1) * onf).sum() / active,
      signal_fraction=(grpo_lib.nonzero_advantage(batch.rewards) * trained).sum()
      / jnp.maximum(trained.sum(), 1.0),
      bytes_shared=sent.sum(),
      active_nodes=online.sum().astype(jnp.int32))


def train_nodes(update, config: SapoConfig, online: jax.Array, nodes: NodeState,
                batch: grpo_lib.Batch, ref_params: Any) -> tuple[NodeState, jax.Array]:
  """One GRPO update per online node, vmapped (re-encoding happens inside); offline nodes keep
  their state. Returns (the nodes, loss [n])."""
  use_ref = config.grpo.kl_coef > 0
  ref = ref_params if use_ref else jnp.arange(online.shape[0])  # a placeholder node axis
  new_params, new_opt, stats = map_nodes(functools.partial(train_node, update, use_ref),
                                         config.node_chunk)(
      nodes.params, nodes.opt_state, batch, ref)
  keep = lambda new, old: jnp.where(online.reshape(-1, *([1] * (new.ndim - 1))), new, old)
  return NodeState(jax.tree.map(keep, new_params, nodes.params),
                   jax.tree.map(keep, new_opt, nodes.opt_state)), stats.loss


def sapo_round(policy: policy_lib.Policy, config: SapoConfig, update,
               state: SapoState) -> tuple[SapoState, SapoMetrics]:
  """One SAPO round: share, draw and re-score external groups, one GRPO step per online node."""
  r, params = state.round, state.nodes.params
  online = online_nodes(config, state.key, r)  # [N]
  pool = share(policy, config, state.key, r, params, online)  # 1. rollouts
  shared, history = stale_pool(config, state.history, pool, r)  # 2. this round's or r - d's
  batch, valid = training_batch(policy, config, state.key, r, pool, shared)  # 3. draws, re-scored
  nodes, loss = train_nodes(update, config, online, state.nodes, batch, state.ref_params)  # 4.
  sent = jnp.where(online, shared_bytes(pool.questions.prompt,
                                        policy.rollouts.task_tokens(pool.completions)), 0)  # [N]
  metrics = sapo_metrics(pool.rewards, online, batch, valid, loss, sent)
  new_state = state.replace(round=r + 1, nodes=nodes, bytes_shared=state.bytes_shared + sent,
                            history=history)
  return new_state, metrics
