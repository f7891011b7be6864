"""MoDeST's claims (de Vos et al. 2023) on one data set, partition and simulated network.

``modest``: FL (fixed server on the lowest-median-latency node), D-PSGD on the
time-varying one-peer exponential graph, and MoDeST with s=10, a=1 and sf=1 or
0.8 — 100 nodes, one shared target accuracy. Claims: MoDeST reaches the target
about as fast as FL in simulated seconds and with at least 3x fewer bytes than
D-PSGD. Without churn MoDeST's default ranking shares FedAvg's random stream, so
``fl`` and ``modest`` train the same clients every round (common random
numbers); ``fl_3`` and ``modest_independent_3`` compare them with independent
samples over three independent replicas (seeds, data and network redrawn).

``modest_churn``: 100 nodes; from t=300 s five nodes crash every 60 s until 80%
are down (sf=0.8, the reference's ping timeout of 5 s and inactivity threshold of
1000 rounds, no down marks), with a=1 and a=3; and a join run where 90 nodes
start and 10 join, one every 60 s. Claim: MoDeST keeps training and reaches the
target with 80% of the nodes down.

Scale-down (to run in minutes on 2 CPU cores): MNIST-1D with the 1-D LeNet-5
instead of CIFAR-10 with GN-LeNet; the network is the generated 20-site globe
with 100 Mbit/s links. Training runs at 100 samples/s per node (1.6 s per round
of 5 x 32 samples), so compute, not latency, dominates a round as on the
paper's devices. The churn study slows training to 20 samples/s (8 s per round)
so that the crash schedule, stated in seconds as in the paper, falls inside the
training run rather than after it.
"""

import dataclasses
import pathlib

from decsim import plotting
from decsim.experiment import ExperimentConfig
from decsim.studies.common import run_configs, write_study

BASE = ExperimentConfig(nodes=100, sample_size=10, dataset='mnist1d', model='lenet',
                        partition='dirichlet', alpha=0.5, local_steps=5, batch_size=32, lr=0.05,
                        momentum=0.9, upload_mbps=100, download_mbps=100, samples_per_second=100.0,
                        target_accuracy=0.8)


QUICK = {'num_samples': 2000, 'nodes': 20, 'model': 'mlp'}  # smoke tests and notebooks


def modest_configs(quick: bool) -> dict[str, ExperimentConfig]:
  base = dataclasses.replace(BASE, rounds=20 if quick else 400, eval_every=10,
                             **(QUICK if quick else {}))
  return {
      'fl': dataclasses.replace(base, protocol='fedavg', weighting='uniform'),
      'dpsgd': dataclasses.replace(base, protocol='dpsgd', topology='one_peer_exponential',
                                   rounds=10 if quick else base.rounds),
      'modest': dataclasses.replace(base, protocol='modest', aggregators=1, success_fraction=1.0),
      'modest_sf0.8': dataclasses.replace(base, protocol='modest', aggregators=1,
                                          success_fraction=0.8),
      'fl_3': dataclasses.replace(base, protocol='fedavg', weighting='uniform',
                                  replicas=1 if quick else 3),
      'modest_independent_3': dataclasses.replace(base, protocol='modest', aggregators=1,
                                                  modest_stream='independent',
                                                  replicas=1 if quick else 3),
  }


def churn_configs(quick: bool) -> dict[str, ExperimentConfig]:
  base = dataclasses.replace(BASE, protocol='modest', success_fraction=0.8,
                             samples_per_second=20.0,
                             rounds=20 if quick else 400, eval_every=10 if quick else 20,
                             **(QUICK if quick else {}))
  crash = dataclasses.replace(base, crash_start_seconds=300, crash_every_seconds=60,
                              crash_batch=5, crash_fraction=0.8)
  return {
      'modest_crash': crash,
      'modest_crash_a3': dataclasses.replace(crash, aggregators=3),
      'modest_join': dataclasses.replace(base, join_nodes=base.nodes // 10, join_start_seconds=60,
                                         join_every_seconds=60),
  }


COLUMNS = ('final_accuracy', 'rounds_to_target', 'seconds_to_target', 'bytes_to_target',
           'final_consensus_accuracy')


def _run(name: str, configs: dict[str, ExperimentConfig], out_dir: pathlib.Path) -> dict:
  runs = run_configs(out_dir, configs)
  target = next(iter(configs.values())).target_accuracy
  plotting.plot_runs(out_dir / f'{name}.png', {label: out_dir / label for label in configs},
                     target=target, title=name)
  write_study(out_dir, name, runs, columns=COLUMNS)
  return runs


def run(out_dir: pathlib.Path, quick: bool = False) -> dict:
  return _run('modest', modest_configs(quick), out_dir)


def run_churn(out_dir: pathlib.Path, quick: bool = False) -> dict:
  return _run('modest_churn', churn_configs(quick), out_dir)
