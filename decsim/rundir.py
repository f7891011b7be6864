"""The run directory ``--out``: locked while a run uses it, and never left half-replaced.

Guarantee: whatever happens to a run (a bad value found late, a divergence, an
exception, SIGINT/SIGTERM, kill -9), the files of an earlier run in ``--out`` are
either kept byte for byte or replaced by the new run's complete files — never a
mix, never emptied. How:

* **Lock.** ``OUT/../.NAME.lock`` is held with an OS lock (``fcntl.flock``) for the
  run's life; a second run on the same ``--out`` is refused with the holder's pid.
  The OS drops the lock when the process dies, however it dies.
* **Fresh runs are staged.** A run without ``--resume`` writes into the sibling
  ``.NAME.staging-PID`` and swaps it in (``promote``) once it has a finite first
  evaluation row, or at its end when ``--out`` held nothing to lose. A run that
  fails earlier removes its staging directory and leaves ``--out`` untouched.
* **Resumed runs append**, and rewrite ``metrics.jsonl`` and ``config.json`` only by
  writing a temporary file and renaming it over the old one.
* **Swaps are two renames** (old -> ``.NAME.replaced-PID``, staging -> ``--out``);
  a kill between them is repaired by the next run on that ``--out``, which puts
  the old run back before it does anything else.
"""

import contextlib
import fcntl
import json
import os
import pathlib
import shutil
from typing import Any

from decsim.errors import ConfigError, RunDirError

_NAME_MAX = 255


def check_path(out: str | os.PathLike) -> pathlib.Path:
  """``--out`` as an absolute path, or RunDirError if it can never be a run directory."""
  text = os.fspath(out)
  if not text.strip():
    raise RunDirError('--out is empty: give a directory, e.g. --out=runs/mine')
  path = pathlib.Path(text).expanduser().absolute()
  if any(len(part) > _NAME_MAX - 40 for part in path.parts):  # room for '.NAME.staging-PID'
    raise RunDirError(f'--out={text} has a name longer than {_NAME_MAX - 40} characters: '
                      'use a shorter name')
  if path.exists() and not path.is_dir():
    raise RunDirError(f'--out={text} is a file, not a directory: choose another --out')
  for parent in path.parents:
    if parent.exists():
      if not parent.is_dir():
        raise RunDirError(f'--out={text}: {parent} is a file, not a directory')
      if not os.access(parent, os.W_OK | os.X_OK):
        raise RunDirError(f'--out={text}: {parent} is not writable: choose another --out')
      break
  return path


def atomic_write(path: pathlib.Path, text: str) -> None:
  """Writes ``text`` to ``path`` by renaming a fully written temporary file over it."""
  tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
  with open(tmp, 'w') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _is_empty(path: pathlib.Path) -> bool:
  return not path.exists() or not any(path.iterdir())


class RunDirectory:
  """``--out`` for one run: lock it, stage a fresh run beside it, promote, release."""

  def __init__(self, out: str | os.PathLike, resume: bool):
    self.path = check_path(out)
    self.resume = resume
    self.promoted = resume  # a resumed run writes in place from the start
    self._lock_file = None
    try:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._lock()
      self._repair()
      self.staging = self.path.with_name(f'.{self.path.name}.staging-{os.getpid()}')
      if resume:
        self.path.mkdir(exist_ok=True)
      else:
        self.staging.mkdir()
    except OSError as e:
      self.release()
      raise RunDirError(f'--out={out} cannot be used ({e.strerror or e}): choose another '
                        '--out') from None

  @property
  def work(self) -> pathlib.Path:
    """Where the run's files are now: the staging directory until promoted."""
    return self.path if self.promoted else self.staging

  def _lock(self) -> None:
    lock_path = self.path.with_name(f'.{self.path.name}.lock')
    self._lock_file = open(lock_path, 'a+')
    try:
      fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      self._lock_file.seek(0)
      holder = self._lock_file.read().strip() or 'unknown'
      self._lock_file.close()
      self._lock_file = None
      raise RunDirError(f'--out={self.path} is in use by another decsim run (pid {holder}): '
                        'wait for it to finish or choose another --out') from None
    self._lock_file.seek(0)
    self._lock_file.truncate()
    self._lock_file.write(f'{os.getpid()}\n')
    self._lock_file.flush()

  def _repair(self) -> None:
    """Undoes what a killed run left: a half-done swap, staging directories."""
    stem = f'.{self.path.name}.'
    leftovers = sorted(p for p in self.path.parent.iterdir() if p.name.startswith(stem)
                       and ('.staging-' in p.name or '.replaced-' in p.name))
    for p in leftovers:
      if '.replaced-' in p.name and not self.path.exists():
        p.rename(self.path)  # killed between the two renames of a swap: the old run returns
      else:
        shutil.rmtree(p, ignore_errors=True)

  def write_json(self, name: str, value: Any) -> None:
    atomic_write(self.work / name, json.dumps(value, indent=2) + '\n')

  def nothing_to_lose(self) -> bool:
    return _is_empty(self.path)

  def promote(self) -> None:
    """Makes the staged run ``--out`` (the earlier run there is removed); idempotent."""
    if self.promoted:
      return
    replaced = self.path.with_name(f'.{self.path.name}.replaced-{os.getpid()}')
    if self.path.exists():
      self.path.rename(replaced)
    self.staging.rename(self.path)
    self.promoted = True
    shutil.rmtree(replaced, ignore_errors=True)

  def discard(self) -> None:
    """Drops the staged run; ``--out`` keeps what it held."""
    if not self.promoted:
      shutil.rmtree(self.staging, ignore_errors=True)

  def release(self) -> None:
    if self._lock_file is not None:
      self._lock_file.close()  # closing the descriptor drops the flock
      self._lock_file = None


