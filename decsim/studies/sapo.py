"""SAPO (Gensyn, 2025), Figure/Table of I local / J external groups at I + J = 8.

The paper (8 Qwen2.5-0.5B nodes, ReasoningGYM, 2000 rounds, G = 8) reports
cumulative reward 8/0: 561.8, 6/2: 854.4, 4/4: 1093.3 (+94% over 8/0), 2/6: 945.9
with bigger swings. This study runs the same four splits, scaled down to
character-level policies of ~40k parameters on short procedural tasks (see
``decsim.rl``), over 8 seeds. As in the paper's controlled runs all nodes
start from one base model (``base_init='shared'``); the tasks are the two kinds
with multi-digit answers (``rev,add``), where the verifier's partial credit is
rare, so that most of a node's own groups are all-fail and carry no GRPO signal
at the start. The base models get 45 supervised warm-up steps (the launch
default is 50): weak enough that a lone node rarely takes off within the 200
rounds, so that sharing helps on every seed, not only on some (BUILD_NOTES.md,
"A robust sharing effect over seeds").

``cumulative_reward`` of a label is the mean over seeds of the sum over rounds
of the swarm-mean reward. The gain of a split over 8/0 is paired by seed (a
seed fixes the base models, the questions and the rollout keys of both runs):
``gain`` = mean_s(split) / mean_s(8/0) - 1 over the seeds both ran, the paper's
measure (a ratio of cumulative rewards), and ``gain_ci95`` its 95% Fieller
interval: the gains g for which a paired Student-t test of
split_s - (1 + g) 8/0_s has p >= 0.05. It accounts for the noise of the
denominator and for the pairing, is exact for normal per-seed values, and
excludes 0 exactly when the paired t-test of split - 8/0 rejects at 5%. Not
the mean of per-seed ratios (``seed_gains``, also kept): a seed whose 8/0 run
never takes off gives ratios of 20x that would dominate it. Not a bootstrap:
with 8 seeds a percentile bootstrap undercovers (normal, not Student-t, tails).
``study.json`` also keeps per seed the cumulative, initial and final rewards,
the take-off round and the early signal fraction.
"""

import dataclasses
import json
import pathlib
from typing import Any

import numpy as np

from decsim.rl import experiment
from decsim.rl.experiment import SapoRunConfig
from decsim.studies.common import write_study

SPLITS = ((8, 0), (6, 2), (4, 4), (2, 6))
PAPER = {'8/0': 561.8, '6/2': 854.4, '4/4': 1093.3, '2/6': 945.9}
WINDOW = 20  # rounds of the moving average in the plot and the swing measure
TAKE_OFF = 0.25  # half the reward ceiling of rev,add (rev solved, add not): a node has taken off


SEEDS = tuple(range(8))
WARMUP_STEPS = 45  # below the launch default (50): a lone node's take-off is rare (BUILD_NOTES.md)


def full_config() -> SapoRunConfig:
  """The launch defaults (the study's scale) with weaker identical base models."""
  return SapoRunConfig(warmup_min=WARMUP_STEPS, warmup_max=WARMUP_STEPS)


def quick_config() -> SapoRunConfig:
  return SapoRunConfig(nodes=4, generations=4, rounds=20, log_every=10, dim=16, layers=1,
                       warmup_min=5, warmup_max=20)


def run(out_dir: pathlib.Path, quick: bool = False) -> dict:
  """``launch/reproduce.py --study=sapo``: N = 8, 8 seeds (quick: N = 4, 1 seed, 20 rounds)."""
  if quick:
    return run_study(out_dir, quick_config(), seeds=(0,))
  return run_study(out_dir, full_config(), seeds=SEEDS)


