"""What a run writes from a chunk of rounds: rows, the summary, the progress line.

The run loop (``decsim.simulate``) is one piece of code for every protocol
family; a ``Report`` says how a family turns the state and metrics of a chunk
into rows of ``metrics.jsonl``, when its run cannot go on, and what its summary
holds. ``network_report`` is the report of the learning protocols on the
simulated network (one row per evaluation: accuracy, simulated seconds, bytes by
message kind); SAPO has its own (``decsim.rl.experiment.sapo_report``).

With replicas (a leading replica axis on every field) the loop makes each
replica's rows and merges them: every value becomes the mean over replicas,
with ``<key>_std`` (population standard deviation) and ``<key>_replicas``
(the values) beside it. The summary of a replicated run summarises each replica
on its own and reports every number's mean, sample std and 95% t-interval
(``replica_summary``).
"""

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from decsim.errors import NoNodeOnline, SimulationDiverged
from decsim.network import KINDS, MODEL

Row = dict[str, Any]


class Report(NamedTuple):
  """How one protocol family reports a run; see the module docstring."""

  # On the device after a chunk: the few values the rows need, as a dict of
  # arrays, from (state, chunk metrics stacked over rounds, evaluation). It
  # holds 'round' (rounds completed) and 'node_steps' (local steps of the chunk).
  fields: Callable[[Any, Any, dict[str, jax.Array]], dict[str, Any]]
  # On the host: one replica's fields -> the chunk's rows, each with 'round'.
  rows: Callable[[dict[str, Any]], list[Row]]
  # Why the run cannot go on after the chunk's rows (None: it can), given the
  # node-steps so far and the host fields. Non-finite numbers are None by then.
  problem: Callable[[list[Row], int, dict[str, Any]], Exception | None]
  # The family's part of summary.json, from every row of the run.
  summarize: Callable[[list[Row]], dict[str, Any]]
  # The family's part of the progress line printed after a chunk.
  line: Callable[[list[Row]], str]
  # Whether a run starts with a row at round 0 (the initial models evaluated):
  # ``fields`` is then also called with ``metrics=None``, before any round.
  round_zero: bool = False


def chunk_rows(report: Report, fields: dict[str, Any], replicated: bool) -> list[Row]:
  """The rows of one chunk from its host ``fields``; replicas merged (module docstring)."""
  if not replicated:
    return [finite_or_none(r) for r in report.rows(fields)]
  count = np.shape(fields['round'])[0]
  per_replica = [[finite_or_none(r) for r in report.rows(jax.tree.map(lambda v: v[i], fields))]
                 for i in range(count)]
  return [merge_replicas(list(rows)) for rows in zip(*per_replica)]


def finite_or_none(row: Row) -> Row:
  """The row with every non-finite float as None (JSON has no NaN)."""
  return {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in row.items()}


def merge_replicas(replicas: list[Row]) -> Row:
  """One row from the replicas' rows of the same round (module docstring)."""
  row = {'round': replicas[0]['round'], 'replicas': len(replicas)}
  for key in replicas[0]:
    if key == 'round':
      continue
    values = [r[key] for r in replicas]
    finite = None not in values
    row[key] = float(np.mean(values)) if finite else None
    row[f'{key}_std'] = float(np.std(values)) if finite else None
    row[f'{key}_replicas'] = values
  return row


def replica_rows(rows: list[Row], i: int) -> list[Row]:
  """Replica ``i``'s own rows, taken back out of merged rows (``<key>_replicas``)."""
  suffix = '_replicas'
  return [{'round': r['round'], **{k[:-len(suffix)]: v[i] for k, v in r.items()
                                   if k.endswith(suffix)}} for r in rows]


def replica_summary(summarize: Callable[[list[Row]], dict[str, Any]],
                    rows: list[Row]) -> dict[str, Any]:
  """The summary of a replicated run: each replica summarised from its own rows, then
  every number as the mean over replicas with ``_std`` (sample standard deviation),
  ``_ci95`` (95% Student-t interval of the mean) and ``_replicas`` (the values).
  A value some replicas lack (e.g. a target not reached) is None, with its values."""
  per_replica = [summarize(replica_rows(rows, i)) for i in range(rows[0]['replicas'])]
  return combine(per_replica)


def combine(summaries: list[dict[str, Any]]) -> dict[str, Any]:
  """One summary from the replicas' own: numbers as mean, ``_std``, ``_ci95`` and
  ``_replicas``; what all share as it is; what differs as None with its values."""
  out = {}
  for key in summaries[0]:
    values = [s[key] for s in summaries]
    if all(isinstance(v, dict) for v in values):
      out[key] = combine(values)
    elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
      out.update(_spread(key, values))
    elif all(v == values[0] for v in values):
      out[key] = values[0]
    else:
      out.update({key: None, f'{key}_replicas': values})
  return out


def _spread(key: str, values: list[float]) -> dict[str, Any]:
  return {key: float(np.mean(values)), f'{key}_std': float(np.std(values, ddof=1)),
          f'{key}_ci95': list(t_interval(values)), f'{key}_replicas': values}


def t_interval(values) -> tuple[float, float]:
  """The 95% Student-t interval of the mean of ``values`` (a point with fewer than two)."""
  import scipy.stats  # only for replicated runs
  values = np.asarray(values, np.float64)
  mean = float(values.mean())
  if len(values) < 2:
    return mean, mean
  half = float(scipy.stats.t.ppf(0.975, len(values) - 1)) * float(values.std(ddof=1))
  return mean - half / math.sqrt(len(values)), mean + half / math.sqrt(len(values))


