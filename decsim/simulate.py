"""The run loop: rounds under one jit-compiled ``lax.scan`` per evaluation chunk.

As in purejaxrl, the only Python loop is between chunks of ``eval_every``
rounds, where the loop evaluates, logs and writes results. Every row of
``metrics.jsonl`` is flushed as soon as it exists, so an interrupted or
diverged run keeps everything it had computed.
"""

import dataclasses
import json
import math
import pathlib
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from decsim import interrupts, rundir, sharding
from decsim.checkpoint import CheckpointError, Checkpointer
from decsim.errors import NoNodeOnline, RunInterrupted, SimulationDiverged
from decsim.data.sampler import NodeData
from decsim.network import KINDS, MODEL
from decsim.protocols.base import Protocol
from decsim.rundir import RunDirectory
from decsim.state import SimState
from decsim.types import PRNGKey

EvaluateFn = Callable[[SimState], dict[str, jax.Array]]


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
                  mesh: Mesh | None = None, replicated: bool = False):
  """The AOT-compiled chunk of ``length`` rounds; the input state is donated (its buffers
  are reused for the output, so a round holds one copy of the node state, not two).
  With ``mesh`` the state stays split over the node axis (``decsim.sharding``); with
  ``replicated`` the chunk is vmapped over a leading replica axis of the state."""
  if mesh is None:
    chunk = make_chunk(protocol, length)
    fn = jax.jit(jax.vmap(chunk, in_axes=(0, None)) if replicated else chunk, donate_argnums=0)
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
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(rss if sys.platform == 'darwin' else rss * 1024), 'host ru_maxrss'


@dataclasses.dataclass
class _Progress:
  """What the loop has done so far: rows, timings, node-steps and how it ended."""

  rows: list
  run_seconds: float = 0.0
  node_steps: int = 0
  compile_seconds: float = 0.0
  status: str = 'completed'
  error: str | None = None


def run(protocol: Protocol, data: NodeData, evaluate: EvaluateFn, *, key: PRNGKey, rounds: int,
        eval_every: int, message_bytes: tuple[int, ...], target_accuracy: float | None = None,
        out_dir: str | pathlib.Path | None = None, checkpoint_every: int = 0,
        resume: bool = False, log: Callable[[str], None] = print,
        mesh: Mesh | None = None, run_dir: RunDirectory | None = None,
        files: dict[str, Any] | None = None) -> dict[str, Any]:
  """Runs ``rounds`` rounds, evaluating every ``eval_every``; returns the summary.

  Writes ``metrics.jsonl`` (one row per evaluation), ``summary.json`` and the JSON
  ``files`` (e.g. ``config.json``) into ``out_dir`` (or the locked ``run_dir``)
  when given, and an orbax checkpoint every ``checkpoint_every`` rounds into
  ``OUT/checkpoints``; see ``decsim.rundir`` for how an earlier run in the
  directory is never lost. With ``resume`` the run continues from the newest
  readable checkpoint and keeps the rows written up to it. ``summary['status']``
  is ``completed``, ``diverged``, ``interrupted`` (SIGINT/SIGTERM; raises
  ``RunInterrupted`` after the summary) or ``failed`` (with ``error``). With
  ``mesh`` the node axis is split over its devices (``decsim.sharding``); a batch
  of keys (one per replica) runs the replicas as one vmapped simulation.
  """
  if rounds % eval_every or checkpoint_every % eval_every:
    raise ValueError(f'rounds={rounds} and checkpoint_every={checkpoint_every} must be '
                     f'multiples of eval_every={eval_every}')
  if (checkpoint_every or resume) and out_dir is None and run_dir is None:
    raise ValueError('checkpoints need an output directory')
  own_dir = run_dir is None and out_dir is not None
  if own_dir:
    run_dir = RunDirectory(out_dir, resume)
  try:
    with interrupts.deferred():
      return _run(protocol, data, evaluate, key, rounds, eval_every, message_bytes,
                  target_accuracy, run_dir, checkpoint_every, resume, log, mesh, files or {})
  finally:
    if own_dir:
      run_dir.discard()
      run_dir.release()