def run_study(out_dir: pathlib.Path, base: SapoRunConfig, seeds=(0, 1, 2), splits=SPLITS,
              log=print) -> dict:
  """Runs every split for every seed into ``out_dir/<I>_<J>/seed<s>``; writes study.json and a plot."""
  from absl import logging
  logging.set_verbosity(logging.ERROR)  # orbax logs every checkpoint at INFO
  runs: dict[str, dict[str, Any]] = {}
  curves: dict[str, list[np.ndarray]] = {}
  for i, j in splits:
    label = f'{i}/{j}'
    per_seed, curves[label] = [], []
    for seed in seeds:
      config = dataclasses.replace(base, local_groups=i, external_groups=j, seed=seed)
      run_dir = out_dir / f'{i}_{j}' / f'seed{seed}'
      summary = experiment.run(config, out_dir=run_dir, log=lambda m: None)
      rows = [json.loads(l) for l in (run_dir / 'metrics.jsonl').read_text().splitlines()]
      rewards = np.asarray([r['reward'] for r in rows])  # [R]
      curves[label].append(rewards)
      per_seed.append({**summary, **take_off(rewards, [r['signal_fraction'] for r in rows])})
      log(f'{label} seed {seed}: cumulative reward {summary["cumulative_reward"]:.2f} '
          f'({summary["wall_seconds"] + summary["compile_seconds"]:.0f} s)')
    runs[label] = aggregate(per_seed, curves[label], seeds)
  base_cum = runs.get('8/0', {}).get('cumulative_reward')
  for label, r in runs.items():
    r['vs_8_0'] = r['cumulative_reward'] / base_cum - 1 if base_cum else None
    if label != '8/0' and '8/0' in runs:
      r.update(paired_gain(r, runs['8/0']))
    r['paper_cumulative_reward'] = PAPER.get(label)
    r['paper_vs_8_0'] = PAPER[label] / PAPER['8/0'] - 1 if label in PAPER else None
  for label, r in runs.items():
    if r.get('gain_ci95'):
      low, high = r['gain_ci95']
      log(f'{label} vs 8/0: {r["gain"]:+.1%}, 95% CI [{low:+.1%}, {high:+.1%}] '
          f'(Fieller, paired over {len(r["gain_seeds"])} seeds)')
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / 'config.json').write_text(json.dumps(
      {'seeds': list(seeds), 'splits': [f'{i}/{j}' for i, j in splits],
       **dataclasses.asdict(base)}, indent=2) + '\n')
  write_study(out_dir, 'sapo', runs, columns=('cumulative_reward', 'cumulative_reward_std',
                                              'vs_8_0', 'final_reward', 'swing', 'paper_vs_8_0'))
  plot(out_dir, curves)
  return runs


def aggregate(per_seed: list[dict], curves: list[np.ndarray], seeds) -> dict[str, Any]:
  cum = np.asarray([s['cumulative_reward'] for s in per_seed])
  # swing: round-to-round deviation of the swarm-mean reward from its moving average
  swing = [float(np.std(c - experiment.moving_average(c, WINDOW))) for c in curves]
  return {
      'cumulative_reward': float(cum.mean()),
      'cumulative_reward_std': float(cum.std(ddof=1)) if len(cum) > 1 else 0.0,
      'cumulative_rewards': cum.tolist(),
      'seeds': list(seeds),
      'initial_reward': float(np.mean([s['initial_reward'] for s in per_seed])),
      'final_reward': float(np.mean([s['final_reward'] for s in per_seed])),
      'final_rewards': [s['final_reward'] for s in per_seed],
      'initial_rewards': [s['initial_reward'] for s in per_seed],
      'take_off_rounds': [s['take_off_round'] for s in per_seed],
      'early_signal_fractions': [s['early_signal_fraction'] for s in per_seed],
      'swing': float(np.mean(swing)),
      'rounds': per_seed[0]['rounds'],
      'nodes': per_seed[0]['nodes'],
      'bytes_shared_per_node_round': float(np.mean([s['bytes_shared_per_node_round'] for s in per_seed])),
      'wall_seconds': float(sum(s['wall_seconds'] + s['compile_seconds'] for s in per_seed)),
  }


