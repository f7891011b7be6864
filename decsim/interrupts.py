"""SIGINT and SIGTERM stop a run between chunks, never inside XLA.

While ``deferred()`` is active (the main thread only), the first SIGINT or SIGTERM
is recorded and the run loop stops at its next boundary: after building, after
compiling, or after the chunk in flight has written its row and its checkpoint.
A Python ``KeyboardInterrupt`` raised inside a compile can crash the interpreter;
a recorded signal cannot. A second signal stops the process at once (exit
128 + signal) — rows already written stay whole, since each is one flushed line.
"""

import contextlib
import os
import signal
import sys
import threading

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state = {'requested': None, 'depth': 0}


def _handler(signum, frame) -> None:
  del frame
  if _state['requested'] is not None:
    sys.stderr.write(f'decsim: error: stopped at once by a second {signal.Signals(signum).name}; '
                     'continue with the same flags and --resume\n')
    sys.stderr.flush()
    os._exit(128 + signum)
  _state['requested'] = signum


@contextlib.contextmanager
def deferred():
  """Records SIGINT/SIGTERM instead of raising, for the duration of the block (re-entrant)."""
  if threading.current_thread() is not threading.main_thread() or _state['depth']:
    _state['depth'] += 1
    try:
      yield
    finally:
      _state['depth'] -= 1
    return
  previous = {s: signal.signal(s, _handler) for s in _SIGNALS}
  _state.update(requested=None, depth=1)
  try:
    yield
  finally:
    _state['depth'] = 0
    for s, handler in previous.items():
      signal.signal(s, handler)


def requested() -> int | None:
  """The signal received since ``deferred()`` began, or None."""
  return _state['requested']


def exit_status(signum: int) -> int:
  return 128 + signum
