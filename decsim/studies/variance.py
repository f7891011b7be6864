"""The vanishing-variance study (Tian et al., 2024, "Vanishing Variance Problem in Fully
Decentralized Neural-Network Systems").

``variance``: LeNet-5 (Xavier init, an independent draw per node), 100 nodes, a
random 8-regular graph, Dirichlet(0.5) label skew, local SGD with momentum 0.9
and learning rate 0.05 (the project default, stable for every label here), on
MNIST-1D (the dataset available offline; ``dataset=`` picks another). Labels:

* ``gossip`` / ``gossip_vc``: gossip learning with DFL2's semantics on the simulated
  network (``--gossip_mode=dfl2``): every node trains one batch every 8-12 simulated
  seconds and pushes the result to all neighbours, merging 0.5 self + 0.5 mean(received)
  once it holds 2 models; ``_vc`` adds variance correction ('received': the mean
  variance of the received models, own excluded);
* ``dpsgd`` / ``dpsgd_vc``: D-PSGD, Metropolis-Hastings weights, 5 local steps;
* ``fedavg``: FedAvg, 10 of 100 clients per round, 5 local steps.

``rounds_to_target`` is in ticks for gossip and rounds otherwise;
``periods_to_target`` puts gossip on the others' scale (ticks / ticks per wake-up
period: in one period every node sends once, as in one D-PSGD round). Every run also
reports ``seconds_to_target`` (simulated), ``bytes_to_target`` and
``node_steps_to_target`` (local optimiser steps summed over nodes), all on the nodes'
own accuracy; the node-average model's is ``consensus_rounds_to_*``. Writes
``study.json``, one run directory per label and ``variance.png`` (accuracy and
per-layer weight variance / Xavier variance over periods).

``variance_sweep``: gossip with and without correction over degree 3..24 and
N 50..1000 (``quick``: a 2 x 2 corner), rounds-to-target of each.
"""

import dataclasses
import json
import pathlib
from typing import Any

from decsim import experiment
from decsim.experiment import ExperimentConfig
from decsim.studies.common import write_study

TARGETS = (0.5, 0.6, 0.7, 0.8)


def base_config(quick: bool = False, dataset: str = 'mnist1d') -> ExperimentConfig:
  return ExperimentConfig(
      protocol='dpsgd', dataset=dataset, num_samples=10_000, model='lenet', partition='dirichlet', alpha=0.5,
      nodes=100, topology='kregular', degree=8, init='independent', optimizer='sgd', lr=0.05,
      momentum=0.9, batch_size=32, target_accuracy=0.6, seed=0,
      rounds=40 if quick else 150, eval_every=5)


def configs(quick: bool = False, dataset: str = 'mnist1d') -> dict[str, ExperimentConfig]:
  base = base_config(quick, dataset)
  ticks = 400 if quick else 2000
  gossip = dataclasses.replace(
      base, protocol='gossip', gossip_mode='dfl2', gossip_peers='all_neighbours',
      gossip_merge='half', gossip_period_seconds=10.0, tick_seconds=1.0, gossip_buffer=2,
      gossip_wake='uniform', local_steps=1, rounds=ticks, eval_every=25,
      # ~10 of 100 nodes wake per tick; 40 training rows almost never overflow
      # (overflow is postponed a tick and counted in the run's 'gossip_dropped').
      gossip_max_active=40)
  dpsgd = dataclasses.replace(base, protocol='dpsgd', local_steps=5)
  return {
      'gossip': gossip,
      'gossip_vc': dataclasses.replace(gossip, variance_correction='received'),
      'dpsgd': dpsgd,
      'dpsgd_vc': dataclasses.replace(dpsgd, variance_correction='received'),
      'fedavg': dataclasses.replace(base, protocol='fedavg', init='shared', sample_size=10,
                                    local_steps=5, rounds=2 * base.rounds),
  }


def _first(rows: list[dict], key: str, target: float) -> int | None:
  return next((r['round'] for r in rows if r.get(key) is not None and r[key] >= target), None)