def _run(protocol, data, evaluate, key, rounds, eval_every, message_bytes, target_accuracy,
         run_dir, checkpoint_every, resume, log, mesh, files) -> dict[str, Any]:
  replicated = key.ndim == 1  # a key per replica: R seeds vmapped as one simulation
  if replicated and mesh is not None:
    raise ValueError('replicas and a device mesh cannot be combined')
  progress = _Progress(rows=[])
  writer = RunWriter(run_dir, files, checkpoint_every)
  try:
    stop_if_requested('before the first round')
    state, data = _initial_state(protocol, key, data, mesh, replicated)
    if resume:
      state = writer.restore(state, progress, mesh, log)
    t0 = time.perf_counter()
    chunk = compile_chunk(protocol, state, data, eval_every, mesh, replicated)
    evaluate = jax.jit(jax.vmap(evaluate) if replicated else evaluate)
    evaluate.lower(state).compile()
    progress.compile_seconds = time.perf_counter() - t0
    stop_if_requested('while compiling')
    for _ in range(int(np.max(state.round)) // eval_every, rounds // eval_every):
      state = _one_chunk(chunk, evaluate, state, data, message_bytes, progress, writer)
      log(_progress(progress.rows[-1], rounds, progress.run_seconds))
      stop_if_requested(f'at round {progress.rows[-1]["round"]}')
  except BaseException as e:
    progress.status, progress.error = ending(e)
    writer.finish(_summary(progress, target_accuracy, mesh))
    if writer.kept_earlier_run:
      e.kept_earlier_run = writer.kept_earlier_run  # launchers say it is unchanged
    raise
  summary = _summary(progress, target_accuracy, mesh)
  writer.finish(summary)
  return summary


def _initial_state(protocol, key, data, mesh, replicated):
  if mesh is None:
    init = jax.vmap(protocol.init, in_axes=(0, None)) if replicated else protocol.init
    return jax.jit(init)(key, data), data
  data = sharding.shard_data(data, mesh)
  return sharding.sharded_init(protocol.init, key, data, mesh), data


def _one_chunk(chunk, evaluate, state, data, message_bytes, progress: _Progress, writer):
  """Runs one chunk, appends its row (and checkpoint); raises if the run must stop."""
  t = time.perf_counter()
  state, metrics = chunk(state, data)
  jax.block_until_ready(state)
  progress.run_seconds += time.perf_counter() - t
  progress.node_steps += int(jnp.sum(metrics.node_steps))
  raw = _row(state, metrics, evaluate(state), message_bytes)
  row = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in raw.items()}
  progress.rows.append(row)
  problem = _row_problem(row, progress.node_steps, state)
  writer.append(row, finite=problem is None)
  if problem is None:
    writer.checkpoint(row['round'], state, progress)
  else:
    raise problem
  return state


def _row_problem(row: dict[str, Any], node_steps: int, state: SimState) -> Exception | None:
  """Why the run cannot go on after ``row``: divergence, a non-finite clock, no node online."""
  if row['train_loss'] is None or row['loss'] is None:
    return SimulationDiverged(f'training diverged by round {row["round"]}: the loss is not '
                              'finite; lower --lr')
  if row['sim_seconds'] is None:
    return SimulationDiverged(f'simulated time is not finite by round {row["round"]}: a network '
                              'or compute setting is out of range (bandwidth, speed, latency)')
  if node_steps == 0 and not np.any(np.asarray(state.available)):
    return NoNodeOnline(f'no node has been online in rounds 1..{row["round"]}: the churn '
                        'settings (--p_online, --trace_file, --join_*, --crash_*) leave nobody '
                        'to train')
  return None


def stop_if_requested(where: str) -> None:
  signum = interrupts.requested()
  if signum is not None:
    name = signal.Signals(signum).name
    raise RunInterrupted(f'interrupted by {name} {where}; continue with the same flags and '
                         '--resume (with --checkpoint_every) or run again', signum)


def ending(e: BaseException) -> tuple[str, str]:
  """``(status, one-line error)`` of an exception that ended the run."""
  line = str(e).splitlines()[0] if str(e) else type(e).__name__
  if isinstance(e, SimulationDiverged) and 'diverged' in line:
    return 'diverged', line
  if isinstance(e, (RunInterrupted, KeyboardInterrupt)):
    return 'interrupted', line
  return 'failed', line


def _summary(progress: _Progress, target_accuracy, mesh) -> dict[str, Any]:
  summary = summarize(progress.rows, target_accuracy, progress.compile_seconds,
                      progress.run_seconds, progress.node_steps)
  summary['status'] = progress.status
  if progress.error:
    summary['error'] = progress.error
  summary['devices'] = 1 if mesh is None else mesh.size
  summary['peak_memory_bytes'], summary['peak_memory_source'] = peak_memory()
  return summary


