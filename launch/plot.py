r"""Overlays runs: ``decsim plot RUN_DIR [RUN_DIR ...] --out=plot``.

Examples:
  decsim plot runs/fedavg runs/dpsgd --target=0.8 --out=runs/compare
  decsim plot runs/fl runs/modest --metric=accuracy --x=seconds --style=paper \
      --labels=FL,MoDeST --formats=pdf --out=fig/modest

Draws ``--metric`` (any key of the rows: accuracy, loss, consensus_accuracy,
accuracy_p10, ...) against each of ``--x`` (rounds, seconds, bytes, node_steps),
one line per run directory (labelled by ``--labels`` or its name), with an
optional labelled target line. A run with replicas is drawn as the mean and a
95% t-interval band over its replicas, and its legend says so. ``--style=paper``
sizes panels for one column of a paper. Its flags live in their own
``FlagValues`` so that it can run inside the ``decsim`` command.
"""

import json
import pathlib
import sys

from absl import flags

from launch import cli

FLAGS = flags.FlagValues()
flags.DEFINE_string('out', 'plot', 'Output path without suffix; writes OUT.<format> for each '
                    'of --formats.', flag_values=FLAGS)
flags.DEFINE_float('target', None, 'Draw a labelled horizontal target line.', flag_values=FLAGS)
flags.DEFINE_string('title', '', 'Figure title.', flag_values=FLAGS)
flags.DEFINE_string('metric', 'accuracy', 'Row key to draw (any key of metrics.jsonl).',
                    flag_values=FLAGS)
flags.DEFINE_list('x', ['rounds', 'seconds', 'bytes'], 'X axes, one panel each: rounds, '
                  'seconds, bytes, node_steps.', flag_values=FLAGS)
flags.DEFINE_list('labels', [], 'Legend labels, one per run directory (default: their names).',
                  flag_values=FLAGS)
flags.DEFINE_enum('style', 'default', ['default', 'paper'], 'paper: one-column panels, '
                  'markers, 300 dpi.', flag_values=FLAGS)
flags.DEFINE_multi_enum('formats', ['png', 'svg'], ['png', 'svg', 'pdf'], 'Files to write.',
                        flag_values=FLAGS)


def main(argv: list[str]) -> None:
  if cli.print_help_if_asked(argv, __doc__, FLAGS):
    return
  FLAGS.unparse_flags()  # main may run more than once in a process (tests, notebooks)
  try:
    run_dirs = [pathlib.Path(p) for p in FLAGS(argv)[1:]]
  except flags.Error as e:
    fail(f'{e}; see decsim plot --help')
  error = flags_problem(run_dirs)
  if error:
    fail(error)
  labels = FLAGS.labels or [d.resolve().name for d in run_dirs]
  with cli.one_line_errors(PROG):
    from decsim import plotting
    out = pathlib.Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plotting.plot_runs(out, dict(zip(labels, run_dirs)), x_axes=tuple(FLAGS.x),
                       target=FLAGS.target, title=FLAGS.title, formats=tuple(FLAGS.formats),
                       metric=FLAGS.metric, style=FLAGS.style)
  print('wrote ' + ', '.join(str(out.with_suffix(f'.{f}')) for f in FLAGS.formats))


def flags_problem(run_dirs: list[pathlib.Path]) -> str | None:
  """The one-line complaint about the arguments, or None."""
  from decsim.plotting import X_AXES
  if not run_dirs:
    return 'give at least one run directory: decsim plot RUN_DIR [RUN_DIR ...]'
  unknown = [x for x in FLAGS.x if x not in X_AXES]
  if unknown or not FLAGS.x:
    return f'--x={",".join(FLAGS.x)}: choose from {", ".join(X_AXES)}'
  needed = {'round', FLAGS.metric, *(X_AXES[x][0] for x in FLAGS.x)}
  for d in run_dirs:
    problem = run_problem(d, needed)
    if problem:
      return f'{d} {problem}: pass directories written by decsim --out'
  if FLAGS.target is not None and not 0 <= FLAGS.target <= 1:
    return f'--target={FLAGS.target} must be an accuracy in [0, 1]'
  if FLAGS.labels and len(FLAGS.labels) != len(run_dirs):
    return (f'--labels has {len(FLAGS.labels)} labels for {len(run_dirs)} run directories: '
            'give one per directory')
  return None


def run_problem(run_dir: pathlib.Path,
                needed: frozenset = frozenset({'round', 'accuracy'})) -> str | None:
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
  if not rows or not all(isinstance(r, dict) and needed <= r.keys() for r in rows):
    return f'has no rows with {", ".join(sorted(needed))}'
  return None


PROG = 'decsim plot'


def fail(message: str) -> None:
  cli.fail(message, PROG)


if __name__ == '__main__':
  main(sys.argv)
