r"""Runs one simulation: ``decsim --protocol=fedavg`` (or ``python -m launch.simulate``).

Examples:
  decsim --protocol=fedavg --nodes=100 --sample_size=10 --out=runs/fedavg
  decsim --protocol=dpsgd --topology=kregular --degree=4 --nodes=256 --out=runs/dpsgd
  decsim --flagfile=launch/presets/modest.flags
  decsim plot runs/fedavg runs/dpsgd --target=0.8 --out=runs/compare

Every flag is a field of ``decsim.experiment.ExperimentConfig``; a bad value
exits with status 2 and one line naming the flag and the fix.
"""

import dataclasses
import sys

from absl import app, flags, logging

from decsim import experiment, sharding
from decsim.churn import ChurnError
from decsim.data.sources import DataError
from decsim.experiment import ExperimentConfig
from decsim.network import NetworkError
from decsim.simulate import SimulationDiverged
from decsim.topology import TopologyError
from launch.cli import fail, flags_parser, print_table

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
flags.DEFINE_integer('eval_nodes', _D.eval_nodes, 'Decentralized protocols: individual nodes evaluated '
                     '(evenly spaced ids; all when fewer).')
flags.DEFINE_float('target_accuracy', _D.target_accuracy, 'Accuracy for *_to_target in summary.json.')
flags.DEFINE_integer('seed', _D.seed, 'Seed of data, partition, graph, init and every draw.')
flags.DEFINE_integer('node_chunk', _D.node_chunk, 'Nodes per vectorised chunk of local training: '
                     '-1 auto (by model on CPU, one vmap on GPU), 0 one vmap, k > 0 chunks of k.')
# FedAvg and MoDeST
flags.DEFINE_float('success_fraction', _D.success_fraction, 'FedAvg/MoDeST: aggregate once '
                   'ceil(sf * s) models arrived; later ones are ignored.')
# MoDeST (de Vos et al. 2023)
flags.DEFINE_integer('aggregators', _D.aggregators, 'MoDeST: aggregators per round (a).')
flags.DEFINE_float('ping_timeout', _D.ping_timeout, 'MoDeST: simulated seconds a ping to a '
                   'crashed candidate costs.')
flags.DEFINE_integer('inactivity_threshold', _D.inactivity_threshold, 'MoDeST: rounds without '
                     'activity after which a node leaves the samples.')
flags.DEFINE_enum('views', _D.views, ['global', 'local'], 'MoDeST: one global view (fast) or '
                  "every node's own view, an [N, N] matrix merged on every transfer.")
# Simulated network
flags.DEFINE_integer('sites', _D.sites, 'Sites on the globe; node i sits on site i mod S.')
flags.DEFINE_string('latency_file', _D.latency_file, 'CSV S x S one-way latencies in ms '
                    '(replaces the generated globe).')
flags.DEFINE_float('upload_mbps', _D.upload_mbps, 'Per-node upload Mbit/s (0: unlimited).')
flags.DEFINE_float('download_mbps', _D.download_mbps, 'Per-node download Mbit/s (0: unlimited).')
flags.DEFINE_float('bandwidth_sigma', _D.bandwidth_sigma, 'Lognormal spread of bandwidths.')
flags.DEFINE_float('samples_per_second', _D.samples_per_second, 'Training speed of a node.')
flags.DEFINE_float('compute_sigma', _D.compute_sigma, 'Lognormal spread of node speeds.')
flags.DEFINE_string('compute_file', _D.compute_file, 'One samples/s value per node.')
# Churn
flags.DEFINE_float('p_online', _D.p_online, 'Probability a node is online in a round.')
flags.DEFINE_float('crash_start_seconds', _D.crash_start_seconds, 'First crashes (sim seconds).')
flags.DEFINE_float('crash_every_seconds', _D.crash_every_seconds, 'Seconds between crash batches.')
flags.DEFINE_integer('crash_batch', _D.crash_batch, 'Nodes per crash batch.')
flags.DEFINE_float('crash_fraction', _D.crash_fraction, 'Crashes stop when this fraction is down.')
flags.DEFINE_bool('crash_graceful', _D.crash_graceful, 'Scheduled nodes leave gracefully.')
flags.DEFINE_integer('join_nodes', _D.join_nodes, 'Nodes that start offline and join later.')
flags.DEFINE_float('join_start_seconds', _D.join_start_seconds, 'First join (sim seconds).')
flags.DEFINE_float('join_every_seconds', _D.join_every_seconds, 'Seconds between joins.')
flags.DEFINE_string('trace_file', _D.trace_file, '0/1 availability, a row per round, a column '
                    'per node.')
