r"""Reproduces a paper's experiment: ``python -m launch.reproduce --study=NAME --out=DIR``.

Writes ``DIR/study.json`` (``{"study", "runs": {label: summary}}``), a table on
stdout and a PNG plot; each run's own files go into ``DIR/<label>/``.
"""

import pathlib

from absl import app, flags

from decsim import studies
from launch import cli

flags.DEFINE_string('study', None, 'Which study to run (see decsim/studies/__init__.py).')
flags.DEFINE_string('out', None, 'Output directory of the study.')
flags.DEFINE_bool('quick', False, 'A smaller, faster version of the study (for smoke tests).')
FLAGS = flags.FLAGS


def main(argv) -> None:
  del argv
  if not FLAGS.study or not FLAGS.out:
    fail('--study and --out are required, e.g. --study=modest --out=runs/modest')
  try:
    run = studies.get_study(FLAGS.study)
  except ValueError as e:
    fail(str(e))
  run(pathlib.Path(FLAGS.out).absolute(), quick=FLAGS.quick)


def fail(message: str) -> None:
  cli.fail(message, 'reproduce')


if __name__ == '__main__':
  app.run(main)
