"""MoDeST at population scale (issue 16; de Vos et al., "MoDeST: Bridging the Gap between
Federated and Decentralized Learning with Decentralized Sampling", 2023, whose target is
cross-device learning with many clients and few trainers per round).

1,000,000 generated clients of LEAF's Synthetic(1, 1) (Li et al., "Federated Optimization
in Heterogeneous Networks", MLSys 2020: each client its own softmax model and feature
mean; ``--client_data=generated``, so no per-client table exists), multinomial logistic
regression, s = 100 clients a round. Two availability settings, each for MoDeST (a = 1,
the global view, the reference's 5 s ping timeout and 1000-round inactivity threshold)
and for FedAvg on the same clients, seeds and network:

- ``*_bernoulli``: every client is online in a round with probability 0.5;
- ``*_crash``: from ``CRASH_START`` simulated seconds, 1/20 of the clients crash every
  ``CRASH_EVERY`` seconds until 80% are down (MoDeST's churn experiment, scaled in nodes:
  5 of 100 every 60 s; in time to FedAvg's rounds of about 0.5 simulated seconds, so that
  both protocols meet the whole schedule within 200 rounds).

The target (0.5) is FedProx's level on Synthetic(1, 1) with 30 devices; with a million
clients, each labelling by its own random softmax model, one global model has little to
learn (BUILD_NOTES, "Population scale": both protocols stay near chance).

Accuracy against simulated seconds and bytes (``modest_population.png``). The quick
variant (20,000 clients, 20 rounds) is for smoke tests.
"""

import dataclasses
import pathlib

from decsim import plotting
from decsim.experiment import ExperimentConfig
from decsim.studies.common import run_configs, write_study

NODES = 1_000_000
CRASH_START, CRASH_EVERY = 10.0, 2.0  # simulated seconds: 80% down by 40 s

BASE = ExperimentConfig(nodes=NODES, sample_size=100, dataset='synthetic', model='logistic',
                        client_data='generated', num_samples=10_000, local_steps=5,
                        batch_size=32, lr=0.05, momentum=0.9, rounds=200, eval_every=25,
                        target_accuracy=0.5)
QUICK = {'nodes': 20_000, 'rounds': 20, 'eval_every': 10}


def configs(quick: bool = False) -> dict[str, ExperimentConfig]:
  base = dataclasses.replace(BASE, **(QUICK if quick else {}))
  bernoulli = dataclasses.replace(base, p_online=0.5)
  crash = dataclasses.replace(base, crash_start_seconds=CRASH_START,
                              crash_every_seconds=CRASH_EVERY, crash_batch=base.nodes // 20,
                              crash_fraction=0.8)
  return {f'{protocol}_{name}': dataclasses.replace(setting, protocol=protocol)
          for name, setting in (('bernoulli', bernoulli), ('crash', crash))
          for protocol in ('modest', 'fedavg')}


COLUMNS = ('final_accuracy', 'best_accuracy', 'rounds_to_target', 'seconds_to_target',
           'bytes_to_target', 'sim_seconds', 'peak_memory_bytes')


def run(out_dir: pathlib.Path, quick: bool = False) -> dict:
  study = configs(quick)
  runs = run_configs(out_dir, study)
  plotting.plot_runs(out_dir / 'modest_population.png',
                     {label: out_dir / label for label in study},
                     target=BASE.target_accuracy, title='modest_population')
  write_study(out_dir, 'modest_population', runs, columns=COLUMNS)
  return runs
