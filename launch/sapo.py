r"""Runs SAPO swarm RL post-training: ``python -m launch.sapo``.

Examples:
  python -m launch.sapo --nodes=8 --local_groups=4 --external_groups=4 --out=runs/sapo44
  python -m launch.sapo --nodes=8 --local_groups=8 --external_groups=0 --out=runs/sapo80
  python -m launch.sapo --study --nodes=256 --seeds=3 --out=runs/sapo_study_n256

Every run flag is a field of ``decsim.rl.experiment.SapoRunConfig`` (generated from
it: ``--helpfull`` lists them). ``--checkpoint_every=K`` saves a checkpoint every
K rounds and ``--resume`` continues the run in ``--out`` from the newest one. ``--study``
runs the four I/J configurations 8/0, 6/2, 4/4, 2/6 over ``--seeds`` seeds with
the other flags (as ``launch/reproduce.py --study=sapo`` does at N=8). A bad
value exits with status 2 and one line naming the flag and the fix.
"""

import sys

from absl import flags, logging

from decsim import config as config_lib
from decsim import rundir, xla_cache
from decsim.errors import ConfigError
from decsim.rl import experiment
from decsim.rl.experiment import SapoRunConfig
from launch import cli
from launch.cli import fail, flags_parser, print_table

PROG = 'decsim'

# Own FlagValues, so that this launcher can be imported beside launch/simulate.py.
FLAGS = flags.FlagValues()
config_lib.define_flags(SapoRunConfig, FLAGS, prefix='sapo')
_STUDY = 'sapo: study and output'
flags.DEFINE_bool('study', False, 'Run the 8/0, 6/2, 4/4, 2/6 study with these flags instead.',
                  flag_values=FLAGS, module_name=_STUDY)
flags.DEFINE_integer('seeds', 3, '--study: seeds per configuration.', flag_values=FLAGS,
                     module_name=_STUDY)
flags.DEFINE_string('out', 'runs/sapo', 'Output directory (metrics.jsonl, summary.json, ...).',
                    flag_values=FLAGS, module_name=_STUDY)
cli.define_compilation_cache_flag(FLAGS, _STUDY)


def config_from_flags() -> SapoRunConfig:
  return config_lib.from_flags(SapoRunConfig, FLAGS)


def main(argv) -> None:
  if len(argv) > 1:
    fail(f'unexpected arguments {" ".join(argv[1:])!r}: flags take the form --name=value')
  logging.set_verbosity(logging.ERROR)
  with cli.one_line_errors(PROG):
    _run(config_from_flags())


def _run(config: SapoRunConfig) -> None:
  out = rundir.check_path(FLAGS.out)
  cli.check_backend(PROG)
  xla_cache.enable(FLAGS.compilation_cache)
  if FLAGS.study:
    from decsim.studies import sapo as sapo_study
    if FLAGS.seeds < 1:
      raise ConfigError(f'--seeds={FLAGS.seeds} must be >= 1')
    sapo_study.run_study(out, config, seeds=tuple(range(config.seed, config.seed + FLAGS.seeds)))
    return
  summary = experiment.run(config, out_dir=out)
  print_table(summary, FLAGS.out, width=28)


parse_flags = flags_parser(FLAGS, 'python -m launch.sapo')


def run_main(argv: list[str]) -> None:
  if cli.print_help_if_asked(argv, __doc__, FLAGS):
    return
  main(parse_flags(argv))


if __name__ == '__main__':
  run_main(sys.argv)