def take_off(rewards: np.ndarray, signal_fraction) -> dict[str, Any]:
  """The first round whose moving average reaches ``TAKE_OFF`` (None: never) and the
  mean fraction of a node's groups with a GRPO signal over the first ``WINDOW`` rounds."""
  above = np.flatnonzero(experiment.moving_average(rewards, WINDOW) >= TAKE_OFF)  # [k]
  return {'take_off_round': int(above[0]) + 1 if len(above) else None,
          'early_signal_fraction': float(np.mean(signal_fraction[:WINDOW]))}


def paired_gain(split: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
  """``split``'s gain over ``base`` (two ``aggregate`` records) on the seeds both ran.

  ``gain`` = mean(split) / mean(base) - 1 of the cumulative rewards, ``gain_ci95`` its
  95% Fieller interval over the paired seeds (``ratio_interval``; None where too few
  seeds or unbounded), ``seed_gains`` each common seed's own ratio - 1.
  """
  common = [s for s in split['seeds'] if s in base['seeds']]
  a = np.asarray([split['cumulative_rewards'][split['seeds'].index(s)] for s in common])  # [S]
  b = np.asarray([base['cumulative_rewards'][base['seeds'].index(s)] for s in common])  # [S]
  interval = ratio_interval(a, b) if len(common) else None
  return {'gain': float(a.mean() / b.mean() - 1) if len(common) else None,
          'gain_ci95': None if interval is None else [interval[0] - 1, interval[1] - 1],
          'gain_seeds': common,
          'seed_gains': (a / b - 1).tolist()}


def ratio_interval(a, b, level: float = 0.95) -> tuple[float, float] | None:
  """Fieller's interval for mean(a) / mean(b) from paired samples ``a[s]``, ``b[s]``.

  The set of ratios rho that a paired Student-t test on ``a - rho b`` (n - 1 degrees
  of freedom) does not reject at ``1 - level``: the rho with
  (mean(a) - rho mean(b))^2 <= q var(a - rho b), q = t^2 / n, a quadratic in rho.
  It contains 1 exactly when the paired t-test on a - b does not reject. None with
  fewer than two pairs, or when mean(b) is itself not significantly nonzero (the
  set is then unbounded).
  """
  import scipy.stats
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)  # [S], [S]
  n = len(a)
  if n < 2:
    return None
  q = float(scipy.stats.t.ppf(0.5 + level / 2, n - 1)) ** 2 / n
  cov = np.cov(a, b, ddof=1)  # [2, 2]
  qa = b.mean() ** 2 - q * cov[1, 1]  # rho^2 coefficient
  qb = a.mean() * b.mean() - q * cov[0, 1]  # -rho / 2 coefficient
  qc = a.mean() ** 2 - q * cov[0, 0]
  if qa <= 0:
    return None
  half = np.sqrt(max(qb * qb - qa * qc, 0.0))  # >= 0: rho = mean(a)/mean(b) satisfies it
  return float((qb - half) / qa), float((qb + half) / qa)


def plot(out_dir: pathlib.Path, curves: dict[str, list[np.ndarray]]) -> pathlib.Path:
  """Moving-average swarm reward per configuration: mean over seeds, band = min..max seed."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 3.8))
  for label, seeds in curves.items():
    ma = np.stack([experiment.moving_average(c, WINDOW) for c in seeds])  # [S, R]
    x = np.arange(1, ma.shape[1] + 1)
    line, = ax.plot(x, ma.mean(0), label=label)
    ax.fill_between(x, ma.min(0), ma.max(0), color=line.get_color(), alpha=0.15)
  ax.set_xlabel('round')
  ax.set_ylabel(f'swarm-mean reward ({WINDOW}-round moving average)')
  ax.set_title('SAPO: I local / J external groups')
  ax.grid(alpha=0.3)
  ax.legend(title='I/J')
  fig.tight_layout()
  path = out_dir / 'reward.png'
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
