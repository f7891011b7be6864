"""Heterogeneous SAPO swarms: policies of different families or sizes share rollouts as text.

SAPO (Gensyn, 2025, "Sharing is Caring: Efficient LM Post-Training with Collective
RL Experience Sharing") lets every node run its own model: in the paper's open
community runs the swarm mixes model families and sizes, and what nodes exchange
is decoded text (the question, its answer and the completions), which each
receiver re-tokenizes for its own model. Here a swarm is a tuple of groups; each
group is one policy (the small character transformer at some size, or a Qwen2
checkpoint) with its own stacked parameters ``[n_g, ...]``, its own sampler and
GRPO update vmapped over its own node axis. One round:

1. every group samples its nodes' rollouts (``sapo.share``, keys of the swarm's
   node ids, so node n draws the same questions whatever group it is in);
2. the pool is text: each group's completions in the task alphabet
   (``Rollouts.task_tokens``), padded to one width, with the questions and the
   sender's rewards, ``[N, I, G, L]`` over all groups' nodes;
3. every node draws its J external groups from the whole pool exactly as in a
   homogeneous swarm (``sapo.select_external``: never its own, same filters);
4. each group re-encodes the text it drew with its own tokenizer
   (``Rollouts.from_text``), re-scores it with the verifier and takes its GRPO step.

With one group this is the homogeneous round (``sapo.sapo``) bitwise (tested).
The loop over groups is a Python loop over a handful of policies, each vmapped.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from decsim.rl import grpo as grpo_lib
from decsim.rl import sapo as sapo_lib
from decsim.rl.sapo import Pool, Sapo, SapoConfig, SapoState
from decsim.state import NodeState
from decsim.types import PRNGKey


class Group(NamedTuple):
  """Nodes running one policy: anything with ``rollouts`` (``policy.Policy``, ``LMPolicy``)."""

  policy: Any
  nodes: int


def first_nodes(groups: tuple[Group, ...]) -> tuple[int, ...]:
  """The swarm node id of each group's first node (groups are consecutive)."""
  starts, total = [], 0
  for g in groups:
    starts.append(total)
    total += g.nodes
  return tuple(starts)


def hetero_sapo(groups: tuple[Group, ...], config: SapoConfig) -> Sapo:
  """SAPO's ``init`` and ``round`` for a swarm of ``groups`` (``config.nodes`` = their total).

  ``init(key, params)`` takes a tuple of each group's stacked parameters."""
  if not groups or any(g.nodes < 1 for g in groups):
    raise ValueError('a swarm needs one or more groups of one or more nodes')
  if sum(g.nodes for g in groups) != config.nodes:
    raise ValueError(f'the groups have {sum(g.nodes for g in groups)} nodes, not '
                     f'config.nodes={config.nodes}')
  if config.filter not in sapo_lib.FILTERS:
    raise ValueError(f'--filter={config.filter!r} is unknown: choose one of '
                     f'{", ".join(sapo_lib.FILTERS)}')
  made = [grpo_lib.make_grpo(g.policy, config.grpo) for g in groups]
  txs, updates = tuple(m[0] for m in made), tuple(m[1] for m in made)
  return Sapo(functools.partial(hetero_init, groups, config, txs),
              functools.partial(hetero_round, groups, config, updates))


def _config(config: SapoConfig, group: Group) -> SapoConfig:
  return config._replace(nodes=group.nodes)


def share_all(groups: tuple[Group, ...], config: SapoConfig, key: PRNGKey, r: jax.Array,
              params: tuple, online: jax.Array) -> list[Pool]:
  """Each group's pool (completions in its own tokens; leaves ``[n_g, I, ...]``)."""
  return [sapo_lib.share(g.policy, _config(config, g), key, r, p, online[s:s + g.nodes], s)
          for g, p, s in zip(groups, params, first_nodes(groups))]


