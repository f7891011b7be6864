"""A small decoder-only transformer policy with a KV cache, and vmapped sampling.

The policy of every SAPO node (Gensyn, 2025) — there Qwen2.5-0.5B, here a
character-level transformer of a few ten thousand parameters so that hundreds of
them fit one round. One node's model works on ``[B, L]`` token rows; the N
models are one stacked pytree (leaves ``[N, ...]``) and sampling is ``vmap``ped
over that axis from the outside.

``apply(params, tokens)`` is the full (teacher-forced) forward pass;
``decode_step`` runs one position against a cache of keys and values, which is
how ``sample`` generates. The two agree (tested).
"""

import functools
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from decsim.rl import tasks
from decsim.types import Params, PRNGKey


class PolicyConfig(NamedTuple):
  vocab: int = tasks.VOCAB_SIZE
  max_len: int = tasks.PROMPT_LEN + 6  # prompt + completion
  dim: int = 48
  heads: int = 4
  layers: int = 2
  mlp: int = 96


class Block(nn.Module):
  config: PolicyConfig

  def setup(self):
    c = self.config
    self.ln1, self.ln2 = nn.LayerNorm(), nn.LayerNorm()
    self.qkv = nn.Dense(3 * c.dim)
    self.out = nn.Dense(c.dim)
    self.fc1, self.fc2 = nn.Dense(c.mlp), nn.Dense(c.dim)

  def _split(self, x):  # [..., 3D] -> 3 x [..., H, Dh]
    c = self.config
    q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
    shape = (*x.shape[:-1], c.heads, c.dim // c.heads)
    return q.reshape(shape), k.reshape(shape), v.reshape(shape)

  def _finish(self, x, attended):  # attended [..., H, Dh]
    x = x + self.out(attended.reshape(*attended.shape[:-2], -1))
    return x + self.fc2(nn.gelu(self.fc1(self.ln2(x))))

  def __call__(self, x):  # x [B, L, D]
    q, k, v = self._split(x)  # [B, L, H, Dh]
    length = x.shape[-2]
    logits = jnp.einsum('blhd,bmhd->bhlm', q, k) / jnp.sqrt(q.shape[-1])
    causal = jnp.tril(jnp.ones((length, length), bool))
    weights = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
    return self._finish(x, jnp.einsum('bhlm,bmhd->blhd', weights, v))

  def step(self, x, pos, cache_k, cache_v):  # x [B, D]; cache [B, Lmax, H, Dh]
    q, k, v = self._split(x)  # [B, H, Dh]
    cache_k = jax.lax.dynamic_update_slice_in_dim(cache_k, k[:, None], pos, axis=1)
    cache_v = jax.lax.dynamic_update_slice_in_dim(cache_v, v[:, None], pos, axis=1)
    logits = jnp.einsum('bhd,bmhd->bhm', q, cache_k) / jnp.sqrt(q.shape[-1])
    visible = jnp.arange(cache_k.shape[1]) <= pos
    weights = jax.nn.softmax(jnp.where(visible, logits, -1e9), axis=-1)
    return self._finish(x, jnp.einsum('bhm,bmhd->bhd', weights, cache_v)), cache_k, cache_v


class Transformer(nn.Module):
  config: PolicyConfig

  def setup(self):
    c = self.config
    self.embed = nn.Embed(c.vocab, c.dim)
    self.pos = self.param('pos', nn.initializers.normal(0.02), (c.max_len, c.dim))
    self.blocks = [Block(c) for _ in range(c.layers)]
    self.ln = nn.LayerNorm()
    self.head = nn.Dense(c.vocab)

  def __call__(self, tokens):  # [B, L] -> logits [B, L, V]
    x = self.embed(tokens) + self.pos[: tokens.shape[-1]]
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln(x))

  def step(self, token, pos, cache):  # token [B]; cache [layers, 2, B, Lmax, H, Dh]
    x = self.embed(token) + self.pos[pos]
    new = []
    for i, block in enumerate(self.blocks):
      x, k, v = block.step(x, pos, cache[i, 0], cache[i, 1])
      new.append(jnp.stack([k, v]))
    return self.head(self.ln(x)), jnp.stack(new)


class Rollouts(NamedTuple):
  """What SAPO and GRPO ask of a policy, for one node (vmapped over nodes by them).

  This small transformer's are ``Policy.rollouts``; a pretrained language model's
  are built by ``decsim.rl.lm_policy``. Prompts are task tokens (``tasks``);
  completions are the policy's own tokens, which ``task_tokens`` turns into task
  tokens for the verifier, the text a heterogeneous swarm shares (``hetero``), and
  ``from_text`` turns such text back into the policy's tokens.
  """

  sample: Callable  # (params, key, prompts [B, P], T, temperature) -> completions [B, T]
  token_logprobs: Callable  # (params, prompts [B, P], completions [B, T]) -> [B, T]
  completion_mask: Callable  # (completions [..., T]) -> 1.0 up to and including EOS [..., T]
  task_tokens: Callable  # (completions [..., T]) -> task tokens [..., T'] for the verifier
  from_text: Callable  # (task tokens [..., L], T) -> completions [..., T]: shared text re-encoded


