"""The vanishing-variance study (Tian et al., 2024, "Vanishing Variance Problem in Fully
Decentralized Neural-Network Systems", arXiv:2404.04616).

``variance``: the paper's setting, on decsim's simulated network. LeNet-5 (Xavier init, an
independent draw per node), 100 nodes on a random 8-regular graph (``PAPER_DEGREES`` are the
degrees of the sweep), Dirichlet(0.5) label skew, local SGD with momentum 0.9 and learning
rate 0.05 (the project default, stable for every label), on MNIST through TFDS where it is
prepared (``tfds.data_source(..., download=False)``), MNIST-1D otherwise; the dataset used
is named in ``study.json`` and the log. Labels (``LABELS``):

* ``gossip`` / ``gossip_vc``: gossip learning with the semantics of the authors' simulator
  DFL2 (``--gossip_mode=dfl2``): every node trains one batch every 8-12 simulated seconds
  (period 10 s, uniform jitter) and pushes the result to all neighbours; a node holding 2
  received models merges 0.5 self + 0.5 mean(received) and empties its buffer. ``_vc`` adds
  variance correction ('received': the mean variance of the buffered models, own excluded);
* ``dpsgd`` / ``dpsgd_vc``: D-PSGD, Metropolis-Hastings weights, 5 local steps;
* ``fedavg``: FedAvg, 10 clients per round, 5 local steps, shared init.

Every run reports, on the nodes' own accuracy (mean over nodes' own models; FedAvg: the
model the nodes receive), rounds (gossip: ticks, and ``periods_to_target`` = ticks / ticks
per wake-up period, the D-PSGD-round equivalent), ``seconds_to_target`` (simulated),
``node_steps_to_target`` (local optimiser steps summed over nodes) and ``bytes_to_target``;
the node-average model's rounds are ``consensus_rounds_to_*`` beside them, and
``variance_ratio_final`` is each layer's weight variance / Xavier variance at the end.
Writes ``study.json``, one run directory per label, ``variance_accuracy.png`` (accuracy
against simulated seconds and node-steps) and ``variance_layers.png`` (per-layer variance /
Xavier variance over simulated seconds).

``variance_small`` is the same protocols on fewer nodes and a coarser tick (``SCALES``),
sized for a shared 2-core CPU. ``variance_clock`` (after either, into the same directory)
adds gossip and gossip+VC with the wake-up period set to FedAvg's mean round, so that
simulated seconds compare the protocols rather than DFL2's 10 s period with a FedAvg round.
``variance_sweep`` runs gossip with and without the correction over ``PAPER_DEGREES`` at 100
nodes and over N = 50..1000 at degree 8; ``variance_sweep_small`` over the same degrees at 32
nodes and N = 16, 64 at degree 8, at the 'small' scale.
"""

import dataclasses
import json
import math
import pathlib
from typing import Any

from decsim import experiment
from decsim.errors import ConfigError
from decsim.experiment import ExperimentConfig
from decsim.studies.common import write_study

TARGETS = (0.5, 0.6, 0.7, 0.8)
LABELS = ('gossip', 'gossip_vc', 'dpsgd', 'dpsgd_vc', 'fedavg')
PAPER_DEGREES = (3, 4, 8, 16, 24)  # random regular graphs of the degree sweep
SWEEP_SIZES = (50, 200, 500, 1000)  # nodes at degree 8
GOSSIP_PERIOD_SECONDS = 10.0  # DFL2's 8-12 tick training interval, one tick a second


@dataclasses.dataclass(frozen=True)
class Scale:
  """The sizes of one version of the study; the protocols' semantics do not depend on it."""

  nodes: int
  num_samples: int  # MNIST-1D samples generated (train + test); a subset of MNIST's train
  periods: int  # gossip: wake-up periods simulated
  ticks_per_period: int  # gossip: the discretisation, period / --tick_seconds
  eval_periods: int  # gossip: periods between evaluations
  rounds: int  # D-PSGD rounds (FedAvg runs twice as many: it trains 10 clients, not all)
  eval_every: int  # D-PSGD / FedAvg rounds between evaluations
  degree: int = 8


