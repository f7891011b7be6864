"""Qwen2-family causal language models in Flax, with KV-cache sampling and log-probs for GRPO.

The policies of SAPO's experiments (Gensyn, 2025) are Qwen2.5-0.5B models
(Qwen Team, 2024, "Qwen2 Technical Report", arXiv:2407.10671; Qwen2.5 shares its
architecture): a decoder-only transformer with

* RMSNorm before attention and before the MLP, and once more before the head;
* rotary position embeddings (Su et al., 2021) with base ``rope_theta``, applied
  to the two halves of each head (``rotate_half``), as the reference does;
* grouped-query attention (Ainslie et al., 2023): ``num_heads`` query heads share
  ``num_kv_heads`` key/value heads; q, k and v projections have biases, the
  output projection has none;
* a SwiGLU MLP (Shazeer, 2020): ``down(silu(gate(x)) * up(x))``, no biases;
* an output head tied to the token embedding or its own, per ``tie_word_embeddings``.

The reference is transformers' ``models/qwen2/modeling_qwen2.py`` (classes
``Qwen2RMSNorm``, ``Qwen2RotaryEmbedding``, ``Qwen2Attention``, ``Qwen2MLP``,
``Qwen2DecoderLayer``); ``tests/test_rl_qwen2.py`` checks logits and greedy
generations against it on a stored tiny checkpoint. Not implemented: sliding-window
attention (Qwen2.5 ships with ``use_sliding_window: false``) and rope scaling.

One node's model works on ``[B, L]`` token rows. The layers are one ``nn.scan``
(parameters ``[layers, ...]``), so a 24-layer model compiles one layer. Rows may
be left-padded: ``valid [B, L]`` marks real tokens, a row's positions count its
real tokens only, and no query attends to a padding key (as transformers does
with an attention mask). A ``Cache`` holds keys and values of all layers for
``max_len`` slots; ``forward`` writes the new tokens' keys and values into it at
``cache.index`` and attends over it, so a prompt is prefilled in one call and each
completion token costs one more call of length 1 (``sample``).

Precision (``precision``): ``float32`` (parameters and compute), ``bfloat16``
(both), or ``bfloat16_master`` (float32 master parameters that the optimiser
updates, cast to bfloat16 for every forward pass). Attention scores, softmax,
RMSNorm and the logits are float32 in all three.
"""

from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from decsim.types import Params, PRNGKey

PRECISIONS = ('float32', 'bfloat16', 'bfloat16_master')
_MASKED = -1e30  # attention score of a key a query may not see (finite: no NaN on all-masked rows)


class Qwen2Config(NamedTuple):
  """The architecture (``config.json``'s fields) and how to run it."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = True
  precision: str = 'float32'  # one of PRECISIONS

  @property
  def param_dtype(self):
    return jnp.bfloat16 if self.precision == 'bfloat16' else jnp.float32

  @property
  def compute_dtype(self):
    return jnp.float32 if self.precision == 'float32' else jnp.bfloat16


class Cache(NamedTuple):
  """Keys and values of every layer for ``max_len`` slots of B rows."""

  k: jax.Array  # [layers, B, max_len, Hkv, Dh]
  v: jax.Array  # [layers, B, max_len, Hkv, Dh]
  valid: jax.Array  # [B, max_len] bool: the slot holds a real (not padding) token
  length: jax.Array  # [B] int32: real tokens written so far (the next token's position)
  index: jax.Array  # [] int32: slots written so far


def rope(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """cos and sin ``[B, L, Dh]`` (float32) of positions ``[B, L]``; halves repeated, as the reference."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))  # [Dh/2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, Dh/2]
  angles = jnp.concatenate([angles, angles], axis=-1)  # [B, L, Dh]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates ``x [B, L, H, Dh]`` by the angles ``[B, L, Dh]`` (``x cos + rotate_half(x) sin``)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos, sin = cos[:, :, None].astype(x.dtype), sin[:, :, None].astype(x.dtype)
  return x * cos + rotated * sin


