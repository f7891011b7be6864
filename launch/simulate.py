r"""Runs one simulation: ``decsim --protocol=fedavg`` (or ``python -m launch.simulate``).

Examples:
  decsim --protocol=fedavg --nodes=100 --sample_size=10 --out=runs/fedavg
  decsim --protocol=dpsgd --topology=kregular --degree=4 --nodes=256 --out=runs/dpsgd
  decsim --flagfile=launch/presets/modest_churn.flags
  decsim plot runs/fedavg runs/dpsgd --target=0.8 --out=runs/compare

Every flag is a field of ``decsim.experiment.ExperimentConfig``; a bad value
exits with status 2 and one line naming the flag and the fix.
"""

import sys

from absl import app, flags, logging

from decsim import config as config_lib
from decsim import experiment, rundir, sharding, xla_cache
from decsim.experiment import ExperimentConfig
from decsim.protocols import registry
from launch import cli
from launch.cli import fail, flags_parser, print_table

GROUPS = config_lib.define_flags(ExperimentConfig, flags.FLAGS)
_OUTPUT = 'decsim: output and multi-host'
flags.DEFINE_string('out', 'runs/latest', 'Output directory (metrics.jsonl, summary.json, ...).',
                    module_name=_OUTPUT)
flags.DEFINE_string('coordinator_address', None, 'Multi-host: HOST:PORT of process 0, the same '
                    'in every process (jax.distributed.initialize).', module_name=_OUTPUT)
flags.DEFINE_integer('num_processes', 1, 'Multi-host: number of processes (1: single host).',
                     module_name=_OUTPUT)
flags.DEFINE_integer('process_id', 0, 'Multi-host: this process, 0..num_processes-1.',
                     module_name=_OUTPUT)
cli.define_compilation_cache_flag(flags.FLAGS, _OUTPUT)

FLAGS = flags.FLAGS

__doc__ += '\nProtocols:\n' + ''.join(  # noqa: A001 - what --help prints
    f'  {name:<14} {registry.get(name).summary}\n' for name in registry.names())
__doc__ += '\nFlag groups (decsim --helpfull lists every flag by group):\n' + ''.join(
    f'  {group.removeprefix("decsim: ")}\n' for group in GROUPS)


def config_from_flags() -> ExperimentConfig:
  return config_lib.from_flags(ExperimentConfig, FLAGS)


def main(argv) -> None:
  if len(argv) > 1:
    fail(f'unexpected arguments {" ".join(argv[1:])!r}: flags take the form --name=value')
  logging.set_verbosity(logging.ERROR)  # library warnings (tfds) would break one-line errors
  with cli.one_line_errors():
    config = config_from_flags()
    error = sharding.distributed_error(FLAGS.coordinator_address, FLAGS.num_processes,
                                       FLAGS.process_id)
    if error:
      fail(error)
    rundir.check_path(FLAGS.out)
    sharding.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id)  # before anything starts a JAX backend
    cli.check_backend()
    xla_cache.enable(FLAGS.compilation_cache)
    # Multi-host: every process runs the same program; process 0 writes the run directory.
    out = FLAGS.out if FLAGS.num_processes == 1 or FLAGS.process_id == 0 else None
    summary = experiment.run(config, out_dir=out)
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
