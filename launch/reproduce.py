r"""Reproduces a paper's experiment: ``python -m launch.reproduce --study=NAME --out=DIR``.

Writes ``DIR/study.json`` (``{"study", "runs": {label: summary}}``), a table on
stdout and a PNG plot; each run's own files go into ``DIR/<label>/``.
"""


from absl import app, flags, logging

from decsim import rundir, studies, xla_cache
from launch import cli

flags.DEFINE_string('study', None, 'Which study to run (see decsim/studies/__init__.py).')
flags.DEFINE_string('out', None, 'Output directory of the study.')
flags.DEFINE_bool('quick', False, 'A smaller, faster version of the study (for smoke tests).')
cli.define_compilation_cache_flag(flags.FLAGS, __name__)
FLAGS = flags.FLAGS


def main(argv) -> None:
  if len(argv) > 1:
    fail(f'unexpected arguments {" ".join(argv[1:])!r}: flags take the form --name=value')
  if not FLAGS.study or not FLAGS.out:
    fail('--study and --out are required, e.g. --study=modest --out=runs/modest')
  try:
    run = studies.get_study(FLAGS.study)
  except ValueError as e:
    fail(str(e))
  logging.set_verbosity(logging.ERROR)  # library INFO lines (jax's cache, tfds) are noise here
  with cli.one_line_errors(PROG):
    out = rundir.check_path(FLAGS.out)
    cli.check_backend(PROG)
    xla_cache.enable(FLAGS.compilation_cache)
    run(out, quick=FLAGS.quick)


PROG = 'reproduce'


def fail(message: str) -> None:
  cli.fail(message, PROG)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.flags_parser(FLAGS, 'python -m launch.reproduce', PROG))