class RMSNorm(nn.Module):
  eps: float
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # [..., D]
    weight = self.param('weight', nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt((x32 ** 2).mean(-1, keepdims=True) + self.eps)
    return weight.astype(x.dtype) * normed.astype(x.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Grouped-query attention: ``q [B, L, H, Dh]``, ``k, v [B, M, Hkv, Dh]``, ``mask [B, L, M]``
  -> ``[B, L, H, Dh]``. Scores and softmax in float32."""
  b, length, heads, dh = q.shape
  groups = heads // k.shape[2]
  q = q.reshape(b, length, k.shape[2], groups, dh)  # query head h uses kv head h // groups
  scores = jnp.einsum('blkgd,bmkd->bkglm', q, k, preferred_element_type=jnp.float32)
  scores = jnp.where(mask[:, None, None], scores * dh ** -0.5, _MASKED)
  weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)  # [B, Hkv, G, L, M]
  out = jnp.einsum('bkglm,bmkd->blkgd', weights, v)
  return out.reshape(b, length, heads, dh)


class Context(NamedTuple):
  """What every layer of one forward call shares."""

  cos: jax.Array  # [B, L, Dh]
  sin: jax.Array  # [B, L, Dh]
  mask: jax.Array  # [B, L, M] bool: query l may attend to key slot m
  index: jax.Array | None  # [] int32 slot of the first new token in the cache (None: no cache)


class DecoderLayer(nn.Module):
  """One pre-norm block: attention then SwiGLU MLP, each added to the residual."""

  config: Qwen2Config

  def _dense(self, features: int, bias: bool, name: str):
    c = self.config
    return nn.Dense(features, use_bias=bias, dtype=c.compute_dtype, param_dtype=c.param_dtype,
                    kernel_init=nn.initializers.normal(0.02), name=name)

  @nn.compact
  def __call__(self, x, layer_cache, ctx: Context):  # x [B, L, D]; layer_cache (k, v) or None
    c = self.config
    h = RMSNorm(c.rms_norm_eps, c.param_dtype, name='input_layernorm')(x)
    heads = lambda y, n: y.reshape(*y.shape[:-1], n, c.head_dim)
    q = heads(self._dense(c.num_heads * c.head_dim, True, 'q_proj')(h), c.num_heads)
    k = heads(self._dense(c.num_kv_heads * c.head_dim, True, 'k_proj')(h), c.num_kv_heads)
    v = heads(self._dense(c.num_kv_heads * c.head_dim, True, 'v_proj')(h), c.num_kv_heads)
    q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
    if layer_cache is not None:  # write this call's keys and values, attend over all slots
      write = lambda old, new: jax.lax.dynamic_update_slice_in_dim(old, new.astype(old.dtype),
                                                                  ctx.index, axis=1)
      k, v = write(layer_cache[0], k), write(layer_cache[1], v)
      layer_cache = (k, v)
    out = attend(q, k.astype(q.dtype), v.astype(q.dtype), ctx.mask)  # [B, L, H, Dh]
    x = x + self._dense(c.hidden_size, False, 'o_proj')(out.reshape(*out.shape[:2], -1))
    h = RMSNorm(c.rms_norm_eps, c.param_dtype, name='post_attention_layernorm')(x)
    gate = self._dense(c.intermediate_size, False, 'gate_proj')(h)
    up = self._dense(c.intermediate_size, False, 'up_proj')(h)
    x = x + self._dense(c.hidden_size, False, 'down_proj')(nn.silu(gate) * up)
    return x, layer_cache


class Qwen2(nn.Module):
  """Embedding, ``num_layers`` scanned decoder layers, final RMSNorm, head (tied or not)."""

  config: Qwen2Config

  @nn.compact
  def __call__(self, tokens, ctx: Context, kv, logits_from: int = 0):
    """tokens [B, L]; kv (k, v) [layers, ...] or None -> logits [B, L - logits_from, V], kv."""
    c = self.config
    embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.compute_dtype,
                     param_dtype=c.param_dtype, embedding_init=nn.initializers.normal(0.02),
                     name='embed_tokens')
    layers = nn.scan(DecoderLayer, variable_axes={'params': 0}, split_rngs={'params': True},
                     in_axes=(0, nn.broadcast), length=c.num_layers)(c, name='layers')
    x, kv = layers(embed(tokens), kv, ctx)  # [B, L, D]
    x = RMSNorm(c.rms_norm_eps, c.param_dtype, name='norm')(x[:, logits_from:])
    if c.tie_word_embeddings:
      logits = embed.attend(x)
    else:
      logits = nn.Dense(c.vocab_size, use_bias=False, dtype=c.compute_dtype,
                        param_dtype=c.param_dtype, name='lm_head')(x)
    return logits.astype(jnp.float32), kv  # [B, L - logits_from, V]


def init_cache(config: Qwen2Config, batch: int, max_len: int) -> Cache:
  """An empty cache of ``max_len`` slots (keys and values in the compute dtype)."""
  shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_dim)
  zeros = jnp.zeros(shape, config.compute_dtype)
  return Cache(zeros, zeros, jnp.zeros((batch, max_len), bool), jnp.zeros((batch,), jnp.int32),
               jnp.zeros((), jnp.int32))


def positions_of(valid: jax.Array, start: jax.Array) -> jax.Array:
  """Position of each token ``[B, L]``: real tokens before it in its row (padding: clipped)."""
  return jnp.maximum(start[:, None] + jnp.cumsum(valid, axis=1) - 1, 0)


def full_context(config: Qwen2Config, valid: jax.Array) -> Context:
  """Causal, padding-aware context of a whole-sequence (cache-less) pass over ``valid [B, L]``."""
  length = valid.shape[1]
  cos, sin = rope(positions_of(valid, jnp.zeros(valid.shape[:1], jnp.int32)), config.head_dim,
                  config.rope_theta)
  causal = jnp.tril(jnp.ones((length, length), bool))
  return Context(cos, sin, causal[None] & valid[:, None, :], None)


def cached_context(config: Qwen2Config, valid: jax.Array, cache: Cache) -> tuple[Context, Cache]:
  """Context of L new tokens written at ``cache.index``, and the cache's bookkeeping after them."""
  length, max_len = valid.shape[1], cache.valid.shape[1]
  cos, sin = rope(positions_of(valid, cache.length), config.head_dim, config.rope_theta)
  slots = cache.index + jnp.arange(length)  # [L]
  key_valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, valid, cache.index, axis=1)
  mask = (jnp.arange(max_len)[None, :] <= slots[:, None])[None] & key_valid[:, None, :]
  after = cache._replace(valid=key_valid, length=cache.length + valid.sum(1).astype(jnp.int32),
                         index=cache.index + length)
  return Context(cos, sin, mask, cache.index), after


class LanguageModel(NamedTuple):
  """Pure functions of one node's model; vmap them over the node axis."""

  config: Qwen2Config
  init: Callable  # (key) -> params
  # (params, tokens [B, L], valid [B, L] | None, logits_from=0) -> logits [B, L - from, V]
  apply: Callable
  # (params, tokens [B, L], valid [B, L], cache, logits_from=0) -> (logits [B, L - from, V], cache)
  forward: Callable
  init_cache: Callable  # (batch, max_len) -> Cache


def compute_params(config: Qwen2Config, params: Params) -> Params:
  """The parameters a forward pass uses: float32 master weights cast to bfloat16."""
  if config.precision == 'bfloat16_master':
    return jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  return params


def make_model(config: Qwen2Config) -> LanguageModel:
  if config.precision not in PRECISIONS:
    raise ValueError(f'precision {config.precision!r} is unknown: choose one of {PRECISIONS}')
  module = Qwen2(config)

  def init(key: PRNGKey) -> Params:
    tokens = jnp.zeros((1, 2), jnp.int32)
    ctx = full_context(config, jnp.ones((1, 2), bool))
    return module.init(key, tokens, ctx, None)['params']

  def apply(params: Params, tokens: jax.Array, valid: jax.Array | None = None,
            logits_from: int = 0) -> jax.Array:
    valid = jnp.ones(tokens.shape, bool) if valid is None else valid
    logits, _ = module.apply({'params': compute_params(config, params)}, tokens,
                             full_context(config, valid), None, logits_from)
    return logits

  def forward(params: Params, tokens: jax.Array, valid: jax.Array, cache: Cache,
              logits_from: int = 0):
    ctx, after = cached_context(config, valid, cache)
    logits, (k, v) = module.apply({'params': compute_params(config, params)}, tokens, ctx,
                                  (cache.k, cache.v), logits_from)
    return logits, after._replace(k=k, v=v)

  return LanguageModel(config, init, apply, forward,
                       lambda batch, max_len: init_cache(config, batch, max_len))


def top_p_filter(logits: jax.Array, top_p: float) -> jax.Array:
  """Logits ``[B, V]`` outside the smallest set of tokens whose probability reaches
  ``top_p`` set to -inf (nucleus sampling, Holtzman et al. 2020; the top token always stays)."""
  if top_p >= 1.0:
    return logits
  probs = jax.nn.softmax(logits, axis=-1)
  order = jnp.argsort(-probs, axis=-1)  # [B, V] descending
  sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
  keep_sorted = (jnp.cumsum(sorted_probs, axis=-1) - sorted_probs) < top_p  # mass before < p
  keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
      keep_sorted)
  return jnp.where(keep, logits, -jnp.inf)


