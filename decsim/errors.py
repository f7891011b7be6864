"""Errors a user can cause, with one common base.

Every launcher turns a ``UserError`` into one line on stderr and exit status 2;
its message names the flag or file and the fix. Anything else is a bug in decsim.
"""


class UserError(Exception):
  """A failure the user can fix (a bad flag, file or combination); one-line message."""


class ConfigError(UserError, ValueError):
  """A bad setting; the message is one line naming the flag and the fix."""


class RunDirError(UserError, OSError):
  """``--out`` cannot be used (not a directory, not writable, locked by another run)."""


class SimulationDiverged(UserError, RuntimeError):
  """Training produced a non-finite loss; metrics up to that point are kept."""


class NoNodeOnline(UserError, RuntimeError):
  """Churn left no node online: the run would only report empty rounds."""


class RunInterrupted(UserError, RuntimeError):
  """SIGINT or SIGTERM stopped the run after its current chunk; ``signum`` says which."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum
