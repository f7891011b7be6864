"""The run loop: rounds under one jit-compiled ``lax.scan`` per evaluation chunk.

As in purejaxrl, the only Python loop is between chunks of ``eval_every``
rounds, where the loop evaluates, logs and writes results. Every row of
``metrics.jsonl`` is flushed as soon as it exists, so an interrupted or
diverged run keeps everything it had computed. The loop is the same for every
protocol family (learning on the simulated network, SAPO's swarm RL): a
``decsim.report.Report`` says what a family's rows and summary hold.
"""

import contextlib
import dataclasses
import json
import pathlib
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import tqdm
from jax.sharding import Mesh

from decsim import interrupts, rundir, sharding
from decsim.checkpoint import CheckpointError, Checkpointer
from decsim.errors import RunInterrupted, SimulationDiverged
from decsim.data.sampler import NodeData
from decsim.protocols.base import Protocol
from decsim.report import Report, chunk_rows, replica_summary
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
        eval_every: int, report: Report, out_dir: str | pathlib.Path | None = None,
        checkpoint_every: int = 0, resume: bool = False, log: Callable[[str], None] = print,
        mesh: Mesh | None = None, run_dir: RunDirectory | None = None,
        files: dict[str, Any] | None = None, tensorboard: bool = False) -> dict[str, Any]:
  """Runs ``rounds`` rounds, evaluating every ``eval_every``; returns the summary.

  Writes ``metrics.jsonl`` (the rows of ``report``, e.g. ``decsim.report.network_report``:
  one per evaluation), ``summary.json`` and the JSON
  ``files`` (e.g. ``config.json``) into ``out_dir`` (or the locked ``run_dir``)
  when given, and an orbax checkpoint every ``checkpoint_every`` rounds into
  ``OUT/checkpoints``; see ``decsim.rundir`` for how an earlier run in the
  directory is never lost. With ``resume`` the run continues from the newest
  readable checkpoint and keeps the rows written up to it. ``summary['status']``
  is ``completed``, ``diverged``, ``interrupted`` (SIGINT/SIGTERM; raises
  ``RunInterrupted`` after the summary) or ``failed`` (with ``error``). With
  ``mesh`` the node axis is split over its devices (``decsim.sharding``); a batch
  of keys (one per replica) runs the replicas as one vmapped simulation. With
  ``tensorboard`` the rows also go to event files in ``OUT/tensorboard``.
  """
  if checkpoint_every % eval_every:
    raise ValueError(f'checkpoint_every={checkpoint_every} must be a multiple of '
                     f'eval_every={eval_every}')
  if (checkpoint_every or resume) and out_dir is None and run_dir is None:
    raise ValueError('checkpoints need an output directory')
  own_dir = run_dir is None and out_dir is not None
  if own_dir:
    run_dir = RunDirectory(out_dir, resume)
  try:
    with interrupts.deferred():
      writer = RunWriter(run_dir, files or {}, checkpoint_every, tensorboard)
      return _run(protocol, data, evaluate, key, rounds, eval_every, report, writer, resume,
                  log, mesh)
  finally:
    if own_dir:
      run_dir.discard()
      run_dir.release()


def _run(protocol, data, evaluate, key, rounds, eval_every, report, writer, resume, log,
         mesh) -> dict[str, Any]:
  replicated = key.ndim == 1  # a key per replica: R seeds vmapped as one simulation
  if replicated and mesh is not None:
    raise ValueError('replicas and a device mesh cannot be combined')
  progress = _Progress(rows=[])
  try:
    stop_if_requested('before the first round')
    state, data = _initial_state(protocol, key, data, mesh, replicated)
    if resume:
      state = writer.restore(state, progress, mesh, log)
    log(f'compiling a chunk of {eval_every} rounds and the evaluation ...')
    t0 = time.perf_counter()
    chunks = {}  # length -> compiled chunk: eval_every, and a shorter last one if needed
    evaluate = jax.jit(jax.vmap(evaluate) if replicated else evaluate)
    evaluate.lower(state).compile()
    progress.compile_seconds = time.perf_counter() - t0
    done = int(np.max(state.round))
    with _bar(rounds, done, log) as (bar, say):
      if report.round_zero and not progress.rows:
        initial = _round_zero(evaluate, state, report, progress, writer)
        say(f'round {0:>6}/{rounds}  {report.line(initial)}')
      for length in chunk_lengths(done, rounds, eval_every):
        if length not in chunks:
          t0 = time.perf_counter()
          chunks[length] = compile_chunk(protocol, state, data, length, mesh, replicated)
          progress.compile_seconds += time.perf_counter() - t0
          stop_if_requested('while compiling')
        state, rows = _one_chunk(chunks[length], evaluate, state, data, report, progress, writer)
        bar.update(length)
        say(_progress_line(report.line(rows), rows[-1]['round'], rounds, progress.run_seconds))
        stop_if_requested(f'at round {progress.rows[-1]["round"]}')
  except BaseException as e:
    progress.status, progress.error = ending(e)
    writer.finish(_summary(progress, report, mesh))
    if writer.kept_earlier_run:
      e.kept_earlier_run = writer.kept_earlier_run  # launchers say it is unchanged
    raise
  summary = _summary(progress, report, mesh)
  writer.finish(summary)
  return summary