class RunWriter:
  """The run's files in its ``RunDirectory`` (nothing when there is none)."""

  def __init__(self, run_dir: RunDirectory | None, files: dict[str, Any], checkpoint_every: int):
    self.run_dir, self.files, self.every = run_dir, files, checkpoint_every
    self.kept_rows: list = []  # rows of a resumed run up to its checkpoint
    self.metrics = None
    self.checkpointer = None
    self.kept_earlier_run = None  # set when this run left an earlier one as it was

  def restore(self, state, progress: _Progress, mesh, log):
    """The newest readable checkpoint's state (and its rows), or ``state`` when none."""
    self.checkpointer = Checkpointer(self.run_dir.path / 'checkpoints')
    restored = self.checkpointer.restore_latest(state, log)
    if restored is None:
      log(f'no checkpoint in {self.checkpointer.directory}; starting at round 0')
      return state
    step, state, meta = restored
    if mesh is not None:  # restored on one device; split the node axis again
      state = sharding.put(state, sharding.state_shardings(state, mesh))
    rows = [r for r in read_rows(self.run_dir.path / 'metrics.jsonl') if r['round'] <= step]
    if not rows or rows[-1]['round'] != step:
      raise CheckpointError(
          f'--resume: {self.run_dir.path}/metrics.jsonl does not reach the checkpoint at round '
          f'{step} (last row: {rows[-1]["round"] if rows else "none"}); it was cut or edited — '
          'start a new run with another --out')
    progress.rows, self.kept_rows = list(rows), list(rows)
    progress.run_seconds, progress.node_steps = meta['run_seconds'], meta['node_steps']
    log(f'resumed from the checkpoint at round {step}')
    return state

  def append(self, row: dict[str, Any], finite: bool) -> None:
    if self.run_dir is None:
      return
    if self.metrics is None:  # the first row: the run's files appear (staged when fresh)
      self._open_files()
    self.metrics.write(json.dumps(row) + '\n')
    self.metrics.flush()
    if finite:
      self.run_dir.promote()

  def _open_files(self) -> None:
    for name, value in self.files.items():
      self.run_dir.write_json(name, value)
    rundir.atomic_write(self.run_dir.work / 'metrics.jsonl',
                        ''.join(json.dumps(r) + '\n' for r in self.kept_rows))
    self.metrics = open(self.run_dir.work / 'metrics.jsonl', 'a')

  def checkpoint(self, round_: int, state, progress: _Progress) -> None:
    if not self.every or round_ % self.every:
      return
    if self.checkpointer is None:
      self.checkpointer = Checkpointer(self.run_dir.path / 'checkpoints')
    self.checkpointer.save(round_, state, {'run_seconds': progress.run_seconds,
                                           'node_steps': progress.node_steps})

  def finish(self, summary: dict[str, Any]) -> None:
    """Closes files, waits for the checkpoint in flight, writes summary.json.

    A run that never promoted its staged files keeps ``--out`` as it was, unless
    ``--out`` held nothing: then its files (and summary) land there.
    """
    if self.checkpointer is not None:
      self.checkpointer.close()
    if self.run_dir is None:
      return
    wrote = self.metrics is not None
    if not self.run_dir.promoted or (self.run_dir.resume and not wrote):
      if not self.run_dir.nothing_to_lose():
        self.kept_earlier_run = self.run_dir.path
        if wrote:
          self.metrics.close()
        return
      if not wrote:  # a run stopped before its first row: its config and status, no rows
        self._open_files()
      self.run_dir.promote()
    self.metrics.close()
    self.run_dir.write_json('summary.json', summary)


def read_rows(path: pathlib.Path) -> list[dict[str, Any]]:
  """The rows of a metrics.jsonl; none when it does not exist; a torn last line is dropped."""
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      break  # a row cut by a kill: everything after it is lost anyway
  return rows


# Messages per kind summed over nodes ([..., N, K] -> [..., K]) on the device: the
# per-node counts may be split over devices and hosts, the sums are replicated.
_sent_by_kind = jax.jit(lambda sent: jnp.sum(sent, axis=-2))