SCALES = {
    'paper': Scale(nodes=100, num_samples=10_000, periods=1000, ticks_per_period=10,
                   eval_periods=10, rounds=150, eval_every=5),
    # 32 nodes, 5 ticks a period: ~1/6 of the paper size's cost per period.
    'small': Scale(nodes=32, num_samples=10_000, periods=1500, ticks_per_period=5,
                   eval_periods=10, rounds=150, eval_every=5),
    'quick': Scale(nodes=16, num_samples=4_000, periods=30, ticks_per_period=5,
                   eval_periods=5, rounds=20, eval_every=5, degree=4),
}


def default_dataset(data_dir=None) -> str:
  """``'mnist'`` where TFDS has MNIST prepared (read with ``download=False``), else
  ``'mnist1d'`` (generated locally)."""
  from decsim.data import sources
  try:
    sources.load_dataset('mnist', data_dir=data_dir, num_samples=10)
  except sources.DataError:
    return 'mnist1d'
  return 'mnist'


def base_config(scale: Scale, dataset: str) -> ExperimentConfig:
  return ExperimentConfig(
      protocol='dpsgd', dataset=dataset, num_samples=scale.num_samples, model='lenet',
      partition='dirichlet', alpha=0.5, nodes=scale.nodes, topology='kregular',
      degree=scale.degree, init='independent', optimizer='sgd', lr=0.05, momentum=0.9,
      batch_size=32, target_accuracy=0.6, seed=0, rounds=scale.rounds,
      eval_every=scale.eval_every)


def gossip_config(base: ExperimentConfig, scale: Scale) -> ExperimentConfig:
  """DFL2's gossip: one batch per wake-up, push to all neighbours, merge at 2 buffered."""
  return dataclasses.replace(
      base, protocol='gossip', gossip_mode='dfl2', gossip_peers='all_neighbours',
      gossip_merge='half', gossip_period_seconds=GOSSIP_PERIOD_SECONDS,
      tick_seconds=GOSSIP_PERIOD_SECONDS / scale.ticks_per_period, gossip_buffer=2,
      gossip_wake='uniform', local_steps=1, rounds=scale.periods * scale.ticks_per_period,
      eval_every=scale.eval_periods * scale.ticks_per_period,
      gossip_max_active=max_active(scale.nodes, scale.ticks_per_period))


def max_active(nodes: int, ticks_per_period: float) -> int:
  """Training rows per tick: 2.5x the mean wake-ups per tick, so that overflow (postponed
  a tick, counted in the run's 'gossip_dropped') is rare."""
  return min(nodes, max(8, math.ceil(2.5 * nodes / ticks_per_period)))


def configs(quick: bool = False, dataset: str | None = None,
            scale: str = 'paper') -> dict[str, ExperimentConfig]:
  """The five labels of the study at ``scale`` (``quick`` overrides it with 'quick');
  ``dataset`` None picks ``default_dataset()``."""
  if scale not in SCALES:
    raise ConfigError(f'unknown variance study scale {scale!r}: choose one of {", ".join(SCALES)}')
  size = SCALES['quick' if quick else scale]
  base = base_config(size, dataset or default_dataset())
  gossip = gossip_config(base, size)
  dpsgd = dataclasses.replace(base, protocol='dpsgd', local_steps=5)
  return {
      'gossip': gossip,
      'gossip_vc': dataclasses.replace(gossip, variance_correction='received'),
      'dpsgd': dpsgd,
      'dpsgd_vc': dataclasses.replace(dpsgd, variance_correction='received'),
      'fedavg': dataclasses.replace(base, protocol='fedavg', init='shared',
                                    sample_size=min(10, size.nodes), local_steps=5,
                                    rounds=2 * base.rounds),
  }


def _first(rows: list[dict], key: str, target: float, field: str = 'round'):
  return next((r[field] for r in rows if r.get(key) is not None and r[key] >= target), None)


def with_node_steps(rows: list[dict]) -> list[dict]:
  """The rows with ``node_steps_total``: node-steps summed over the rows up to each one."""
  total, out = 0, []
  for r in rows:
    total += r.get('node_steps') or 0
    out.append({**r, 'node_steps_total': total})
  return out


