r"""Overlays runs: ``decsim plot RUN_DIR [RUN_DIR ...] --out=plot``.

Draws test accuracy against rounds, simulated seconds and bytes sent, one line
per run directory (labelled by its name), with an optional target line, and
writes ``OUT.png`` and ``OUT.svg``. Its flags live in their own ``FlagValues``
so that it can run inside the ``decsim`` command.
"""

import json
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
  for d in run_dirs:
    problem = run_problem(d)
    if problem:
      fail(f'{d} {problem}: pass directories written by decsim --out')
  if FLAGS.target is not None and not 0 <= FLAGS.target <= 1:
    fail(f'--target={FLAGS.target} must be an accuracy in [0, 1]')
  with cli.one_line_errors(PROG):
    from decsim import plotting
    out = pathlib.Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plotting.plot_runs(out, {d.resolve().name: d for d in run_dirs},
                       x_keys=('round', 'sim_seconds', 'bytes_total'), target=FLAGS.target,
                       title=FLAGS.title, formats=('png', 'svg'))
  print(f'wrote {out.with_suffix(".png")} and {out.with_suffix(".svg")}')


def run_problem(run_dir: pathlib.Path) -> str | None:
  """Why ``run_dir`` is not a run directory with rows to plot, or None."""
  metrics = run_dir / 'metrics.jsonl'
  if not run_dir.is_dir():
    return 'is not a directory'
  if not metrics.is_file():
    return 'has no metrics.jsonl'
  try:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
  except (OSError, UnicodeDecodeError, ValueError):
    return 'has a metrics.jsonl that is not JSON lines'
  needed = {'round', 'accuracy', 'sim_seconds', 'bytes_total'}
  if not rows or not all(isinstance(r, dict) and needed <= r.keys() for r in rows):
    return f'has no rows with {", ".join(sorted(needed))}'
  return None


PROG = 'decsim plot'


def fail(message: str) -> None:
  cli.fail(message, PROG)


if __name__ == '__main__':
  main(sys.argv)