flags.DEFINE_integer('checkpoint_every', _D.checkpoint_every, 'Save an orbax checkpoint every '
                     'this many rounds into OUT/checkpoints (0: off; a multiple of --eval_every).')
flags.DEFINE_bool('resume', _D.resume, 'Continue the run in --out from its newest readable '
                  'checkpoint.')
flags.DEFINE_integer('replicas', _D.replicas, 'Run R seeds (seed, seed+1, ...) of this '
                     'configuration as one vmapped simulation; rows report mean, std, values.')
# Gossip learning and variance correction (Tian et al. 2024)
flags.DEFINE_integer('gossip_delta', _D.gossip_delta, 'Gossip: mean ticks between a node\'s '
                     'wake-ups (Delta).')
flags.DEFINE_string('gossip_wake', _D.gossip_wake, 'Gossip wake-up jitter: uniform (0.8-1.2 '
                    'Delta, 8-12 ticks for Delta 10) or exponential (mean Delta).')
flags.DEFINE_string('gossip_peers', _D.gossip_peers, 'Gossip push target: random (any node), '
                    'neighbour (one --topology neighbour) or all_neighbours.')
flags.DEFINE_string('gossip_merge', _D.gossip_merge, 'Gossip merge: age (age-weighted), half '
                    '(0.5 self + 0.5 mean received), beta, replace (mean received).')
flags.DEFINE_float('gossip_beta', _D.gossip_beta, 'Gossip merge=beta: weight of the own model.')
flags.DEFINE_integer('gossip_buffer', _D.gossip_buffer, 'Gossip: merge once this many models '
                     'are held (1: on every arrival).')
flags.DEFINE_integer('gossip_partitions', _D.gossip_partitions, 'Gossip model partitioning: '
                     'send one of K partitions (1: whole models).')
flags.DEFINE_float('gossip_keep', _D.gossip_keep, 'Gossip sampling compression: send each '
                   'weight with this probability (1: all).')
flags.DEFINE_integer('gossip_max_active', _D.gossip_max_active, 'Gossip: model rows merged and '
                     'trained per tick (0: all N, masked).')
flags.DEFINE_float('tick_seconds', _D.tick_seconds, 'Gossip: simulated seconds per tick (round).')
flags.DEFINE_string('variance_correction', _D.variance_correction, 'Rescale layers after '
                    'averaging (Tian et al. 2024): none, received, follow_beta or self.')
flags.DEFINE_bool('vc_biases', _D.vc_biases, 'Variance correction of bias vectors too.')
flags.DEFINE_bool('vc_unbiased', _D.vc_unbiased, 'Variance correction with ddof=1 variances.')
flags.DEFINE_float('vc_epsilon', _D.vc_epsilon, 'Variance correction: floor of the variance.')
flags.DEFINE_float('vc_ratio', _D.vc_ratio, 'Variance correction: fraction of the way to the '
                   'target std (1: full).')
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

USER_ERRORS = (experiment.ConfigError, DataError, TopologyError, NetworkError, ChurnError,
               SimulationDiverged)


def config_from_flags() -> ExperimentConfig:
  return ExperimentConfig(**{f.name: FLAGS[f.name].value
                             for f in dataclasses.fields(ExperimentConfig)})


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
  print_table(summary, out)


parse_flags = flags_parser(FLAGS, 'decsim')


def run_main() -> None:
  """The ``decsim`` console script: ``decsim [flags]`` runs, ``decsim plot DIR...`` plots."""
  if len(sys.argv) > 1 and sys.argv[1] == 'plot':
    from launch import plot
    plot.main([f'{sys.argv[0]} plot', *sys.argv[2:]])
    return
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run_main()
