"""Does gossip's tick length matter? (issue 14: ticks are only the discretisation).

Runs ``--protocol=gossip --gossip_mode=dfl2`` at tick lengths T, T/2, T/4 with everything
else fixed (period, network, data, graph, R vmapped replicas of the seed) and prints the
mean simulated seconds to the target accuracy (nodes' own models) at each, and the change
from one tick length to the next. Evaluation runs every ``--eval_seconds`` simulated
seconds at every tick length, so the time to target is read on the same grid.

  python benchmarks/gossip_tick.py --ticks 1.0,0.5,0.25 --out /tmp/gossip_tick
"""

import argparse
import json
import pathlib
import time

from decsim import experiment
from decsim.experiment import ExperimentConfig


def config(tick: float, a) -> ExperimentConfig:
  every = max(1, round(a.eval_seconds / tick))
  return ExperimentConfig(
      protocol='gossip', gossip_mode='dfl2', dataset='mnist1d', num_samples=4000, model='mlp',
      partition='dirichlet', alpha=0.5, nodes=a.nodes, topology='kregular', degree=4,
      init='independent', optimizer='sgd', lr=0.05, momentum=0.9, batch_size=32, local_steps=1,
      gossip_peers='all_neighbours', gossip_period_seconds=a.period, tick_seconds=tick,
      upload_mbps=a.mbps, download_mbps=a.mbps, sites=20, samples_per_second=a.speed,
      gossip_max_active=a.max_active, variance_correction='received', target_accuracy=a.target,
      seed=0,
      rounds=round(a.seconds / tick), eval_every=every, replicas=a.replicas,
      replica_fix='data,graph,network')


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--ticks', default='1.0,0.5,0.25')
  p.add_argument('--nodes', type=int, default=16)
  p.add_argument('--period', type=float, default=10.0)
  p.add_argument('--seconds', type=float, default=1500.0)
  p.add_argument('--eval_seconds', type=float, default=5.0)
  p.add_argument('--target', type=float, default=0.5)
  p.add_argument('--speed', type=float, default=100.0, help='samples/s: 0.32 s per batch')
  p.add_argument('--mbps', type=float, default=1.0)
  p.add_argument('--replicas', type=int, default=4)
  p.add_argument('--max_active', type=int, default=6, help='training rows per tick')
  p.add_argument('--out', type=pathlib.Path, default=pathlib.Path('/tmp/gossip_tick'))
  a = p.parse_args()
  rows = []
  for tick in [float(t) for t in a.ticks.split(',')]:
    c = config(tick, a)
    t0 = time.time()
    s = experiment.run(c, out_dir=a.out / f'tick{tick:g}', log=lambda _: None)
    rows.append(dict(tick=tick, seconds_to_target=s.get('seconds_to_target'),
                     seconds_to_target_std=s.get('seconds_to_target_std'),
                     final_accuracy=s.get('final_accuracy'), wall=time.time() - t0))
    print(json.dumps(rows[-1]), flush=True)
  print('| tick s | seconds to target (mean of replicas) | change vs the tick before |')
  print('|---|---|---|')
  prev = None
  for r in rows:
    s = r['seconds_to_target']
    change = '' if prev is None or s is None or prev is None else f'{100 * (s - prev) / prev:+.2f}%'
    print(f"| {r['tick']:g} | {s} | {change} |")
    prev = s
  (a.out / 'gossip_tick.json').write_text(json.dumps(rows, indent=1))


if __name__ == '__main__':
  main()
