"""Node availability over simulated time, for every protocol.

Components compose (a node is online when every component says so):

* ``p_online``: each node is online in a round with this probability (Bernoulli);
* a crash schedule: from ``crash_start_seconds``, ``crash_batch`` more nodes go
  down every ``crash_every_seconds`` until ``crash_fraction`` of all nodes are
  down (MoDeST's churn experiment: from 300 s, 5 nodes every 60 s until 80%);
  with ``crash_graceful`` the nodes leave gracefully (they announce it) instead;
* a join schedule: ``join_nodes`` nodes start offline and join one at a time
  every ``join_every_seconds`` from ``join_start_seconds``;
* a trace: a 0/1 matrix ``[rounds, N]`` read from a file (the last row holds
  after the trace ends).

Which nodes crash or join is a fixed random order drawn from the seed: crashes
take nodes from its front, joins from its back. Availability is a pure function
of (seed, round, simulated clock), evaluated at the start of every round by
``with_churn``, which wraps any protocol: offline nodes neither train, send nor
receive because every protocol honours ``SimState.available``.

Crashes inside a round: the schedule also gives every node its crash time in
simulated seconds (``Availability.crash_time``, ``[N]``, inf: never), so a
protocol can tell whether a node is still up at any moment of a round. MoDeST
uses it (a node that is down when it must send or deliver does not, see
``decsim.protocols.modest``); the other protocols keep the per-round status.
"""

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from decsim.protocols.base import Protocol
from decsim.rng import Stream, round_key
from decsim.config import Component, option
from decsim.errors import ConfigError


class ChurnError(ConfigError):
  """A bad churn setting or trace file; the message names the flag and the fix."""


@dataclasses.dataclass(frozen=True)
class ChurnConfig(Component):
  """Churn: which nodes are online when."""

  p_online: float = option(1.0, 'Probability a node is online in a round.', low=0, high=1,
                           low_open=True)
  crash_start_seconds: float = option(math.inf, 'First crashes (sim seconds; inf: never).',
                                      low=0, allow_inf=True)
  crash_every_seconds: float = option(60.0, 'Seconds between crash batches.', low=0,
                                      low_open=True)
  crash_batch: int = option(5, 'Nodes per crash batch.', low=1)
  crash_fraction: float = option(0.0, 'Crashes stop when this fraction is down.', low=0, high=1)
  crash_graceful: bool = option(False, 'Scheduled nodes leave gracefully.')
  join_nodes: int = option(0, 'Nodes that start offline and join later.', low=0)
  join_start_seconds: float = option(0.0, 'First join (sim seconds).', low=0)
  join_every_seconds: float = option(60.0, 'Seconds between joins.', low=0, low_open=True)
  trace_file: str | None = option(None, '0/1 availability, a row per round, a column per node.')

  @property
  def enabled(self) -> bool:
    return (self.p_online < 1 or self.crash_fraction > 0 or self.join_nodes > 0
            or self.trace_file is not None)


class Availability(NamedTuple):
  online: jax.Array  # [N] bool: can train, send and receive this round
  member: jax.Array  # [N] bool: joined and not gracefully left (MoDeST membership)
  crash_time: jax.Array  # [N] float32: simulated second the node goes down for good (inf: never)


