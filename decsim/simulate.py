"""The run loop: rounds under one jit-compiled ``lax.scan`` per evaluation chunk.

As in purejaxrl, the only Python loop is between chunks of ``eval_every``
rounds, where the loop evaluates, logs and writes results. Every row of
``metrics.jsonl`` is flushed as soon as it exists, so an interrupted or
diverged run keeps everything it had computed.
"""

import json
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from decsim import sharding
from decsim.data.sampler import NodeData
from decsim.protocols.base import Protocol
from decsim.state import SimState
from decsim.types import PRNGKey

EvaluateFn = Callable[[SimState], dict[str, jax.Array]]


class SimulationDiverged(RuntimeError):
  """Training produced a non-finite loss; metrics up to that point are kept."""


def make_chunk(protocol: Protocol, length: int, shardings: SimState | None = None):
  """``chunk(state, data) -> (state, metrics stacked over length rounds)``.

  With ``shardings`` (``decsim.sharding.state_shardings``) the scan carry is
  pinned to them every round, so the node axis stays split over the mesh.
  """
  pin = (lambda s: s) if shardings is None else (
      lambda s: jax.lax.with_sharding_constraint(s, shardings))

  def chunk(state: SimState, data: NodeData):
    return jax.lax.scan(lambda s, _: protocol.round(pin(s), data), state, None, length=length)

  return chunk


def compile_chunk(protocol: Protocol, state: SimState, data: NodeData, length: int,
                  mesh: Mesh | None = None):
  """The AOT-compiled chunk of ``length`` rounds; the input state is donated (its buffers
  are reused for the output, so a round holds one copy of the node state, not two).
  With ``mesh`` the state stays split over the node axis (``decsim.sharding``)."""
  if mesh is None:
    fn = jax.jit(make_chunk(protocol, length), donate_argnums=0)
  else:
    shardings = sharding.state_shardings(state, mesh)
    fn = jax.jit(make_chunk(protocol, length, shardings), donate_argnums=0,
                 out_shardings=(shardings, sharding.replicated(mesh)))
  return fn.lower(state, data).compile()


def peak_memory() -> tuple[int, str]:
  """``(bytes, source)``: the device allocator's peak where it reports one (GPU, TPU),
  else this process's peak resident set (CPU; includes Python and the data)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'device peak_bytes_in_use'
  import resource
  import sys
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(rss if sys.platform == 'darwin' else rss * 1024), 'host ru_maxrss'


def run(protocol: Protocol, data: NodeData, evaluate: EvaluateFn, *, key: PRNGKey, rounds: int,
        eval_every: int, model_bytes: int, target_accuracy: float | None = None,
        out_dir: str | pathlib.Path | None = None,
        log: Callable[[str], None] = print, mesh: Mesh | None = None) -> dict[str, Any]:
  """Runs ``rounds`` rounds, evaluating every ``eval_every``; returns the summary.

  Writes ``metrics.jsonl`` (one row per evaluation) and ``summary.json`` into
  ``out_dir`` when given. Raises ``SimulationDiverged`` on a non-finite loss,
  after writing the rows so far. With ``mesh`` the node axis is split over its
  devices (``decsim.sharding``).
  """
  if rounds % eval_every:
    raise ValueError(f'rounds={rounds} is not a multiple of eval_every={eval_every}')
  out = pathlib.Path(out_dir) if out_dir is not None else None
  metrics_file = None
  if out is not None:
    out.mkdir(parents=True, exist_ok=True)
    metrics_file = open(out / 'metrics.jsonl', 'w')

  if mesh is None:
    state = jax.jit(protocol.init)(key, data)
  else:
    data = sharding.shard_data(data, mesh)
    state = sharding.sharded_init(protocol.init, key, data, mesh)
  t0 = time.perf_counter()
  chunk = compile_chunk(protocol, state, data, eval_every, mesh)
  evaluate = jax.jit(evaluate)
  evaluate.lower(state).compile()
  compile_seconds = time.perf_counter() - t0

  rows, run_seconds, node_steps, status = [], 0.0, 0, 'completed'
  try:
    for _ in range(rounds // eval_every):
      t = time.perf_counter()
      state, metrics = chunk(state, data)
      jax.block_until_ready(state)
      run_seconds += time.perf_counter() - t
      node_steps += int(jnp.sum(metrics.node_steps))
      row = _row(state, metrics, evaluate(state), model_bytes)
      diverged = not all(math.isfinite(row[k]) for k in ('train_loss', 'loss'))
      row = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in row.items()}
      rows.append(row)
      if metrics_file:
        metrics_file.write(json.dumps(row) + '\n')
        metrics_file.flush()
      log(_progress(row, rounds, run_seconds))
      if diverged:
        status = 'diverged'
        raise SimulationDiverged(
            f'training diverged by round {row["round"]}: the loss is not finite; lower --lr '
            f'(metrics so far are kept in {out or "the returned rows"})')
  finally:
    if metrics_file:
      metrics_file.close()
    summary = summarize(rows, target_accuracy, compile_seconds, run_seconds, node_steps)
    summary['status'] = status
    summary['devices'] = 1 if mesh is None else mesh.size
    summary['peak_memory_bytes'], summary['peak_memory_source'] = peak_memory()
    if out is not None:
      (out / 'summary.json').write_text(json.dumps(summary, indent=2) + '\n')
  return summary


def _row(state: SimState, metrics, evals: dict[str, jax.Array], model_bytes: int) -> dict[str, Any]:
  """One metrics.jsonl row; simulated quantities only, so rows are deterministic."""
  total_sent = int(state.total_models_sent)
  row = {
      'round': int(state.round),
      'train_loss': float(jnp.mean(metrics.train_loss)),
      'sim_seconds': float(state.clock),
      'models_sent': total_sent,
      'bytes_total': total_sent * model_bytes,
  }
  row.update({k: float(v) for k, v in evals.items()})
  return row


def _progress(row: dict[str, Any], rounds: int, run_seconds: float) -> str:
  rate = row['round'] / max(run_seconds, 1e-9)
  eta = (rounds - row['round']) / max(rate, 1e-9)
  loss = 'nan' if row['loss'] is None else f'{row["loss"]:.4f}'
  return (f'round {row["round"]:>6}/{rounds}  acc {row["accuracy"]:.4f}  loss {loss}  '
          f'sim {row["sim_seconds"]:9.1f}s  bytes {row["bytes_total"]:.3e}  '
          f'{rate:7.1f} rounds/s  eta {eta:6.1f}s')


def summarize(rows: list[dict[str, Any]], target_accuracy: float | None, compile_seconds: float,
              run_seconds: float, node_steps: int) -> dict[str, Any]:
  """Final and best accuracy, and the first evaluation at or above the target."""
  hit = next((r for r in rows if target_accuracy is not None
              and r['accuracy'] >= target_accuracy), None)
  return {
      'final_accuracy': rows[-1]['accuracy'] if rows else None,
      'best_accuracy': max((r['accuracy'] for r in rows), default=None),
      'rounds': rows[-1]['round'] if rows else 0,
      'target_accuracy': target_accuracy,
      'rounds_to_target': hit['round'] if hit else None,
      'seconds_to_target': hit['sim_seconds'] if hit else None,
      'bytes_to_target': hit['bytes_total'] if hit else None,
      'sim_seconds': rows[-1]['sim_seconds'] if rows else 0.0,
      'bytes_total': rows[-1]['bytes_total'] if rows else 0,
      'wall_seconds': run_seconds,
      'compile_seconds': compile_seconds,
      'node_steps_per_second': node_steps / run_seconds if run_seconds > 0 else None,
  }
