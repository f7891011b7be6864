r"""Runs one simulation: ``decsim --protocol=fedavg`` (or ``python -m launch.simulate``).

Examples:
  decsim --protocol=fedavg --nodes=100 --sample_size=10 --out=runs/fedavg
  decsim --protocol=dpsgd --topology=kregular --degree=4 --nodes=256 --out=runs/dpsgd
  decsim --flagfile=launch/presets/default.flags

Every flag is a field of ``decsim.experiment.ExperimentConfig``; a bad value
exits with status 2 and one line naming the flag and the fix.
"""

import dataclasses
import sys

from absl import app, flags, logging

from decsim import experiment, sharding
from decsim.data.sources import DataError
from decsim.experiment import ExperimentConfig
from decsim.simulate import SimulationDiverged
from decsim.topology import TopologyError

_D = ExperimentConfig()

flags.DEFINE_string('protocol', _D.protocol, f'One of {", ".join(experiment.PROTOCOLS)}.')
flags.DEFINE_string('dataset', _D.dataset, 'mnist1d (embedded, generated locally), synthetic '
                    '(LEAF), or a prepared TFDS dataset: mnist, fashion_mnist, cifar10, emnist.')
flags.DEFINE_integer('num_samples', _D.num_samples, 'Samples generated (mnist1d, synthetic; '
                     '80/20 train/test) or the train subset of a real dataset (0: all).')
flags.DEFINE_string('data_dir', _D.data_dir, 'TFDS data directory of the real datasets.')
flags.DEFINE_string('model', _D.model, 'logistic, mlp, lenet (LeNet-5) or gn_lenet.')
flags.DEFINE_string('partition', _D.partition, 'iid, dirichlet, shards or natural.')
flags.DEFINE_float('alpha', _D.alpha, 'Dirichlet concentration of the label skew.')
flags.DEFINE_integer('shards_per_node', _D.shards_per_node, 'Label shards per node (shards).')
flags.DEFINE_integer('nodes', _D.nodes, 'Number of nodes N.')
flags.DEFINE_integer('sample_size', _D.sample_size, 'FedAvg: clients sampled per round (s).')
flags.DEFINE_string('topology', _D.topology, 'D-PSGD graph: ring, torus, kregular, '
                    'erdos_renyi, exponential, complete, one_peer_exponential.')
flags.DEFINE_integer('degree', _D.degree, 'Degree of the kregular graph.')
flags.DEFINE_float('edge_probability', _D.edge_probability, 'Edge probability (erdos_renyi).')
flags.DEFINE_string('mixing', _D.mixing, 'auto, dense (W @ params) or sparse (neighbour slots).')
flags.DEFINE_string('init', _D.init, 'shared: one model for all nodes; independent: a draw each.')
flags.DEFINE_string('weighting', _D.weighting, 'FedAvg aggregation weights: data_size or uniform.')
flags.DEFINE_integer('local_steps', _D.local_steps, 'Local minibatch steps per round.')
flags.DEFINE_float('local_epochs', _D.local_epochs, 'Local epochs per round; > 0 overrides '
                   '--local_steps (each node ceil(E * its samples / batch) steps).')
flags.DEFINE_integer('batch_size', _D.batch_size, 'Local minibatch size.')
flags.DEFINE_string('optimizer', _D.optimizer, 'Local optimiser: sgd or adam.')
flags.DEFINE_float('lr', _D.lr, 'Local learning rate.')
flags.DEFINE_float('momentum', _D.momentum, 'SGD momentum (0: plain SGD).')
flags.DEFINE_integer('rounds', _D.rounds, 'Rounds to run (a multiple of --eval_every).')
flags.DEFINE_integer('eval_every', _D.eval_every, 'Rounds per jit-compiled chunk between evaluations.')
flags.DEFINE_integer('eval_nodes', _D.eval_nodes, 'Decentralized protocols: individual nodes evaluated.')
flags.DEFINE_float('target_accuracy', _D.target_accuracy, 'Accuracy for *_to_target in summary.json.')
flags.DEFINE_integer('seed', _D.seed, 'Seed of data, partition, graph, init and every draw.')
flags.DEFINE_integer('node_chunk', _D.node_chunk, 'Nodes per vectorised chunk of local training: '
                     '-1 auto (by model on CPU, one vmap on GPU), 0 one vmap, k > 0 chunks of k.')
flags.DEFINE_integer('devices', _D.devices, 'Devices the node axis is split over (1: one; '
                     '0: all, every host\'s); --nodes must be a multiple of it.')
flags.DEFINE_string('param_dtype', _D.param_dtype, 'float32 or bfloat16: dtype of stored params, '
                    'optimiser state and model transfers (bytes); compute stays float32.')
flags.DEFINE_string('coordinator_address', None, 'Multi-host: HOST:PORT of process 0, the same '
                    'in every process (jax.distributed.initialize).')
flags.DEFINE_integer('num_processes', 1, 'Multi-host: number of processes (1: single host).')
flags.DEFINE_integer('process_id', 0, 'Multi-host: this process, 0..num_processes-1.')
flags.DEFINE_string('out', 'runs/latest', 'Output directory (metrics.jsonl, summary.json, ...).')

FLAGS = flags.FLAGS

USER_ERRORS = (experiment.ConfigError, DataError, TopologyError, SimulationDiverged)


def config_from_flags() -> ExperimentConfig:
  return ExperimentConfig(**{f.name: FLAGS[f.name].value
                             for f in dataclasses.fields(ExperimentConfig)})


def print_table(summary: dict) -> None:
  print('\nresults')
  for key, value in summary.items():
    shown = f'{value:.4g}' if isinstance(value, float) else value
    print(f'  {key:<22} {shown}')


def main(argv) -> None:
  if len(argv) > 1:
    fail(f'unexpected arguments {" ".join(argv[1:])!r}: flags take the form --name=value')
  logging.set_verbosity(logging.ERROR)  # library warnings (tfds) would break one-line errors
  config = config_from_flags()
  error = sharding.distributed_error(FLAGS.coordinator_address, FLAGS.num_processes,
                                     FLAGS.process_id)
  if error:
    fail(error)
  sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id)
  # Multi-host: every process runs the same program; process 0 writes the run directory.
  out = FLAGS.out if FLAGS.num_processes == 1 or FLAGS.process_id == 0 else None
  try:
    summary = experiment.run(config, out_dir=out)
  except USER_ERRORS as e:
    fail(str(e))
  print_table(summary)
  print(f'  {"out":<22} {out}')


def fail(message: str) -> None:
  print(f'decsim: error: {message}', file=sys.stderr)
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl parsing, with flag errors as one line instead of absl's two-line FATAL."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    fail(f'{e}; see decsim --helpfull')


def run_main() -> None:
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run_main()
