"""Base models for SAPO: a short supervised warm-up on task demonstrations, cached with orbax.

SAPO (Gensyn, 2025) starts every node from a pretrained LM that already solves
some questions; GRPO needs that: a group whose completions all fail has zero
advantage and teaches nothing, and nothing can spread through the swarm. Here a
freshly initialised policy is trained with teacher-forced cross-entropy on
``prompt -> oracle EOS`` demonstrations for a few hundred steps, so the base pass
rate is low but not zero. Nodes are heterogeneous: node n has its own
initialisation and data and trains ``steps_min + (steps_max - steps_min) * n / (N - 1)``
steps; with ``kinds_per_node = k > 0`` it also sees demonstrations of only k task
kinds, ``(n + 0..k-1) mod len(TASKS)``, so its skills differ from its neighbours'
(the paper's swarm mixes differently able models; this is what experience
sharing can spread).

With ``init = 'shared'`` every node starts from one initialisation and sees one
demonstration stream (node 0's keys), so node n's base model is that single
warm-up trajectory stopped at node n's step count, and with ``steps_min ==
steps_max`` all N base models are identical: the paper's controlled runs, where
all eight nodes start from the same pretrained Qwen2.5-0.5B and differ only in
what they sample. Another node's completions are then close to the receiver's
own policy rather than drawn from an unrelated model.

The warm-up of all N nodes is one ``vmap`` inside one jit (steps masked per
node). The result is cached with orbax under ``$DECSIM_CACHE`` (an absolute
path) keyed by everything that determines it, and restored against an abstract
target so every leaf keeps its type.
"""

import hashlib
import json
import os
import pathlib
import shutil
import uuid
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from decsim import rng
from decsim.data.sources import default_cache_dir
from decsim.rl import policy as policy_lib
from decsim.rl import tasks
from decsim.types import PRNGKey, Stacked


class WarmupConfig(NamedTuple):
  steps_min: int = 60
  steps_max: int = 180
  batch_size: int = 32
  lr: float = 3e-3
  kinds_per_node: int = 0  # 0: every kind of the mix; k: node n sees kinds (n + 0..k-1) mod K
  init: str = 'independent'  # 'shared': one init and demonstration stream for all nodes


BASE_INITS = ('independent', 'shared')


def demonstrations(q: tasks.Questions, completion_len: int) -> jax.Array:
  """Target completions ``[..., T]``: the oracle, EOS, then PAD."""
  t = jnp.arange(completion_len)
  oracle = jnp.pad(q.oracle, [(0, 0)] * (q.oracle.ndim - 1) + [(0, completion_len - q.oracle.shape[-1])])
  length = q.oracle_len[..., None]
  return jnp.where(t < length, oracle, jnp.where(t == length, tasks.EOS, tasks.PAD)).astype(jnp.int32)


def warmup_steps(nodes: int, config: WarmupConfig) -> jax.Array:
  """Steps each node trains, ``[N]``, spread evenly from steps_min to steps_max."""
  frac = jnp.arange(nodes) / max(nodes - 1, 1)
  return jnp.round(config.steps_min + (config.steps_max - config.steps_min) * frac).astype(jnp.int32)


