"""Runs small FedAvg and D-PSGD experiments on 1 device and on a mesh of D devices and
prints one JSON line per case with both metric rows. Needs
``XLA_FLAGS=--xla_force_host_platform_device_count=D`` set before JAX starts, so
tests run it in a subprocess (tests/test_sharding.py).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/scripts/sharded_equivalence.py
"""

import dataclasses
import json
import pathlib
import sys
import tempfile

import jax

from decsim import experiment, sharding, simulate

CASES = {
    'fedavg': dict(protocol='fedavg', sample_size=6),
    'dpsgd_dense': dict(protocol='dpsgd', mixing='dense', topology='kregular', degree=3),
    'dpsgd_sparse': dict(protocol='dpsgd', mixing='sparse', topology='kregular', degree=3),
    'dpsgd_onepeer': dict(protocol='dpsgd', mixing='sparse', topology='one_peer_exponential'),
    'modest': dict(protocol='modest', sample_size=6, aggregators=2),
    'modest_local': dict(protocol='modest', sample_size=6, aggregators=2, views='local'),
    'gossip': dict(protocol='gossip', gossip_peers='random', init='independent',
                   gossip_period_seconds=1.0),  # dfl2 mode: every node trains every tick
}


def rows(config, mesh):
  """metrics.jsonl rows and the summary of one run."""
  exp = experiment.build(config)
  with tempfile.TemporaryDirectory() as out:
    summary = simulate.run(exp.protocol, exp.data, exp.evaluate, key=jax.random.key(config.seed),
                           rounds=config.rounds, eval_every=config.eval_every,
                           report=experiment.make_report(config, exp), mesh=mesh,
                           out_dir=out,
                           log=lambda _: None)
    lines = (pathlib.Path(out) / 'metrics.jsonl').read_text().splitlines()
  return [json.loads(l) for l in lines], summary


def placement(config, mesh):
  """Per-device row counts of the node-axis state after one compiled chunk on ``mesh``."""
  exp = experiment.build(config)
  data = sharding.shard_data(exp.data, mesh)
  state = sharding.sharded_init(exp.protocol.init, jax.random.key(0), data, mesh)
  chunk = simulate.compile_chunk(exp.protocol, state, data, 1, mesh)
  state, _ = chunk(state, data)
  # The first leaf on the node axis: a model row, or FedAvg's byte counters (its state
  # keeps only the s rows in flight, replicated).
  leaf = next(l for l in jax.tree.leaves(state) if l.ndim and l.shape[0] == config.nodes)
  return {'spec': str(leaf.sharding.spec),
          'rows_per_device': sorted({s.data.shape[0] for s in leaf.addressable_shards}),
          'idx_rows_per_device': sorted({s.data.shape[0] for s in data.idx.addressable_shards}),
          'shards': len(leaf.addressable_shards)}


def main():
  devices = jax.device_count()
  names = sys.argv[1:] or list(CASES)
  base = experiment.ExperimentConfig(num_samples=800, nodes=16, model='logistic', rounds=4,
                                     eval_every=2, local_steps=2, eval_nodes=4, momentum=0.0,
                                     partition='iid', lr=0.1, node_chunk=0)
  for name in names:
    config = dataclasses.replace(base, **CASES[name])
    one, _ = rows(config, None)
    many, summary = rows(config, sharding.make_mesh(devices))
    print(json.dumps({'case': name, 'devices': summary['devices'], 'one': one, 'many': many,
                      'placement': placement(config, sharding.make_mesh(devices))}),
          flush=True)


if __name__ == '__main__':
  main()
