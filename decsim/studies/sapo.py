"""SAPO (Gensyn, 2025), Figure/Table of I local / J external groups at I + J = 8.

The paper (8 Qwen2.5-0.5B nodes, ReasoningGYM, 2000 rounds, G = 8) reports
cumulative reward 8/0: 561.8, 6/2: 854.4, 4/4: 1093.3 (+94% over 8/0), 2/6: 945.9
with bigger swings. This study runs the same four splits, scaled down to
character-level policies of ~40k parameters on short procedural tasks (see
``decsim.rl``), over several seeds. As in the paper's controlled runs all nodes
start from one base model (``base_init='shared'``, 50 warm-up steps); the tasks
are the two kinds with multi-digit answers (``rev,add``), where the verifier's
partial credit is rare, so that most of a node's own groups are all-fail and
carry no GRPO signal at the start. ``cumulative_reward`` of a label is the mean
over seeds of the sum over rounds of the swarm-mean reward; ``study.json`` also
keeps every seed's value, the ratio to 8/0 and two variability measures.
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


def full_config() -> SapoRunConfig:
  return SapoRunConfig()  # the launch defaults are the study's scale (BUILD_NOTES.md)


def quick_config() -> SapoRunConfig:
  return SapoRunConfig(nodes=4, generations=4, rounds=20, log_every=10, dim=16, layers=1,
                       warmup_min=5, warmup_max=20)


def run(out_dir: pathlib.Path, quick: bool = False) -> dict:
  """``launch/reproduce.py --study=sapo``: N = 8, 3 seeds (quick: N = 4, 1 seed, 20 rounds)."""
  if quick:
    return run_study(out_dir, quick_config(), seeds=(0,))
  return run_study(out_dir, full_config(), seeds=(0, 1, 2))


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
      rewards = np.asarray([json.loads(l)['reward'] for l in
                            (run_dir / 'metrics.jsonl').read_text().splitlines()])
      curves[label].append(rewards)
      per_seed.append(summary)
      log(f'{label} seed {seed}: cumulative reward {summary["cumulative_reward"]:.2f} '
          f'({summary["wall_seconds"] + summary["compile_seconds"]:.0f} s)')
    runs[label] = aggregate(per_seed, curves[label])
  base_cum = runs.get('8/0', {}).get('cumulative_reward')
  for label, r in runs.items():
    r['vs_8_0'] = r['cumulative_reward'] / base_cum - 1 if base_cum else None
    r['paper_cumulative_reward'] = PAPER.get(label)
    r['paper_vs_8_0'] = PAPER[label] / PAPER['8/0'] - 1 if label in PAPER else None
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / 'config.json').write_text(json.dumps(
      {'seeds': list(seeds), 'splits': [f'{i}/{j}' for i, j in splits],
       **dataclasses.asdict(base)}, indent=2) + '\n')
  write_study(out_dir, 'sapo', runs, columns=('cumulative_reward', 'cumulative_reward_std',
                                              'vs_8_0', 'final_reward', 'swing', 'paper_vs_8_0'))
  plot(out_dir, curves)
  return runs


def aggregate(per_seed: list[dict], curves: list[np.ndarray]) -> dict[str, Any]:
  cum = np.asarray([s['cumulative_reward'] for s in per_seed])
  # swing: round-to-round deviation of the swarm-mean reward from its moving average
  swing = [float(np.std(c - experiment.moving_average(c, WINDOW))) for c in curves]
  return {
      'cumulative_reward': float(cum.mean()),
      'cumulative_reward_std': float(cum.std(ddof=1)) if len(cum) > 1 else 0.0,
      'cumulative_rewards': cum.tolist(),
      'initial_reward': float(np.mean([s['initial_reward'] for s in per_seed])),
      'final_reward': float(np.mean([s['final_reward'] for s in per_seed])),
      'final_rewards': [s['final_reward'] for s in per_seed],
      'swing': float(np.mean(swing)),
      'rounds': per_seed[0]['rounds'],
      'nodes': per_seed[0]['nodes'],
      'bytes_shared_per_node_round': float(np.mean([s['bytes_shared_per_node_round'] for s in per_seed])),
      'wall_seconds': float(sum(s['wall_seconds'] + s['compile_seconds'] for s in per_seed)),
  }


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