def variance_ratios(row: dict) -> dict[str, float]:
  """Each layer's weight variance / Xavier variance in one metrics row."""
  return {k.split('/', 1)[1]: v / row['xavier_variance/' + k.split('/', 1)[1]]
          for k, v in row.items() if k.startswith('weight_variance/') and v is not None}


def run_one(c: ExperimentConfig, out: pathlib.Path) -> dict[str, Any]:
  summary = experiment.run(c, out_dir=out, log=lambda _: None)
  rows = with_node_steps([json.loads(l) for l in open(out / 'metrics.jsonl') if l.strip()])
  period = c.gossip_period_seconds / c.tick_seconds if c.protocol == 'gossip' else 1
  summary.update(dataset=c.dataset, nodes=c.nodes, degree=c.degree,
                 unit='ticks' if c.protocol == 'gossip' else 'rounds',
                 round_unit_per_period=period)
  hit = summary['rounds_to_target']
  summary['periods_to_target'] = None if hit is None else hit / period
  summary['node_steps_to_target'] = _first(rows, 'accuracy', c.target_accuracy, 'node_steps_total')
  for t in TARGETS:
    summary[f'rounds_to_{t}'] = _first(rows, 'accuracy', t)
    summary[f'seconds_to_{t}'] = _first(rows, 'accuracy', t, 'sim_seconds')
    summary[f'node_steps_to_{t}'] = _first(rows, 'accuracy', t, 'node_steps_total')
    summary[f'consensus_rounds_to_{t}'] = _first(rows, 'consensus_accuracy', t)
  summary['node_steps_total'] = rows[-1]['node_steps_total'] if rows else 0
  summary['variance_ratio_final'] = variance_ratios(rows[-1]) if rows else {}
  return summary


COLUMNS = ('final_accuracy', 'periods_to_target', 'seconds_to_target', 'node_steps_to_target',
           'bytes_to_target', 'consensus_rounds_to_0.6', 'wall_seconds')


def run(out_dir: pathlib.Path, quick: bool = False, dataset: str | None = None,
        labels: tuple[str, ...] | None = None, scale: str = 'paper') -> dict:
  dataset = dataset or default_dataset()
  scale = 'quick' if quick else scale
  print(f'[variance] dataset {dataset}, scale {scale}', flush=True)
  chosen = {k: c for k, c in configs(quick, dataset, scale).items() if not labels or k in labels}
  return _run_and_write(out_dir, chosen, {}, dataset, scale)


def _run_and_write(out_dir: pathlib.Path, chosen: dict[str, ExperimentConfig], runs: dict,
                   dataset: str, scale: str) -> dict:
  """Runs ``chosen`` beside the summaries in ``runs``; writes study.json and the plots."""
  for label, c in chosen.items():
    print(f'[variance] {label}: {c.protocol} on {c.dataset}, {c.nodes} nodes, degree {c.degree}, '
          f'{c.rounds} {"ticks" if c.protocol == "gossip" else "rounds"}', flush=True)
    runs[label] = run_one(c, out_dir / label)
  path = write_study(out_dir, 'variance', runs, columns=COLUMNS)
  study = json.loads(path.read_text())
  study.update(dataset=dataset, scale=scale)
  path.write_text(json.dumps(study, indent=2) + '\n')
  plot(out_dir, list(runs))
  return runs


def run_small(out_dir: pathlib.Path, quick: bool = False) -> dict:
  """``variance`` at the 'small' scale (32 nodes, 5 ticks a period)."""
  return run(out_dir, quick=quick, scale='small')


def clock_configs(cs: dict[str, ExperimentConfig], round_seconds: float,
                  periods: int) -> dict[str, ExperimentConfig]:
  """``gossip`` and ``gossip_vc`` waking once per FedAvg round on average (the period is
  FedAvg's mean round in simulated seconds), as many ticks a period as before, ``periods``
  periods: labels ``<label>_fedavg_clock``."""
  out = {}
  for label in ('gossip', 'gossip_vc'):
    c = cs[label]
    ticks_per_period = round(c.gossip_period_seconds / c.tick_seconds)
    out[f'{label}_fedavg_clock'] = dataclasses.replace(
        c, gossip_period_seconds=round_seconds, tick_seconds=round_seconds / ticks_per_period,
        rounds=periods * ticks_per_period)
  return out


