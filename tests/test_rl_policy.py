"""The policy: KV-cache decoding equals the full forward pass; vmapped sampling equals per-node sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decsim.rl import policy as policy_lib
from decsim.rl import tasks

_questions = jax.jit(tasks.sample_questions, static_argnums=(1, 2))  # eager vmap(switch) is slow

CONFIG = policy_lib.PolicyConfig(max_len=12, dim=16, heads=2, layers=2, mlp=32)


def _stacked(policy, n):
  return jax.vmap(policy.init)(jax.random.split(jax.random.key(0), n))


def test_kv_cache_decode_equals_full_forward():
  policy = policy_lib.make_policy(CONFIG)
  params = policy.init(jax.random.key(1))
  tokens = jax.random.randint(jax.random.key(2), (3, CONFIG.max_len), 0, CONFIG.vocab)
  full = policy.apply(params, tokens)  # [B, L, V]

  def step(cache, pos):
    logits, cache = policy.decode_step(params, tokens[:, pos], pos, cache)
    return cache, logits

  _, stepped = jax.lax.scan(step, policy.init_cache(3), jnp.arange(CONFIG.max_len))
  np.testing.assert_allclose(np.swapaxes(stepped, 0, 1), full, atol=2e-5)
  # the cache matters: a later position's logits depend on earlier tokens
  changed = tokens.at[:, 0].set((tokens[:, 0] + 1) % CONFIG.vocab)
  assert not np.allclose(policy.apply(params, changed)[:, -1], full[:, -1], atol=1e-4)


def test_sampled_tokens_follow_the_teacher_forced_distribution():
  """Greedy decoding through the cache picks the argmax of the full forward pass at each step."""
  policy = policy_lib.make_policy(CONFIG)
  params = policy.init(jax.random.key(3))
  prompts = _questions(jax.random.key(4), (5,)).prompt[:, -4:]  # [5, 4]
  out = policy_lib.sample(policy, params, jax.random.key(0), prompts, 6, temperature=0.0)
  seq = jnp.concatenate([prompts, out], -1)
  logits = policy.apply(params, seq[:, :-1])[:, 3:]  # predictions of the completion tokens
  greedy = np.asarray(jnp.argmax(logits, -1))
  mask = np.asarray(policy_lib.completion_mask(out)).astype(bool)
  np.testing.assert_array_equal(np.asarray(out)[mask], greedy[mask])


def test_vmapped_sampling_equals_per_node_sampling():
  policy = policy_lib.make_policy(CONFIG)
  n = 4
  params = _stacked(policy, n)
  keys = jax.random.split(jax.random.key(5), n)
  prompts = _questions(jax.random.key(6), (n, 3)).prompt[..., -6:]  # [N, 3, 6]
  sample = lambda p, k, x: policy_lib.sample(policy, p, k, x, 6, temperature=1.0)
  together = jax.jit(jax.vmap(sample))(params, keys, prompts)
  for i in range(n):
    alone = jax.jit(sample)(jax.tree.map(lambda x: x[i], params), keys[i], prompts[i])
    np.testing.assert_array_equal(together[i], alone)
  assert not np.array_equal(together[0], together[1])  # nodes do differ


@pytest.mark.slow
def test_eos_masks_the_rest_of_the_completion():
  policy = policy_lib.make_policy(CONFIG)
  params = _stacked(policy, 1)
  prompts = _questions(jax.random.key(7), (64,)).prompt[:, -4:]
  out = np.asarray(policy_lib.sample(policy, jax.tree.map(lambda x: x[0], params),
                                     jax.random.key(8), prompts, 8, temperature=3.0))
  had_eos = 0
  for row in out:
    hits = np.flatnonzero(row == tasks.EOS)
    if len(hits):
      had_eos += 1
      assert (row[hits[0] + 1:] == tasks.PAD).all()
  assert had_eos > 0
  mask = np.asarray(policy_lib.completion_mask(jnp.asarray(out)))
  assert ((mask == 0) | (mask == 1)).all() and (mask[:, 0] == 1).all()