class Policy(NamedTuple):
  """Pure functions of one node's policy; vmap them over the node axis."""

  config: PolicyConfig
  init: Callable  # (key) -> params
  apply: Callable  # (params, tokens [B, L]) -> logits [B, L, V]
  decode_step: Callable  # (params, token [B], pos, cache) -> (logits [B, V], cache)
  init_cache: Callable  # (batch) -> cache [layers, 2, B, Lmax, H, Dh]

  @property
  def rollouts(self) -> Rollouts:
    """Its completions are task tokens already."""
    return Rollouts(functools.partial(sample, self), functools.partial(token_logprobs, self),
                    completion_mask, lambda completions: completions, fit_text)


def make_policy(config: PolicyConfig = PolicyConfig()) -> Policy:
  model = Transformer(config)

  def init(key: PRNGKey) -> Params:
    return model.init(key, jnp.zeros((1, config.max_len), jnp.int32))['params']

  def apply(params: Params, tokens: jax.Array) -> jax.Array:
    return model.apply({'params': params}, tokens)

  def decode_step(params, token, pos, cache):
    return model.apply({'params': params}, token, pos, cache, method=Transformer.step)

  def init_cache(batch: int) -> jax.Array:
    c = config
    return jnp.zeros((c.layers, 2, batch, c.max_len, c.heads, c.dim // c.heads), jnp.float32)

  return Policy(config, init, apply, decode_step, init_cache)


def sample(policy: Policy, params: Params, key: PRNGKey, prompts: jax.Array, completion_len: int,
           temperature: float = 1.0) -> jax.Array:
  """Completions ``[B, T]`` of prompts ``[B, P]`` for one node, decoded with the KV cache.

  The prompt is fed one position at a time (teacher-forced), then ``T`` tokens are
  drawn at ``temperature`` (0: greedy). After the first EOS every token is PAD.
  """
  batch, p = prompts.shape
  total = p + completion_len
  if total > policy.config.max_len:
    raise ValueError(f'prompt {p} + completion {completion_len} exceeds max_len '
                     f'{policy.config.max_len}')
  keys = jax.random.split(key, completion_len)

  def step(carry, pos):
    token, cache, done = carry
    logits, cache = policy.decode_step(params, token, pos, cache)  # [B, V]
    t = pos - (p - 1)  # index of the completion token being drawn
    k = keys[jnp.clip(t, 0, completion_len - 1)]
    if temperature > 0:
      drawn = jax.random.categorical(k, logits / temperature, axis=-1)
    else:
      drawn = jnp.argmax(logits, axis=-1)
    drawn = jnp.where(done, tasks.PAD, drawn).astype(jnp.int32)
    forced = prompts[:, jnp.clip(pos + 1, 0, p - 1)]
    nxt = jnp.where(t >= 0, drawn, forced)
    done = done | ((t >= 0) & (drawn == tasks.EOS))
    return (nxt, cache, done), nxt

  init = (prompts[:, 0], policy.init_cache(batch), jnp.zeros((batch,), bool))
  _, out = jax.lax.scan(step, init, jnp.arange(total - 1))  # out [total-1, B]
  return out[p - 1:].T  # [B, T]


def fit_text(text: jax.Array, completion_len: int) -> jax.Array:
  """Task text ``[..., L]`` as ``[..., T]`` completions of this policy (its tokens are task
  tokens): cut after T characters, or padded with PAD."""
  cut = text[..., :completion_len]
  extra = completion_len - cut.shape[-1]
  return jnp.pad(cut, [(0, 0)] * (cut.ndim - 1) + [(0, extra)], constant_values=tasks.PAD)


def completion_mask(completions: jax.Array) -> jax.Array:
  """1 on tokens up to and including the first EOS, else 0. ``[..., T]``."""
  length = tasks.answer_length(completions)
  t = jnp.arange(completions.shape[-1])
  has_eos = (completions == tasks.EOS).any(-1)
  return (t < (length + has_eos)[..., None]).astype(jnp.float32)


def token_logprobs(policy: Policy, params: Params, prompts: jax.Array,
                   completions: jax.Array) -> jax.Array:
  """Teacher-forced log-probabilities ``[B, T]`` of completions ``[B, T]`` after prompts ``[B, P]``."""
  p = prompts.shape[-1]
  seq = jnp.concatenate([prompts, completions], axis=-1)  # [B, P+T]
  logits = policy.apply(params, seq[:, :-1])[:, p - 1:]  # [B, T, V]
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(logp, completions[..., None], axis=-1)[..., 0]
