"""GRPO: advantages, the clipped loss, and learning on a bandit-like task."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decsim.rl import grpo
from decsim.rl import policy as policy_lib
from decsim.rl import tasks


def test_group_advantages_hand_values():
  # one success in four: mean 0.25, unbiased std sqrt((0.5625 + 3 * 0.0625) / 3) = 0.5
  adv = grpo.group_advantages(jnp.array([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5],
                                         [1.0, 0.0, 1.0, 0.0]]))
  np.testing.assert_allclose(adv[0], [1.5, -0.5, -0.5, -0.5], atol=1e-6)
  np.testing.assert_allclose(adv[1], [0, 0, 0, 0], atol=1e-6)  # all equal: no signal
  s = np.sqrt(4 * 0.25 / 3)
  np.testing.assert_allclose(adv[2], [0.5 / s, -0.5 / s, 0.5 / s, -0.5 / s], atol=1e-5)


def test_nonzero_advantage_marks_all_equal_groups():
  r = jnp.array([[0, 0, 0], [1, 1, 1], [0, 1, 0], [0.5, 0.5, 0.4]], jnp.float32)
  np.testing.assert_array_equal(grpo.nonzero_advantage(r), [False, False, True, True])


def test_clipped_loss_hand_values():
  cfg = grpo.GRPOConfig()
  old = jnp.zeros((1, 3))
  mask = jnp.array([[1.0, 1.0, 0.0]])
  logp = jnp.log(jnp.array([[1.5, 0.5, 9.0]]))  # ratios 1.5 and 0.5; the third token is masked
  loss, frac = grpo.clipped_loss(logp, old, jnp.array([1.0]), mask, cfg)
  # A > 0: min(r, clip(r)) -> 1.28 (clipped high), 0.5 (unclipped) ; mean over 2 tokens
  assert float(loss) == pytest.approx(-(1.28 + 0.5) / 2, rel=1e-5)
  assert float(frac) == pytest.approx(0.5)
  loss, _ = grpo.clipped_loss(logp, old, jnp.array([-1.0]), mask, cfg)
  # A < 0: min(-r, -clip(r)) -> -1.5, -0.8 (clipped low at 1 - 0.2)
  assert float(loss) == pytest.approx((1.5 + 0.8) / 2, rel=1e-5)


CONFIG = policy_lib.PolicyConfig(max_len=tasks.PROMPT_LEN + 2, dim=16, heads=2, layers=1, mlp=32)


def _bandit_reward(completions):  # [..., 2]: 1.0 for the digit '7' as the first token
  return (completions[..., 0] == tasks.encode('7')[0]).astype(jnp.float32)


def test_grpo_raises_expected_reward_on_a_bandit():
  """One prompt, 18 tokens to choose from, reward 1 for '7' only.

  A fresh policy picks '7' with probability about 1/18 = 0.056. Threshold: after
  40 GRPO steps of 8 groups x 8 completions (lr 1e-2) the exact probability of '7'
  must exceed 0.5 — nine times chance; a sign error or a broken advantage leaves it
  near or below 1/18.
  """
  policy = policy_lib.make_policy(CONFIG)
  params = policy.init(jax.random.key(0))
  tx, update = grpo.make_grpo(policy, grpo.GRPOConfig(lr=1e-2))
  prompt = jnp.asarray(tasks.encode('  12+34=', tasks.PROMPT_LEN))[None].repeat(8, 0)  # [Q, P]

  def prob_seven(p):
    logits = policy.apply(p, prompt[:1])[0, -1]
    return jax.nn.softmax(logits)[tasks.encode('7')[0]]

  @jax.jit
  def step(p, s, key):
    out = policy_lib.sample(policy, p, key, jnp.repeat(prompt, 8, 0), 2).reshape(8, 8, 2)
    batch = grpo.Batch(prompt, out, _bandit_reward(out), jnp.ones(8))
    p, s, _ = update(p, s, batch)
    return p, s

  start = float(prob_seven(params))
  assert start < 0.2
  s = tx.init(params)
  for t in range(40):
    params, s = step(params, s, jax.random.key(t))
  assert float(prob_seven(params)) > 0.5


@pytest.mark.slow
def test_zero_weight_groups_do_not_move_the_policy_and_iterations_use_the_ratio():
  policy = policy_lib.make_policy(CONFIG)
  params = policy.init(jax.random.key(1))
  prompt = jnp.asarray(tasks.encode('  12+34=', tasks.PROMPT_LEN))[None].repeat(2, 0)
  out = policy_lib.sample(policy, params, jax.random.key(2), jnp.repeat(prompt, 4, 0), 2).reshape(2, 4, 2)
  rewards = jnp.array([[1.0, 0, 0, 0], [0, 1.0, 1.0, 0]])
  tx, update = grpo.make_grpo(policy, grpo.GRPOConfig(lr=1e-2))
  p0, _, stats = update(params, tx.init(params), grpo.Batch(prompt, out, rewards, jnp.zeros(2)))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), p0, params)
  assert float(stats.tokens) == 0
  # three iterations on one batch: later steps see ratios != 1 and can clip
  tx3, update3 = grpo.make_grpo(policy, grpo.GRPOConfig(lr=0.3, iterations=3))
  _, _, stats = update3(params, tx3.init(params), grpo.Batch(prompt, out, rewards, jnp.ones(2)))
  assert float(stats.clip_fraction) > 0