def draw(key: PRNGKey, logits: jax.Array, temperature: float, top_p: float) -> jax.Array:
  """One token per row of ``logits [B, V]``: greedy at temperature 0, else tempered nucleus sampling."""
  if temperature <= 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  filtered = top_p_filter(logits / temperature, top_p)
  return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


class Sampling(NamedTuple):
  completion_len: int  # T tokens drawn after the prompt
  temperature: float = 1.0  # 0: greedy
  top_p: float = 1.0  # 1: no nucleus filter
  eos_ids: tuple[int, ...] = ()  # a row stops after its first such token
  pad_id: int = 0  # written after a row stopped


def sample(model: LanguageModel, params: Params, key: PRNGKey, prompts: jax.Array,
           prompt_valid: jax.Array, s: Sampling) -> jax.Array:
  """Completions ``[B, T]`` of left-padded prompts ``[B, P]`` (``prompt_valid`` marks real tokens).

  The prompt is prefilled in one forward call; then each token is drawn from the
  last logits and fed back through the KV cache. After a row's first EOS every
  token is ``pad_id``.
  """
  batch, p = prompts.shape
  logits, cache = model.forward(params, prompts, prompt_valid,
                                model.init_cache(batch, p + s.completion_len), p - 1)  # [B, 1, V]
  eos = jnp.asarray(s.eos_ids if s.eos_ids else (-1,), jnp.int32)

  def step(carry, k):
    last, cache, done = carry  # last [B, V]
    token = jnp.where(done, s.pad_id, draw(k, last, s.temperature, s.top_p))  # [B]
    done = done | jnp.isin(token, eos)
    logits, cache = model.forward(params, token[:, None], jnp.ones((batch, 1), bool), cache)
    return (logits[:, -1], cache, done), token

  init = (logits[:, -1], cache, jnp.zeros((batch,), bool))
  _, tokens = jax.lax.scan(step, init, jax.random.split(key, s.completion_len))  # [T, B]
  return tokens.T


def completion_mask(completions: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
  """1.0 on tokens up to and including the first EOS, else 0. ``[..., T]``."""
  is_eos = jnp.isin(completions, jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32))
  ended_before = jnp.cumsum(is_eos, axis=-1) - is_eos  # EOS tokens strictly before t
  return (ended_before == 0).astype(jnp.float32)


def token_logprobs(model: LanguageModel, params: Params, prompts: jax.Array,
                   prompt_valid: jax.Array, completions: jax.Array) -> jax.Array:
  """Teacher-forced log-probabilities ``[B, T]`` of completions ``[B, T]`` after left-padded
  prompts ``[B, P]``: one whole-sequence pass, the head and a float32 log-softmax on the T
  positions that predict completion tokens only (the vocabulary is large)."""
  p = prompts.shape[-1]
  seq = jnp.concatenate([prompts, completions], axis=-1)[:, :-1]  # [B, P+T-1]
  valid = jnp.concatenate([prompt_valid, jnp.ones(completions.shape, bool)], axis=-1)[:, :-1]
  logits = model.apply(params, seq, valid, p - 1)  # [B, T, V]: the head on completion positions only
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(logp, completions[..., None], axis=-1)[..., 0]