def crash_times(rank: np.ndarray, config: ChurnConfig, limit: int) -> np.ndarray:
  """``[N]`` float32: when each node goes down by the crash schedule (inf: never).

  The node at position ``k`` of the crash order goes down with batch ``k // crash_batch``,
  at ``crash_start_seconds + (k // crash_batch) * crash_every_seconds``, if ``k < limit``;
  ``clock >= crash_time`` is the same set as ``scheduled_count`` gives (tested).
  """
  at = config.crash_start_seconds + (rank // config.crash_batch) * config.crash_every_seconds
  return np.where(rank < limit, at, np.inf).astype(np.float32)


def scheduled_count(t: jax.Array, start: float, every: float, batch: int, limit: int) -> jax.Array:
  """Nodes affected by time ``t``: ``batch`` at ``start``, ``batch`` more each ``every``, at most ``limit``."""
  steps = jnp.floor((t - start) / every) + 1
  return jnp.where(t >= start, jnp.minimum(limit, batch * steps), 0).astype(jnp.int32)


def validate(config: ChurnConfig, nodes: int) -> None:
  """The checks that need the number of nodes (the fields check themselves)."""
  def check(ok, message):
    if not ok:
      raise ChurnError(message)

  check(config.join_nodes < nodes,
        f'--join_nodes={config.join_nodes} must be in 0..{nodes - 1} (some nodes must start online)')
  crashing = math.floor(config.crash_fraction * nodes)
  check(crashing + config.join_nodes <= nodes,
        f'--crash_fraction={config.crash_fraction} and --join_nodes={config.join_nodes} together '
        f'exceed --nodes={nodes}: lower one of them')


def load_trace(path: str, nodes: int) -> np.ndarray:
  """A 0/1 matrix ``[rounds, N]`` bool, one row per round and one column per node (CSV or
  whitespace, # comments). Streamed a row at a time into the preallocated matrix (a first
  pass counts the rows), so a trace of millions of clients costs the matrix's own bytes
  (1 a node and round) plus one row being parsed, never a Python list of the file."""
  fix = 'write one row of 0/1 per round, one column per node'
  try:
    trace = np.empty((sum(1 for _ in _data_lines(path)), nodes), bool)  # [R, N]
    for row, line in enumerate(_data_lines(path)):
      values = np.array(line.replace(',', ' ').split(), np.float32)  # [N]
      if values.size != nodes:
        raise ChurnError(f'--trace_file={path} must have {nodes} columns (one per node) in '
                         f'every row; {fix}')
      if not np.all((values == 0) | (values == 1)):
        raise ChurnError(f'--trace_file={path} holds values other than 0/1; {fix}')
      trace[row] = values == 1
  except (OSError, ValueError) as e:
    raise ChurnError(f'--trace_file={path} cannot be read as a 0/1 matrix ({e}); {fix}') from None
  if not trace.size:
    raise ChurnError(f'--trace_file={path} must have {nodes} columns (one per node) in every '
                     f'row; {fix}')
  if not trace.any():
    raise ChurnError(f'--trace_file={path} has no 1 anywhere: no node would ever be online; {fix}')
  return trace


def _data_lines(path: str):
  """The file's non-empty, non-comment lines, one at a time."""
  with open(path) as f:
    for line in f:
      if line.strip() and not line.lstrip().startswith('#'):
        yield line


def make_availability(config: ChurnConfig, nodes: int, seed: int
                      ) -> Callable[[jax.Array, jax.Array, jax.Array], Availability]:
  """``availability(key, round, clock) -> Availability`` for this configuration."""
  validate(config, nodes)
  order = np.random.default_rng(seed + 11).permutation(nodes)
  rank = np.empty(nodes, np.int32)
  rank[order] = np.arange(nodes)  # position of each node in the crash/join order
  crash_rank = jnp.asarray(rank)
  join_rank = jnp.asarray(nodes - 1 - rank)  # joins come from the back of the order
  crash_limit = math.floor(config.crash_fraction * nodes)
  trace = None if config.trace_file is None else jnp.asarray(load_trace(config.trace_file, nodes))
  crash_time = jnp.asarray(crash_times(rank, config, crash_limit))  # [N]

  def availability(key: jax.Array, round_: jax.Array, clock: jax.Array) -> Availability:
    online = jnp.ones((nodes,), bool)
    if config.p_online < 1:
      draws = jax.random.uniform(round_key(key, round_, Stream.CHURN), (nodes,))
      online &= draws < config.p_online
    down = crash_rank < scheduled_count(clock, config.crash_start_seconds,
                                        config.crash_every_seconds, config.crash_batch,
                                        crash_limit)
    joined = join_rank >= config.join_nodes
    if config.join_nodes:
      joined |= join_rank < scheduled_count(clock, config.join_start_seconds,
                                            config.join_every_seconds, 1, config.join_nodes)
    online &= ~down & joined
    if trace is not None:
      online &= trace[jnp.minimum(round_, trace.shape[0] - 1)]
    left = down if config.crash_graceful else jnp.zeros_like(down)
    return Availability(online=online, member=joined & ~left, crash_time=crash_time)

  return availability


def with_churn(protocol: Protocol, availability) -> Protocol:
  """``protocol`` whose every round first sets ``state.available`` from the schedule."""

  def round_(state, data):
    avail = availability(state.key, state.round, state.clock)
    return protocol.round(state.replace(available=avail.online), data)

  return protocol._replace(round=round_)
