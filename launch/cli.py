"""What the launchers share: one-line errors with exit status 2, absl parsing that
reports flag errors the same way, and the results table."""

import sys
from collections.abc import Callable
from typing import Any, NoReturn

from absl import flags


def fail(message: str, prog: str = 'decsim') -> NoReturn:
  print(f'{prog}: error: {message}', file=sys.stderr)
  sys.exit(2)


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
