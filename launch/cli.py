"""What the launchers share: one-line errors with exit status 2, absl parsing that
reports flag errors the same way, and the results table.

``one_line_errors`` is the one place that turns a failure into the line a user
sees: a ``UserError`` (bad flag, file, combination, divergence, locked ``--out``),
an OS error, a missing JAX backend or an allocation that cannot be made each
exit with status 2; an interrupt with 128 + the signal; anything else (a bug in
decsim) with status 1, its traceback shown only with ``DECSIM_DEBUG=1``.
"""

import contextlib
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from absl import flags

from decsim import interrupts, xla_cache
from decsim.errors import RunInterrupted, UserError

_OUT_OF_MEMORY = ('RESOURCE_EXHAUSTED', 'Out of memory', 'out of memory', 'Unable to allocate')


def fail(message: str, prog: str = 'decsim') -> NoReturn:
  print(f'{prog}: error: {message}', file=sys.stderr)
  sys.exit(2)


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def _kept(e: BaseException) -> str:
  kept = getattr(e, 'kept_earlier_run', None)
  return f' (the earlier run in {kept} is unchanged)' if kept else ''


@contextlib.contextmanager
def one_line_errors(prog: str = 'decsim'):
  """Runs the block with SIGINT/SIGTERM deferred to the run loop's next boundary
  (``decsim.interrupts``); every failure becomes one line on stderr and an exit status."""
  try:
    with interrupts.deferred():
      yield
  except RunInterrupted as e:
    print(f'{prog}: error: {e}{_kept(e)}', file=sys.stderr)
    sys.exit(interrupts.exit_status(e.signum))
  except KeyboardInterrupt:
    print(f'{prog}: error: interrupted', file=sys.stderr)
    sys.exit(130)
  except UserError as e:
    fail(f'{_first_line(e)}{_kept(e)}', prog)
  except MemoryError:
    fail('not enough memory for this run: lower --nodes, use a smaller --model or '
         '--param_dtype=bfloat16', prog)
  except OSError as e:
    where = f' ({e.filename})' if getattr(e, 'filename', None) else ''
    fail(f'{e.strerror or _first_line(e)}{where}: check --out and the files you passed', prog)
  except Exception as e:  # noqa: BLE001 - the last line of defence: one line, not a traceback
    if os.environ.get('DECSIM_DEBUG'):
      raise
    line = _first_line(e)
    if any(s in line for s in _OUT_OF_MEMORY):
      fail(f'the device ran out of memory ({line[:160]}): lower --nodes, use a smaller --model, '
           '--param_dtype=bfloat16 or more --devices', prog)
    print(f'{prog}: internal error: {type(e).__name__}: {line[:300]} (run again with '
          'DECSIM_DEBUG=1 for the traceback and report it)', file=sys.stderr)
    sys.exit(1)


def define_compilation_cache_flag(flag_values: flags.FlagValues, module_name: str) -> None:
  flags.DEFINE_string('compilation_cache', xla_cache.default_dir(),
                      "JAX's persistent compilation cache: a second run of the same "
                      "configuration loads its compiled rounds instead of compiling them "
                      "('' turns it off).", flag_values=flag_values, module_name=module_name)


def check_backend(prog: str = 'decsim') -> None:
  """Fails in one line when JAX cannot start its backend (e.g. JAX_PLATFORMS=cuda on a CPU)."""
  import jax
  try:
    jax.devices()
  except Exception as e:  # noqa: BLE001 - jax 0.10 raises RuntimeError or a bare AssertionError
    platforms = os.environ.get('JAX_PLATFORMS', '')
    fail(f'JAX cannot start its backend{f" JAX_PLATFORMS={platforms!r}" if platforms else ""} '
         f'({_first_line(e)[:200]}); unset JAX_PLATFORMS or install the matching jax plugin',
         prog)


HELP_FLAGS = ('-h', '-?', '--help', '--helpshort', '--helpfull')


def print_help_if_asked(argv: list[str], doc: str, flag_values: flags.FlagValues) -> bool:
  """Prints ``doc`` and the grouped flags when ``argv`` asks for help (launchers with their
  own ``FlagValues``, which absl's help flags do not reach); returns whether it did."""
  if not any(arg in HELP_FLAGS for arg in argv[1:]):
    return False
  print(doc.strip() + '\n\nFlags (grouped):\n' + flag_values.get_help())
  return True


def flags_parser(flag_values: flags.FlagValues, help_command: str,
                 prog: str = 'decsim') -> Callable[[list[str]], list[str]]:
  """Parses argv into ``flag_values``; a flag error becomes one line instead of absl's FATAL."""

  def parse(argv: list[str]) -> list[str]:
    try:
      return flag_values(argv)
    except flags.Error as e:
      fail(f'{e}; see {help_command} --helpfull', prog)

  return parse


def print_table(summary: dict[str, Any], out: str | None, width: int = 22) -> None:
  print('\nresults')
  for key, value in summary.items():
    shown = f'{value:.4g}' if isinstance(value, float) else value
    print(f'  {key:<{width}} {shown}')
  print(f'  {"out":<{width}} {out}')
