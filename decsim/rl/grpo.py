"""GRPO as in Gensyn's trainer (genrl), for one node; SAPO vmaps it over nodes.

Group Relative Policy Optimization (Shao et al., 2024, DeepSeekMath) with the
settings of SAPO (Gensyn, 2025): per question a group of G completions; the
advantage of completion g is ``(r_g - mean(r)) / (std(r) + 1e-8)`` over its group
(``std`` unbiased, as ``torch.std``); the PPO-clip objective with asymmetric
clip ``[1 - 0.2, 1 + 0.28]`` (DAPO's clip-higher); a reference-KL term whose
coefficient is 0 by default; the loss is summed over completion tokens and
divided by the number of completion tokens in the batch; Adam. With
``iterations > 1`` the same batch is reused and the importance ratio
``exp(logp - logp_old)`` departs from 1.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from decsim.rl import policy as policy_lib
from decsim.types import Params


class GRPOConfig(NamedTuple):
  lr: float = 1e-3
  eps_low: float = 0.2
  eps_high: float = 0.28
  kl_coef: float = 0.0  # > 0: k3 estimate of KL(policy || reference)
  iterations: int = 1  # optimiser steps on one batch per round
  adam_eps: float = 1e-8


class Batch(NamedTuple):
  """One node's training groups: Q questions of G completions each."""

  prompts: jax.Array  # [Q, P]
  completions: jax.Array  # [Q, G, T]
  rewards: jax.Array  # [Q, G]
  weight: jax.Array  # [Q] 1 for a group to train on, 0 for padding (e.g. no external group left)


class GRPOStats(NamedTuple):
  loss: jax.Array  # [] loss of the first iteration
  clip_fraction: jax.Array  # [] tokens whose ratio was clipped, last iteration
  tokens: jax.Array  # [] completion tokens trained on


def group_advantages(rewards: jax.Array) -> jax.Array:
  """``(r - mean) / (std + 1e-8)`` over the last (group) axis; std unbiased. ``[..., G]``."""
  g = rewards.shape[-1]
  mean = rewards.mean(-1, keepdims=True)
  std = jnp.sqrt(((rewards - mean) ** 2).sum(-1, keepdims=True) / max(g - 1, 1))
  return (rewards - mean) / (std + 1e-8)


def nonzero_advantage(rewards: jax.Array) -> jax.Array:
  """True for groups whose rewards are not all equal. ``[..., G] -> [...]``."""
  return (rewards.max(-1) - rewards.min(-1)) > 1e-6


def clipped_loss(logp, old_logp, advantages, mask, config: GRPOConfig, ref_logp=None):
  """Summed PPO-clip loss over masked tokens / masked token count; also the clip fraction.

  ``logp, old_logp, mask [B, T]``, ``advantages [B]``.
  """
  ratio = jnp.exp(logp - old_logp)
  adv = advantages[:, None]
  clipped = jnp.clip(ratio, 1 - config.eps_low, 1 + config.eps_high)
  per_token = -jnp.minimum(ratio * adv, clipped * adv)
  if config.kl_coef > 0 and ref_logp is not None:
    d = ref_logp - logp
    per_token = per_token + config.kl_coef * (jnp.exp(d) - d - 1)
  tokens = jnp.maximum(mask.sum(), 1.0)
  was_clipped = ((ratio > 1 + config.eps_high) & (adv > 0)) | ((ratio < 1 - config.eps_low) & (adv < 0))
  clip_frac = (was_clipped * mask).sum() / tokens
  return (per_token * mask).sum() / tokens, clip_frac


def make_grpo(policy: policy_lib.Policy | Any, config: GRPOConfig = GRPOConfig()):
  """Returns ``(tx, update)``; ``update(params, opt_state, batch, ref_params) -> (params, opt_state, stats)``.

  ``update`` is for one node; ``ref_params`` is only read when ``kl_coef > 0``. ``policy``
  is anything with ``rollouts`` (``policy.Rollouts``): the small policy or an ``LMPolicy``.
  """
  tx = optax.adam(config.lr, eps=config.adam_eps)

  def update(params: Params, opt_state: optax.OptState, batch: Batch, ref_params: Params = None):
    q, g, t = batch.completions.shape
    prompts = jnp.repeat(batch.prompts, g, axis=0)  # [Q*G, P]
    completions = batch.completions.reshape(q * g, t)  # [Q*G, T]
    adv = (group_advantages(batch.rewards) * batch.weight[:, None]).reshape(q * g)  # [Q*G]
    mask = policy.rollouts.completion_mask(completions) * jnp.repeat(batch.weight, g)[:, None]
    logp_of = lambda p: policy.rollouts.token_logprobs(p, prompts, completions)
    # re-encoding under the node's own policy: the old log-probs are its own
    old_logp = jax.lax.stop_gradient(logp_of(params))
    ref_logp = None
    if config.kl_coef > 0 and ref_params is not None:
      ref_logp = jax.lax.stop_gradient(logp_of(ref_params))

    def loss_fn(p):
      return clipped_loss(logp_of(p), old_logp, adv, mask, config, ref_logp)

    def step(carry, _):
      p, s = carry
      (loss, clip_frac), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
      updates, s = tx.update(grads, s, p)
      return (optax.apply_updates(p, updates), s), (loss, clip_frac)

    (params, opt_state), (losses, clip_fracs) = jax.lax.scan(
        step, (params, opt_state), None, length=config.iterations)
    return params, opt_state, GRPOStats(losses[0], clip_fracs[-1], mask.sum())

  return tx, update