def make_warmup(policy: policy_lib.Policy, nodes: int, completion_len: int, config: WarmupConfig,
                mix: tuple[float, ...], source: tasks.TaskSource = tasks.PROCEDURAL):
  """``warmup(key) -> stacked params [N, ...]``: N inits (independent or one shared), each warmed up."""
  if config.init not in BASE_INITS:
    raise ValueError(f'--base_init={config.init!r} is unknown: choose one of {", ".join(BASE_INITS)}')
  tx = optax.adam(config.lr)

  def loss_fn(params, prompts, targets):
    logp = policy_lib.token_logprobs(policy, params, prompts, targets)  # [B, T]
    mask = policy_lib.completion_mask(targets)
    return -(logp * mask).sum() / mask.sum()

  def node_mix(node: jax.Array) -> jax.Array:  # [K] demonstration mix of one node
    mixed = jnp.asarray(mix, jnp.float32)
    if config.kinds_per_node <= 0:
      return mixed
    k = len(source.names)
    seen = ((jnp.arange(k) - node) % k) < config.kinds_per_node
    return jnp.where(seen, jnp.maximum(mixed, 1e-3), 0.0)

  def one_node(key: PRNGKey, steps: jax.Array, node_mix: jax.Array):
    params = policy.init(jax.random.fold_in(key, 0))
    opt_state = tx.init(params)

    def step(carry, t):
      params, opt_state = carry
      q = source.sample(jax.random.fold_in(key, t + 1), (config.batch_size,), node_mix)
      grads = jax.grad(loss_fn)(params, q.prompt, demonstrations(q, completion_len))
      updates, new_opt = tx.update(grads, opt_state, params)
      new = (optax.apply_updates(params, updates), new_opt)
      return jax.tree.map(lambda a, b: jnp.where(t < steps, a, b), new, (params, opt_state)), None

    (params, _), _ = jax.lax.scan(step, (params, opt_state), jnp.arange(config.steps_max))
    return params

  def warmup(key: PRNGKey) -> Stacked:
    keys = rng.node_keys(key, 0, jnp.arange(nodes), rng.Stream.INIT)
    if config.init == 'shared':  # every node on node 0's trajectory, stopped at its own step
      keys = jnp.broadcast_to(keys[0], keys.shape)
    mixes = jax.vmap(node_mix)(jnp.arange(nodes))  # [N, K]
    return jax.vmap(one_node)(keys, warmup_steps(nodes, config), mixes)

  return warmup


def cache_path(seed: int, nodes: int, policy_config: policy_lib.PolicyConfig, completion_len: int,
               config: WarmupConfig, mix: tuple[float, ...], cache_dir=None,
               source: tasks.TaskSource = tasks.PROCEDURAL) -> pathlib.Path:
  fields = config._asdict()
  if fields['init'] == 'independent':  # keeps the cache keys of runs from before the option
    del fields['init']
  spec = json.dumps([seed, nodes, policy_config._asdict(), completion_len, fields,
                     [round(m, 6) for m in mix], source.cache_id, 'v1'], sort_keys=True)
  digest = hashlib.sha1(spec.encode()).hexdigest()[:16]
  root = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
  return (root / f'sapo_base_{digest}').absolute()


def base_models(seed: int, nodes: int, policy: policy_lib.Policy, completion_len: int,
                config: WarmupConfig, mix: tuple[float, ...], cache_dir=None,
                source: tasks.TaskSource = tasks.PROCEDURAL,
                log=print) -> Stacked:
  """The N warmed-up base models of ``seed``: restored from the cache, or trained and cached."""
  import orbax.checkpoint as ocp

  path = cache_path(seed, nodes, policy.config, completion_len, config, mix, cache_dir, source)
  key = jax.random.key(seed)
  warmup = make_warmup(policy, nodes, completion_len, config, mix, source)
  target = jax.eval_shape(warmup, key)
  checkpointer = ocp.StandardCheckpointer()
  if path.exists():
    return checkpointer.restore(path, target)
  log(f'warming up {nodes} base models ({config.steps_min}-{config.steps_max} steps) -> {path}')
  params = jax.jit(warmup)(key)
  path.parent.mkdir(parents=True, exist_ok=True)
  # Written aside, then renamed: runs warming up the same models at once (a study's
  # parallel seeds) each finish; the first rename wins, the others drop their identical copy.
  scratch = path.with_name(f'{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}')
  checkpointer.save(scratch, params)
  checkpointer.wait_until_finished()
  try:
    os.rename(scratch, path)
  except OSError:
    if not path.exists():
      raise
    shutil.rmtree(scratch)
  return params
