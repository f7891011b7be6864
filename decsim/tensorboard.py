"""Optional TensorBoard event files (``--tensorboard``), written with tensorboardX.

``metrics.jsonl`` stays the source of truth: every number of every row it gets is
also written as a scalar whose tag is the row's key and whose step is the row's
round, into ``OUT/tensorboard/``. A resumed run adds an event file there and
writes again the rows after its checkpoint (TensorBoard shows the newest value).
"""

import importlib.util
import pathlib
from typing import Any

from decsim.errors import ConfigError

INSTALL = "pip install 'decsim[tensorboard]'"


def require() -> None:
  """ConfigError, before anything is written, when tensorboardX is not installed."""
  if importlib.util.find_spec('tensorboardX') is None:
    raise ConfigError(f'--tensorboard needs tensorboardX, which is not installed: {INSTALL} '
                      '(or drop --tensorboard)')


class Events:
  """Scalars of the rows, in the event files of one directory."""

  def __init__(self, directory: pathlib.Path):
    from tensorboardX import SummaryWriter
    self.writer = SummaryWriter(logdir=str(directory))

  def write(self, row: dict[str, Any]) -> None:
    for key, value in row.items():
      if key != 'round' and isinstance(value, (int, float)) and not isinstance(value, bool):
        self.writer.add_scalar(key, value, global_step=row['round'])

  def close(self) -> None:
    self.writer.close()