def _row(state: SimState, metrics, evals: dict[str, jax.Array],
         message_bytes: tuple[int, ...]) -> dict[str, Any]:
  """One metrics.jsonl row; simulated quantities only, so rows are deterministic.

  With replicas (a leading replica axis) every value is the mean over replicas,
  with ``<key>_std`` and the per-replica values ``<key>_replicas`` beside it.
  """
  fields = jax.tree.map(np.asarray, {
      'round': state.round, 'sim_seconds': state.clock, 'sent': _sent_by_kind(state.sent),
      'train_loss': jnp.mean(metrics.train_loss, axis=-1), **evals})
  if fields['round'].ndim == 0:
    return _replica_row(fields, message_bytes)
  replicas = [_replica_row({k: v[i] for k, v in fields.items()}, message_bytes)
              for i in range(fields['round'].shape[0])]
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


def _replica_row(fields: dict[str, np.ndarray], message_bytes: tuple[int, ...]) -> dict[str, Any]:
  counts = fields['sent']  # [K]
  by_kind = {f'bytes_{kind}': int(c) * b for kind, c, b in zip(KINDS, counts, message_bytes)}
  row = {
      'round': int(fields['round']),
      'train_loss': float(fields['train_loss']),
      'sim_seconds': float(fields['sim_seconds']),
      'models_sent': int(counts[MODEL]),
      'bytes_total': sum(by_kind.values()),
      **by_kind,
  }
  row.update({k: float(v) for k, v in fields.items() if k not in ('round', 'sim_seconds', 'sent',
                                                                  'train_loss')})
  return row


def _progress(row: dict[str, Any], rounds: int, run_seconds: float) -> str:
  rate = row['round'] / max(run_seconds, 1e-9)
  eta = (rounds - row['round']) / max(rate, 1e-9)
  loss = 'nan' if row['loss'] is None else f'{row["loss"]:.4f}'
  bar = ''
  if sys.stdout.isatty():  # a bar for people watching; plain lines in logs and pipes
    done = round(20 * row['round'] / rounds)
    bar = f'[{"#" * done}{"." * (20 - done)}] '
  return (f'{bar}round {row["round"]:>6}/{rounds}  acc {row["accuracy"]:.4f}  loss {loss}  '
          f'sim {row["sim_seconds"]:9.1f}s  bytes {row["bytes_total"]:.3e}  '
          f'{rate:7.1f} rounds/s  eta {eta:6.1f}s')


def summarize(rows: list[dict[str, Any]], target_accuracy: float | None, compile_seconds: float,
              run_seconds: float, node_steps: int) -> dict[str, Any]:
  """Final and best accuracy, and the first evaluation at or above the target.

  For decentralized protocols the target is also checked against the mean
  accuracy of the individual evaluated nodes (``*_to_target_nodes``): the model
  any one node actually holds, not the node average nobody holds.
  """
  def first_hit(key):
    return next((r for r in rows if target_accuracy is not None and r.get(key) is not None
                 and r[key] >= target_accuracy), None)

  hit = first_hit('accuracy')
  summary = {
      'final_accuracy': rows[-1]['accuracy'] if rows else None,
      'best_accuracy': max((r['accuracy'] for r in rows), default=None),
      'rounds': rows[-1]['round'] if rows else 0,
      'target_accuracy': target_accuracy,
      'rounds_to_target': hit['round'] if hit else None,
      'seconds_to_target': hit['sim_seconds'] if hit else None,
      'bytes_to_target': hit['bytes_total'] if hit else None,
      'sim_seconds': rows[-1]['sim_seconds'] if rows else 0.0,
      'bytes_total': rows[-1]['bytes_total'] if rows else 0,
      'bytes_breakdown': {k: rows[-1][f'bytes_{k}'] if rows else 0 for k in KINDS},
      'wall_seconds': run_seconds,
      'compile_seconds': compile_seconds,
      'node_steps_per_second': node_steps / run_seconds if run_seconds > 0 else None,
  }
  if rows and 'node_accuracy_mean' in rows[-1]:
    node_hit = first_hit('node_accuracy_mean')
    summary.update(final_node_accuracy=rows[-1]['node_accuracy_mean'],
                   rounds_to_target_nodes=node_hit['round'] if node_hit else None,
                   seconds_to_target_nodes=node_hit['sim_seconds'] if node_hit else None,
                   bytes_to_target_nodes=node_hit['bytes_total'] if node_hit else None)
  return summary