def run_one(c: ExperimentConfig, out: pathlib.Path) -> dict[str, Any]:
  summary = experiment.run(c, out_dir=out, log=lambda _: None)
  rows = [json.loads(l) for l in open(out / 'metrics.jsonl') if l.strip()]
  period = c.gossip_period_seconds / c.tick_seconds if c.protocol == 'gossip' else 1
  summary['unit'] = 'ticks' if c.protocol == 'gossip' else 'rounds'
  summary['round_unit_per_period'] = period
  hit = summary['rounds_to_target']
  summary['periods_to_target'] = None if hit is None else hit / period
  steps = 0
  summary['node_steps_to_target'] = None
  for r in rows:
    steps += r.get('node_steps') or 0
    if hit is not None and r['round'] == hit:
      summary['node_steps_to_target'] = steps
  for t in TARGETS:
    summary[f'rounds_to_{t}'] = _first(rows, 'accuracy', t)
    summary[f'consensus_rounds_to_{t}'] = _first(rows, 'consensus_accuracy', t)
  return summary


def run(out_dir: pathlib.Path, quick: bool = False, dataset: str = 'mnist1d',
        labels: tuple[str, ...] | None = None) -> dict:
  runs = {}
  for label, c in configs(quick, dataset).items():
    if labels and label not in labels:
      continue
    print(f'[variance] {label}: {c.protocol}, {c.rounds} {"ticks" if c.protocol == "gossip" else "rounds"}',
          flush=True)
    runs[label] = run_one(c, out_dir / label)
  write_study(out_dir, 'variance', runs,
              columns=('final_accuracy', 'rounds_to_target', 'periods_to_target',
                       'seconds_to_target', 'node_steps_to_target', 'bytes_to_target',
                       'consensus_rounds_to_0.6', 'wall_seconds'))
  plot(out_dir, runs)
  return runs


def plot(out_dir: pathlib.Path, runs: dict[str, dict]) -> pathlib.Path:
  from decsim import plotting
  plt = plotting.plt
  data = {label: plotting.read_metrics(out_dir / label) for label in runs}
  layers = sorted({k.split('/', 1)[1] for rows in data.values() for k in (rows[0] if rows else {})
                   if k.startswith('weight_variance/')})
  cols = 3
  n_axes = 1 + len(layers)
  fig, axes = plt.subplots((n_axes + cols - 1) // cols, cols, figsize=(4.2 * cols, 3.2 * ((n_axes + cols - 1) // cols)),
                           squeeze=False)
  axes = axes.ravel()
  for label, rows in data.items():
    per = runs[label].get('round_unit_per_period', 1)
    x = [r['round'] / per for r in rows]
    axes[0].plot(x, [r['accuracy'] for r in rows], label=label)
    for ax, layer in zip(axes[1:], layers):
      ratio = [r[f'weight_variance/{layer}'] / r[f'xavier_variance/{layer}'] for r in rows]
      ax.plot(x, ratio, label=label)
      ax.set_title(layer, fontsize=9)
      ax.set_yscale('log')
      ax.set_ylabel('variance / Xavier')
  axes[0].set_ylabel("test accuracy (nodes' own models)")
  axes[0].legend(fontsize=7)
  for ax in axes[:n_axes]:
    ax.set_xlabel('rounds (gossip: ticks / delta)')
    ax.grid(alpha=0.3)
  for ax in axes[n_axes:]:
    ax.axis('off')
  fig.tight_layout()
  path = out_dir / 'variance.png'
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def run_sweep(out_dir: pathlib.Path, quick: bool = False, dataset: str = 'mnist1d') -> dict:
  """Gossip with and without correction over degree and N; rounds (ticks) to target."""
  gossip = configs(quick, dataset)['gossip']
  if quick:
    grid = [(50, 4), (50, 8)]
    gossip = dataclasses.replace(gossip, rounds=300, eval_every=25)
  else:
    grid = [(100, d) for d in (3, 4, 8, 16, 24)] + [(n, 8) for n in (50, 200, 500, 1000)]
  runs = {}
  for nodes, degree in grid:
    degree = degree + (nodes * degree) % 2  # a k-regular graph needs nodes * degree even
    for vc in ('none', 'received'):
      label = f'n{nodes}_d{degree}' + ('_vc' if vc != 'none' else '')
      c = dataclasses.replace(gossip, nodes=nodes, degree=degree, variance_correction=vc,
                              gossip_max_active=min(nodes, max(8, int(0.4 * nodes))))
      print(f'[variance_sweep] {label}', flush=True)
      runs[label] = run_one(c, out_dir / label)
  write_study(out_dir, 'variance_sweep', runs,
              columns=('final_accuracy', 'rounds_to_target', 'periods_to_target', 'wall_seconds'))
  return runs