def chunk_lengths(done: int, rounds: int, eval_every: int) -> list[int]:
  """Rounds of each chunk from round ``done`` to ``rounds``: rows at every multiple of
  ``eval_every`` and at the last round."""
  ends = [*range((done // eval_every + 1) * eval_every, rounds, eval_every), rounds]
  return [end - start for start, end in zip([done, *ends], ends) if end > start]


def _initial_state(protocol, key, data, mesh, replicated):
  if mesh is None:
    init = jax.vmap(protocol.init, in_axes=(0, None)) if replicated else protocol.init
    return jax.jit(init)(key, data), data
  data = sharding.shard_data(data, mesh)
  return sharding.sharded_init(protocol.init, key, data, mesh), data


def _one_chunk(chunk, evaluate, state, data, report: Report, progress: _Progress, writer):
  """Runs one chunk, appends its rows (and checkpoint); raises if the run must stop."""
  t = time.perf_counter()
  state, metrics = chunk(state, data)
  jax.block_until_ready(state)
  progress.run_seconds += time.perf_counter() - t
  fields = jax.tree.map(np.asarray, report.fields(state, metrics, evaluate(state)))
  progress.node_steps += int(np.sum(fields['node_steps']))
  rows = chunk_rows(report, fields, replicated=np.ndim(fields['round']) > 0)
  progress.rows += rows
  problem = report.problem(rows, progress.node_steps, fields)
  for row in rows:
    writer.append(row, finite=problem is None)
  if problem is not None:
    raise problem
  writer.checkpoint(rows[-1]['round'], state, progress)
  return state, rows


def _round_zero(evaluate, state, report: Report, progress: _Progress, writer) -> list:
  """The rows of the initial models, before any round; they do not promote the run's
  files (a run proves itself with its first trained evaluation)."""
  fields = jax.tree.map(np.asarray, report.fields(state, None, evaluate(state)))
  rows = chunk_rows(report, fields, replicated=np.ndim(fields['round']) > 0)
  progress.rows += rows
  for row in rows:
    writer.append(row, finite=False)
  return rows


@contextlib.contextmanager
def _bar(rounds: int, done: int, log: Callable[[str], None]):
  """``(bar, say)``: a tqdm bar over rounds on a terminal's stderr (disabled in logs and
  pipes), and ``say`` that logs a line above the bar rather than through it."""
  with tqdm.tqdm(total=rounds, initial=done, unit='round', leave=False, dynamic_ncols=True,
                 disable=not sys.stderr.isatty()) as bar:
    yield bar, (log if bar.disable or log is not print else bar.write)


def _progress_line(text: str, round_: int, rounds: int, run_seconds: float) -> str:
  """``text`` (the family's part) between the round and the speed of the run."""
  rate = round_ / max(run_seconds, 1e-9)
  eta = (rounds - round_) / max(rate, 1e-9)
  return f'round {round_:>6}/{rounds}  {text}  {rate:7.1f} rounds/s  eta {eta:6.1f}s'


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


def _summary(progress: _Progress, report: Report, mesh) -> dict[str, Any]:
  """The family's summary of the rows, then how the run went and what it cost."""
  run_seconds, rounds = progress.run_seconds, progress.rows[-1]['round'] if progress.rows else 0
  replicated = bool(progress.rows) and 'replicas' in progress.rows[0]
  summary = (replica_summary(report.summarize, progress.rows) if replicated
             else report.summarize(progress.rows))
  summary.update(
      wall_seconds=run_seconds, compile_seconds=progress.compile_seconds,
      rounds_per_second=rounds / run_seconds if run_seconds > 0 else None,
      node_steps_per_second=progress.node_steps / run_seconds if run_seconds > 0 else None,
      status=progress.status, devices=1 if mesh is None else mesh.size)
  if progress.error:
    summary['error'] = progress.error
  summary['peak_memory_bytes'], summary['peak_memory_source'] = peak_memory()
  return summary


class RunWriter:
  """The run's files in its ``RunDirectory`` (nothing when there is none)."""

  def __init__(self, run_dir: RunDirectory | None, files: dict[str, Any], checkpoint_every: int,
               tensorboard: bool = False):
    self.run_dir, self.files, self.every = run_dir, files, checkpoint_every
    self.tensorboard = tensorboard
    self.events = None  # decsim.tensorboard.Events, opened with the files
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
    if self.events is not None:
      self.events.write(row)
    if finite:
      self.run_dir.promote()

  def _open_files(self) -> None:
    for name, value in self.files.items():
      self.run_dir.write_json(name, value)
    rundir.atomic_write(self.run_dir.work / 'metrics.jsonl',
                        ''.join(json.dumps(r) + '\n' for r in self.kept_rows))
    self.metrics = open(self.run_dir.work / 'metrics.jsonl', 'a')
    if self.tensorboard and self.events is None:
      from decsim import tensorboard
      self.events = tensorboard.Events(self.run_dir.work / 'tensorboard')

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
    if self.events is not None:
      self.events.close()
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