# --- the learning protocols on the simulated network ------------------------------------------

# Reductions over the node axis on the device: per-node values may be split over
# devices and hosts, their sums are replicated. Messages per kind [..., N, K] -> [..., K].
_sent_by_kind = jax.jit(lambda sent: jnp.sum(sent, axis=-2))
_any_online = jax.jit(lambda available: jnp.any(available, axis=-1))  # [..., N] -> [...]


def network_report(message_bytes: tuple[int, ...], target_accuracy: float | None = None) -> Report:
  """One row per evaluation; ``message_bytes`` per kind (network.KINDS) prices the messages."""
  return Report(fields=_network_fields, rows=functools.partial(_network_row, message_bytes),
                problem=_network_problem,
                summarize=functools.partial(network_summary, target_accuracy=target_accuracy),
                line=_network_line, round_zero=True)


def _network_fields(state, metrics, evals: dict[str, jax.Array]) -> dict[str, Any]:
  """The row's values; ``metrics`` None at round 0 (no training loss, no steps yet)."""
  if metrics is None:
    train_loss = participants = jnp.full(jnp.shape(state.round), jnp.nan)
    node_steps = jnp.zeros_like(state.round)
  else:
    train_loss = jnp.mean(metrics.train_loss, axis=-1)
    participants = jnp.mean(metrics.active_nodes, axis=-1)
    node_steps = jnp.sum(metrics.node_steps, axis=-1)
  return {'round': state.round, 'sim_seconds': state.clock, 'sent': _sent_by_kind(state.sent),
          'train_loss': train_loss, 'participants': participants, 'node_steps': node_steps,
          'online': _any_online(state.available),
          'evals': evals}


def _network_row(message_bytes: tuple[int, ...], fields: dict[str, Any]) -> list[Row]:
  """The chunk's one row; simulated quantities only, so rows are deterministic."""
  counts = np.asarray(fields['sent'])  # [K]
  by_kind = {f'bytes_{kind}': int(c) * b for kind, c, b in zip(KINDS, counts, message_bytes)}
  row = {
      'round': int(fields['round']),
      'train_loss': float(fields['train_loss']),
      'participants': float(fields['participants']),  # nodes that trained, mean per round
      'sim_seconds': float(fields['sim_seconds']),
      'node_steps': int(fields['node_steps']),  # local steps since the previous row
      'models_sent': int(counts[MODEL]),
      'bytes_total': sum(by_kind.values()),
      **by_kind,
  }
  row.update({k: float(v) for k, v in fields['evals'].items()})
  return [row]


def _network_problem(rows: list[Row], node_steps: int, fields: dict[str, Any]) -> Exception | None:
  """Why the run cannot go on: divergence, a non-finite clock, no node ever online."""
  row = rows[-1]
  if row['train_loss'] is None or row['loss'] is None:
    return SimulationDiverged(f'training diverged by round {row["round"]}: the loss is not '
                              'finite; lower --lr')
  if row['sim_seconds'] is None:
    return SimulationDiverged(f'simulated time is not finite by round {row["round"]}: a network '
                              'or compute setting is out of range (bandwidth, speed, latency)')
  if node_steps == 0 and not np.any(fields['online']):
    return NoNodeOnline(f'no node has been online in rounds 1..{row["round"]}: the churn '
                        'settings (--p_online, --trace_file, --join_*, --crash_*) leave nobody '
                        'to train')
  return None


def _network_line(rows: list[Row]) -> str:
  row = rows[-1]
  loss = 'nan' if row['loss'] is None else f'{row["loss"]:.4f}'
  return (f'acc {row["accuracy"]:.4f}  loss {loss}  sim {row["sim_seconds"]:9.1f}s  '
          f'bytes {row["bytes_total"]:.3e}')


def network_summary(rows: list[Row], target_accuracy: float | None) -> dict[str, Any]:
  """Final and best accuracy, and the first evaluation at or above the target.

  ``accuracy`` is what the nodes hold: the delivered model of FedAvg and MoDeST,
  the mean of the nodes' own models for D-PSGD and gossip (whose node-average
  model, held by no node, is ``consensus_accuracy``; its final value is kept too).
  """
  hit = next((r for r in rows if target_accuracy is not None and r.get('accuracy') is not None
              and r['accuracy'] >= target_accuracy), None)
  last = rows[-1] if rows else {}
  summary = {
      'final_accuracy': last.get('accuracy'),
      'best_accuracy': max((r['accuracy'] for r in rows if r['accuracy'] is not None),
                           default=None),
      'rounds': last.get('round', 0),
      'target_accuracy': target_accuracy,
      'rounds_to_target': hit['round'] if hit else None,
      'seconds_to_target': hit['sim_seconds'] if hit else None,
      'bytes_to_target': hit['bytes_total'] if hit else None,
      'sim_seconds': last.get('sim_seconds', 0.0),
      'bytes_total': last.get('bytes_total', 0),
      'bytes_breakdown': {k: last.get(f'bytes_{k}', 0) for k in KINDS},
  }
  if 'consensus_accuracy' in last:
    summary['final_consensus_accuracy'] = last['consensus_accuracy']
  return summary
