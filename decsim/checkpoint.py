"""Checkpoints of a run with orbax: the whole ``SimState`` plus the run loop's counters.

The state is saved as a flat dict of arrays (typed PRNG keys as their key data)
and restored against the abstract state of a freshly initialised run, so every
leaf comes back with its exact type, shape and dtype (optax states included) and
the tree structure comes from the code, not from the file. Because every random
draw is a function of (seed, round, node), a run resumed from round r computes
bitwise the same rounds as one that never stopped.

A checkpoint that cannot be read (partial write, corruption) is reported in one
line and the previous one is tried.
"""

import contextlib
import logging
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

from decsim.state import SimState
from decsim.errors import UserError


class CheckpointError(UserError):
  """No usable checkpoint; the message names the directory and the fix."""


def _is_key(leaf) -> bool:
  return isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def to_arrays(state: SimState) -> dict[str, jax.Array]:
  """The state's leaves as ``{'00000': array, ...}`` with keys as raw key data."""
  leaves = jax.tree.leaves(state)
  return {f'{i:05d}': jax.random.key_data(l) if _is_key(l) else l for i, l in enumerate(leaves)}


def from_arrays(arrays: dict[str, Any], like: SimState) -> SimState:
  """Inverse of ``to_arrays`` given a state of the same structure."""
  leaves, treedef = jax.tree.flatten(like)
  restored = []
  for i, leaf in enumerate(leaves):
    value = arrays[f'{i:05d}']
    restored.append(jax.random.wrap_key_data(value, impl=jax.random.key_impl(leaf))
                    if _is_key(leaf) else value)
  return jax.tree.unflatten(treedef, restored)


@contextlib.contextmanager
def _quiet_orbax():
  """Orbax logs an error (with a traceback) for each unreadable checkpoint it is asked to
  read; the fallback reports that in one line of its own instead."""
  loggers = [logging.getLogger(name) for name in ('absl', 'orbax')]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


class Checkpointer:
  """Saves every ``every`` rounds into ``directory`` (absolute), keeping ``max_to_keep``."""

  def __init__(self, directory: str | pathlib.Path, max_to_keep: int = 3):
    self.directory = pathlib.Path(directory).absolute()  # orbax needs absolute paths
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state: SimState, meta: dict[str, Any]) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(to_arrays(state)), meta=ocp.args.JsonSave(meta)))

  def restore_latest(self, like: SimState, log: Callable[[str], None]
                     ) -> tuple[int, SimState, dict[str, Any]] | None:
    """The newest readable checkpoint as ``(round, state, meta)``, or None if there is none."""
    with _quiet_orbax():
      return self._restore_latest(like, log)

  def _restore_latest(self, like, log):
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, to_arrays(like))
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        state = from_arrays(restored['state'], like)
        if int(state.round) != step:
          raise ValueError(f'holds round {int(state.round)}')
        return step, state, dict(restored['meta'])
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
        log(f'checkpoint at round {step} in {self.directory} is unreadable '
            f'({type(e).__name__}); falling back to the previous one')
    return None

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