def run_clock(out_dir: pathlib.Path, quick: bool = False) -> dict:
  """After ``variance`` or ``variance_small`` into the same ``out_dir``: gossip with and
  without correction on FedAvg's clock (``clock_configs``), for 2/3 of the study's periods;
  adds them to study.json and the plots."""
  study = json.loads((out_dir / 'study.json').read_text())
  runs, fedavg = study['runs'], study['runs']['fedavg']
  round_seconds = fedavg['sim_seconds'] / fedavg['rounds']
  cs = configs(quick, study['dataset'], study['scale'])
  chosen = clock_configs(cs, round_seconds, 2 * SCALES[study['scale']].periods // 3)
  print(f'[variance_clock] gossip period = FedAvg mean round = {round_seconds:.3f} s', flush=True)
  return _run_and_write(out_dir, chosen, runs, study['dataset'], study['scale'])


def plot(out_dir: pathlib.Path, labels: list[str]) -> list[pathlib.Path]:
  """``variance_accuracy.png`` and ``variance_layers.png`` from the runs' rows."""
  from decsim import plotting
  run_dirs = {label: out_dir / label for label in labels}
  return [plotting.plot_metric_grid(
              out_dir / 'variance_accuracy.png', run_dirs,
              metrics={'accuracy': "nodes' own models (mean)",
                       'consensus_accuracy': 'node-average model'},
              x_axes=('seconds', 'node_steps'), target=0.6, log_x=('seconds',)),
          plotting.plot_layer_variance(out_dir / 'variance_layers.png', run_dirs)]


SWEEP_GRIDS = {  # scale -> (nodes of the degree sweep, sizes at degree 8)
    'paper': (100, SWEEP_SIZES),
    'small': (32, (16, 64)),
}


def sweep_configs(quick: bool = False, dataset: str | None = None,
                  scale: str = 'paper') -> dict[str, ExperimentConfig]:
  """Gossip with and without correction over ``PAPER_DEGREES`` at the scale's nodes and over
  its sizes at degree 8 (``SWEEP_GRIDS``; ``quick``: 16 nodes, degrees 4 and 8)."""
  gossip = configs(quick, dataset, scale)['gossip']
  nodes, sizes = SWEEP_GRIDS[scale] if not quick else (16, ())
  degrees = (4, 8) if quick else PAPER_DEGREES
  grid = [(nodes, d) for d in degrees] + [(n, 8) for n in sizes]
  ticks_per_period = gossip.gossip_period_seconds / gossip.tick_seconds
  out = {}
  for nodes, degree in grid:
    degree = degree + (nodes * degree) % 2  # a k-regular graph needs nodes * degree even
    for vc in ('none', 'received'):
      label = f'n{nodes}_d{degree}' + ('_vc' if vc != 'none' else '')
      out[label] = dataclasses.replace(gossip, nodes=nodes, degree=degree, variance_correction=vc,
                                       gossip_max_active=max_active(nodes, ticks_per_period))
  return out


def run_sweep(out_dir: pathlib.Path, quick: bool = False, dataset: str | None = None,
              scale: str = 'paper') -> dict:
  runs = {}
  for label, c in sweep_configs(quick, dataset, scale).items():
    print(f'[variance_sweep] {label} on {c.dataset}', flush=True)
    runs[label] = run_one(c, out_dir / label)
  write_study(out_dir, 'variance_sweep', runs,
              columns=('final_accuracy', 'periods_to_target', 'seconds_to_target', 'wall_seconds'))
  return runs


def run_sweep_small(out_dir: pathlib.Path, quick: bool = False) -> dict:
  """The sweep at the 'small' scale: 32 nodes over ``PAPER_DEGREES``, 16 and 64 at degree 8."""
  return run_sweep(out_dir, quick=quick, scale='small')
