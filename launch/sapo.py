r"""Runs SAPO swarm RL post-training: ``python -m launch.sapo``.

Examples:
  python -m launch.sapo --nodes=8 --local_groups=4 --external_groups=4 --out=runs/sapo44
  python -m launch.sapo --nodes=8 --local_groups=8 --external_groups=0 --out=runs/sapo80
  python -m launch.sapo --study --nodes=256 --seeds=3 --out=runs/sapo_study_n256

Every run flag is a field of ``decsim.rl.experiment.SapoRunConfig``. ``--study``
runs the four I/J configurations 8/0, 6/2, 4/4, 2/6 over ``--seeds`` seeds with
the other flags (as ``launch/reproduce.py --study=sapo`` does at N=8). A bad
value exits with status 2 and one line naming the flag and the fix.
"""

import dataclasses
import functools
import sys

from absl import flags, logging

from decsim import rundir
from decsim.errors import ConfigError
from decsim.rl import experiment
from decsim.rl.experiment import SapoRunConfig
from launch import cli
from launch.cli import fail, flags_parser, print_table

PROG = 'decsim'

_D = SapoRunConfig()
# Own FlagValues, so that this launcher can be imported beside launch/simulate.py.
FLAGS = flags.FlagValues()
define_bool = functools.partial(flags.DEFINE_bool, flag_values=FLAGS)
define_float = functools.partial(flags.DEFINE_float, flag_values=FLAGS)
define_integer = functools.partial(flags.DEFINE_integer, flag_values=FLAGS)
define_string = functools.partial(flags.DEFINE_string, flag_values=FLAGS)

define_integer('nodes', _D.nodes, 'Number of nodes N (policies).')
define_integer('local_groups', _D.local_groups, 'I: own questions per node per round.')
define_integer('external_groups', _D.external_groups, 'J: groups drawn from other nodes.')
define_integer('generations', _D.generations, 'G: completions per question.')
define_integer('rounds', _D.rounds, 'Rounds (a multiple of --log_every).')
define_string('filter', _D.filter, 'How external groups are drawn: nonzero_advantage, '
                    'uniform, top_k or first_k.')
define_string('task_mix', _D.task_mix, 'Task kinds and weights, e.g. add,chain or '
                    'add:2,bits:1; kinds: add, chain, bits, rev, mod.')
define_integer('seed', _D.seed, 'Seed of base models, questions, rollouts and draws.')
define_integer('completion_len', _D.completion_len, 'T: tokens per completion (answer + EOS).')
define_float('temperature', _D.temperature, 'Sampling temperature (0: greedy).')
define_float('lr', _D.lr, 'Adam learning rate of GRPO.')
define_integer('iterations', _D.iterations, 'GRPO steps per round on the same batch.')
define_float('kl_coef', _D.kl_coef, 'Reference-KL coefficient (0: none, as in SAPO).')
define_float('churn', _D.churn, 'Probability a node is offline in a round (no share, no train).')
define_integer('staleness', _D.staleness, 'd: external groups come from round r - d.')
define_integer('dim', _D.dim, 'Policy width (4 heads).')
define_integer('layers', _D.layers, 'Policy transformer layers.')
define_integer('warmup_min', _D.warmup_min, 'Base models: fewest supervised warm-up steps.')
define_integer('warmup_max', _D.warmup_max, 'Base models: most supervised warm-up steps.')
define_integer('warmup_kinds', _D.warmup_kinds, 'Base models: task kinds each node is '
                     'shown in warm-up (0: all).')
define_string('task_source', _D.task_source, 'procedural (kinds generated in JAX) or '
              'reasoning_gym (a pool pre-generated offline by the reasoning-gym package, scored by '
              "its own score_answer; needs pip install -e '.[rl]'; --task_mix then names "
              'basic_arithmetic, chain_sum, count_bits, gcd, base_conversion).')
define_integer('pool_size', _D.pool_size, 'reasoning_gym: items generated per task.')
define_string('base_init', _D.base_init, 'Base models: shared (one init and demonstration '
                    'stream; node n stops at its own warm-up step, so equal steps give identical '
                    'nodes) or independent (own init and demonstrations per node).')
define_integer('log_every', _D.log_every, 'Rounds per jit-compiled chunk between log lines.')
define_integer('node_chunk', _D.node_chunk, 'Nodes per vectorised chunk (0: one vmap).')
define_bool('study', False, 'Run the 8/0, 6/2, 4/4, 2/6 study with these flags instead.')
define_integer('seeds', 3, '--study: seeds per configuration.')
define_string('out', 'runs/sapo', 'Output directory (metrics.jsonl, summary.json, ...).')


def config_from_flags() -> SapoRunConfig:
  return SapoRunConfig(**{f.name: FLAGS[f.name].value for f in dataclasses.fields(SapoRunConfig)})


def main(argv) -> None:
  if len(argv) > 1:
    fail(f'unexpected arguments {" ".join(argv[1:])!r}: flags take the form --name=value')
  logging.set_verbosity(logging.ERROR)
  with cli.one_line_errors(PROG):
    _run(config_from_flags())


def _run(config: SapoRunConfig) -> None:
  out = rundir.check_path(FLAGS.out)
  cli.check_backend(PROG)
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
  main(parse_flags(argv))


if __name__ == '__main__':
  run_main(sys.argv)
