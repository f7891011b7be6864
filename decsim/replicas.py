"""Independent replicas: ``--replicas=R`` run one after another, then merged.

Replica i is the run of seed + i for every part that ``--replica_fix`` does not
hold fixed (``decsim.rng.Seeds``): with nothing fixed it is exactly the single run
of ``--seed=seed+i``, data partition, graph and network included. Each replica is
a complete run directory, ``OUT/replicas/<i>/`` (config.json with its seeds,
metrics.jsonl, summary.json, checkpoints); ``--resume`` skips the replicas that
completed and continues the others. When all have run, ``OUT/metrics.jsonl``
holds the merged rows (``decsim.report.merge_replicas``) and ``OUT/summary.json``
every number's mean, sample std, 95% t-interval and values over replicas. The
replicas that share data, graph and network run instead as one vmapped
simulation (``decsim.simulate``), which is faster.
"""

import json
from collections.abc import Callable
from typing import Any

from decsim import rundir, simulate
from decsim.report import combine, merge_replicas

RunOne = Callable[[int, rundir.SubDirectory | None], dict[str, Any]]  # (replica, dir) -> summary


def run_apart(replicas: int, run_dir: rundir.RunDirectory | None, rounds: int,
              run_one: RunOne, log: Callable[[str], None]) -> dict[str, Any]:
  """Runs ``run_one(i, OUT/replicas/i)`` for each replica not yet completed, then writes
  the merged rows and summary into ``run_dir``; returns the merged summary."""
  summaries, rows = [], []
  for i in range(replicas):
    sub = None if run_dir is None else rundir.SubDirectory(run_dir, f'replicas/{i}')
    done = _completed(sub, rounds)
    if done is None:
      log(f'replica {i + 1}/{replicas}')
      try:
        done = run_one(i, sub), _rows(sub)
      except BaseException as e:
        _write_failed(run_dir, i, e)
        raise
    summaries.append(done[0])
    rows.append(done[1])
  summary = combine(summaries)
  if run_dir is not None:
    merged = [merge_replicas(list(same)) for same in zip(*rows)]
    rundir.atomic_write(run_dir.work / 'metrics.jsonl',
                        ''.join(json.dumps(r) + '\n' for r in merged))
    run_dir.write_json('summary.json', summary)
  return summary


def _rows(sub: rundir.SubDirectory | None) -> list[dict[str, Any]]:
  return [] if sub is None else simulate.read_rows(sub.work / 'metrics.jsonl')


def _completed(sub: rundir.SubDirectory | None, rounds: int):
  """``(summary, rows)`` of a replica that a resumed run completed before, else None."""
  if sub is None or not sub.resume or not (sub.work / 'summary.json').exists():
    return None
  summary = json.loads((sub.work / 'summary.json').read_text())
  if summary.get('status') != 'completed' or summary.get('rounds', 0) < rounds:
    return None
  return summary, _rows(sub)


def _write_failed(run_dir: rundir.RunDirectory | None, replica: int, e: BaseException) -> None:
  """OUT/summary.json of a run stopped in ``replica`` (when its files are OUT's)."""
  if run_dir is not None and run_dir.promoted:
    status, error = simulate.ending(e)
    run_dir.write_json('summary.json', {'status': status, 'error': error,
                                        'replicas_completed': replica})