class SubDirectory:
  """A run directory inside another (``OUT/replicas/0``): it is staged, promoted, locked
  and released with its parent, and has the interface of a ``RunDirectory``."""

  def __init__(self, parent: RunDirectory, name: str):
    self.parent, self.name = parent, name
    self.work.mkdir(parents=True, exist_ok=True)

  path = property(lambda self: self.parent.path / self.name)
  work = property(lambda self: self.parent.work / self.name)
  resume = property(lambda self: self.parent.resume)
  promoted = property(lambda self: self.parent.promoted)

  def write_json(self, name: str, value: Any) -> None:
    atomic_write(self.work / name, json.dumps(value, indent=2) + '\n')

  def nothing_to_lose(self) -> bool:
    return self.parent.nothing_to_lose()

  def promote(self) -> None:
    self.parent.promote()

  def discard(self) -> None:
    """The parent discards its staging, this directory with it."""

  def release(self) -> None:
    """The parent holds the lock."""


RESUMABLE_CHANGES = ('resume', 'checkpoint_every', 'rounds')


def check_resume(out: pathlib.Path, config: dict[str, Any]) -> None:
  """--resume must continue the same run (more rounds are allowed: ``config`` is the new
  run's config as a dict) from a directory that still has its config.json; an empty or
  missing directory simply starts."""
  path = out / 'config.json'
  if not out.exists() or not any(out.iterdir()):
    return
  if not path.exists():
    raise ConfigError(f'--resume: {path} is missing, so the run in {out} cannot be checked; '
                      'start a new run with another --out')
  try:
    saved = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ConfigError(f'--resume: {path} cannot be read ({e}); start a new run with another '
                      '--out') from None
  changed = sorted(k for k in config.keys() | saved.keys()
                   if k not in RESUMABLE_CHANGES and saved.get(k, '?') != config.get(k, '?'))
  if changed:
    raise ConfigError(f'--resume with settings that differ from {path}: '
                      f'{", ".join(f"--{k}" for k in changed)}; resume with the same flags or '
                      'use a new --out')


@contextlib.contextmanager
def opened(out_dir: str | pathlib.Path | None, config: dict[str, Any]):
  """The locked ``RunDirectory`` of a run whose configuration (as a dict, with ``resume``
  and ``checkpoint_every``) is ``config``, or None without ``out_dir``. ``--resume`` is
  checked against the directory's config.json; the staging is discarded and the lock
  released when the block ends."""
  if out_dir is None:
    if config.get('resume') or config.get('checkpoint_every'):
      raise ConfigError('--resume and --checkpoint_every need an output directory (--out)')
    yield None
    return
  run_dir = RunDirectory(out_dir, bool(config.get('resume')))
  try:
    if run_dir.resume:
      check_resume(run_dir.path, config)
    yield run_dir
  finally:
    run_dir.discard()
    run_dir.release()
