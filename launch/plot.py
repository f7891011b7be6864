r"""Overlays runs: ``decsim plot RUN_DIR [RUN_DIR ...] --out=plot``.

Draws test accuracy against rounds, simulated seconds and bytes sent, one line
per run directory (labelled by its name), with an optional target line, and
writes ``OUT.png`` and ``OUT.svg``. Its flags live in their own ``FlagValues``
so that it can run inside the ``decsim`` command.
"""

import pathlib
import sys

from absl import flags

from launch import cli

FLAGS = flags.FlagValues()
flags.DEFINE_string('out', 'plot', 'Output path without suffix; writes OUT.png and OUT.svg.',
                    flag_values=FLAGS)
flags.DEFINE_float('target', None, 'Draw a horizontal target accuracy line.', flag_values=FLAGS)
flags.DEFINE_string('title', '', 'Figure title.', flag_values=FLAGS)


def main(argv: list[str]) -> None:
  try:
    run_dirs = [pathlib.Path(p) for p in FLAGS(argv)[1:]]
  except flags.Error as e:
    fail(str(e))
  if not run_dirs:
    fail('give at least one run directory: decsim plot RUN_DIR [RUN_DIR ...]')
  missing = [str(d) for d in run_dirs if not (d / 'metrics.jsonl').exists()]
  if missing:
    fail(f'no metrics.jsonl in {", ".join(missing)}: pass directories written by decsim --out')
  from decsim import plotting
  out = pathlib.Path(FLAGS.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  plotting.plot_runs(out, {d.resolve().name: d for d in run_dirs},
                     x_keys=('round', 'sim_seconds', 'bytes_total'), target=FLAGS.target,
                     title=FLAGS.title, formats=('png', 'svg'))
  print(f'wrote {out.with_suffix(".png")} and {out.with_suffix(".svg")}')


def fail(message: str) -> None:
  cli.fail(message, 'decsim plot')


if __name__ == '__main__':
  main(sys.argv)