def text_pool(groups: tuple[Group, ...], pools: list[Pool]) -> Pool:
  """What the swarm shares: every node's questions, rewards and completions as task text
  ``[N, I, G, L]`` (L: the widest group's text, PAD after)."""
  texts = [g.policy.rollouts.task_tokens(p.completions) for g, p in zip(groups, pools)]
  width = max(t.shape[-1] for t in texts)
  pad = lambda t: jnp.pad(t, [(0, 0)] * (t.ndim - 1) + [(0, width - t.shape[-1])])  # PAD = 0
  cat = lambda *xs: jnp.concatenate(xs, 0)
  return Pool(jax.tree.map(cat, *[p.questions for p in pools]), cat(*map(pad, texts)),
              cat(*[p.rewards for p in pools]), cat(*[p.online for p in pools]))


def hetero_init(groups: tuple[Group, ...], config: SapoConfig, txs: tuple, key: PRNGKey,
                params: tuple) -> SapoState:
  """Round 0: each group's policies and fresh optimiser states; d empty text pools."""
  n = config.nodes
  history = None
  if config.staleness > 0:  # d empty pools (all sharers offline)
    pool = jax.eval_shape(lambda k: text_pool(groups, share_all(
        groups, config, k, 0, params, jnp.ones((n,), bool))), key)
    history = jax.tree.map(lambda x: jnp.zeros((config.staleness, *x.shape), x.dtype), pool)
  nodes = tuple(NodeState(p, jax.vmap(tx.init)(p)) for p, tx in zip(params, txs))
  return SapoState(round=jnp.zeros((), jnp.int32), key=key, nodes=nodes,
                   bytes_shared=jnp.zeros((n,), jnp.int32), history=history,
                   ref_params=params if config.grpo.kl_coef > 0 else None)


def group_batch(group: Group, config: SapoConfig, pool: Pool, shared: Pool, idx: jax.Array,
                valid: jax.Array) -> grpo_lib.Batch:
  """A group's GRPO batch: its own groups, and the text ``idx [n_g, J]`` of ``shared``
  re-encoded with its own tokenizer."""
  if config.external_groups == 0:
    return grpo_lib.Batch(pool.questions.prompt, pool.completions, pool.rewards,
                          jnp.ones(pool.rewards.shape[:2]))
  encode = lambda text: group.policy.rollouts.from_text(text, config.completion_len)
  return sapo_lib.external_batch(group.policy, config.source, pool, shared, idx, valid, encode)


def hetero_round(groups: tuple[Group, ...], config: SapoConfig, updates: tuple,
                 state: SapoState) -> tuple[SapoState, sapo_lib.SapoMetrics]:
  """One round of the swarm: every group shares text, every node draws from all of it, every
  group trains on what it drew."""
  r, n, j = state.round, config.nodes, config.external_groups
  online = sapo_lib.online_nodes(config, state.key, r)  # [N]
  params = tuple(s.params for s in state.nodes)
  pools = share_all(groups, config, state.key, r, params, online)  # 1. rollouts, own tokens
  pool = text_pool(groups, pools)  # 2. as text, [N, I, ...]
  shared, history = sapo_lib.stale_pool(config, state.history, pool, r)
  idx, valid = jnp.zeros((n, j), jnp.int32), jnp.zeros((n, j), bool)
  if j > 0:
    idx, valid = sapo_lib.draw_external(config, state.key, r, shared)  # 3. [N, J] over all
  refs = state.ref_params or (None,) * len(groups)
  nodes, batches, losses = [], [], []
  for k, (g, s) in enumerate(zip(groups, first_nodes(groups))):  # 4. each group trains
    mine = slice(s, s + g.nodes)
    batch = group_batch(g, config, pools[k], shared, idx[mine], valid[mine])
    node_state, loss = sapo_lib.train_nodes(updates[k], _config(config, g), online[mine],
                                            state.nodes[k], batch, refs[k])
    nodes.append(node_state)
    batches.append(batch)
    losses.append(loss)
  cat = lambda xs: jnp.concatenate(xs, 0)
  scored = grpo_lib.Batch(None, None, cat([b.rewards for b in batches]),
                          cat([b.weight for b in batches]))  # [N, I+J, ...]
  sent = jnp.where(online, sapo_lib.shared_bytes(pool.questions.prompt, pool.completions), 0)
  metrics = sapo_lib.sapo_metrics(pool.rewards, online, scored, valid, cat(losses), sent)
  return state.replace(round=r + 1, nodes=tuple(nodes), bytes_shared=state.bytes_shared + sent,
                       history=history), metrics
