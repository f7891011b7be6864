"""One SAPO run from one flat configuration: base models, rounds, output files.

``SapoRunConfig`` mirrors the flags of ``launch/sapo.py`` one to one (as
``decsim.experiment.ExperimentConfig`` does for ``launch/simulate.py``), so a
run's ``config.json`` is its complete description. Rounds run in jit-compiled
``lax.scan`` chunks of ``log_every``; ``metrics.jsonl`` gets one row per round.
"""

import dataclasses
import math
import time
from typing import Any

import jax
import numpy as np

from decsim import interrupts, rundir, simulate
from decsim.errors import ConfigError, SimulationDiverged
from decsim.rl import base as base_lib
from decsim.rl import grpo as grpo_lib
from decsim.rl import policy as policy_lib
from decsim.rl import sapo as sapo_lib
from decsim.rl import tasks


@dataclasses.dataclass(frozen=True)
class SapoRunConfig:
  """One run; the defaults are the study's setting (BUILD_NOTES.md, SAPO).

  As in the paper's controlled runs every node starts from the same base model
  (``base_init='shared'``, one warm-up length), on task kinds whose multi-digit
  answers rarely earn partial credit (``rev,add``), so that most own groups are
  all-fail at the start and the base pass rate sits just below where a lone
  node's GRPO takes off. ``--base_init=independent --task_mix=add,chain,bits,rev,mod
  --warmup_min=60 --warmup_max=180`` is the earlier setting.
  """

  nodes: int = 8
  local_groups: int = 4
  external_groups: int = 4
  generations: int = 8
  rounds: int = 200
  filter: str = 'nonzero_advantage'
  task_mix: str = 'rev,add'
  seed: int = 0
  completion_len: int = 6
  temperature: float = 1.0
  lr: float = 1e-3
  iterations: int = 1
  kl_coef: float = 0.0
  churn: float = 0.0
  staleness: int = 0
  dim: int = 48
  layers: int = 2
  warmup_min: int = 50
  warmup_max: int = 50
  warmup_kinds: int = 0
  base_init: str = 'shared'
  task_source: str = 'procedural'
  pool_size: int = 2000
  log_every: int = 50
  node_chunk: int = 0


TASK_SOURCES = ('procedural', 'reasoning_gym')


def _source_shape(name: str) -> tuple[tuple[str, ...], int]:
  """Task names and longest answer of a task source, without building it."""
  if name == 'procedural':
    return tasks.TASKS, tasks.ANSWER_LEN
  import importlib.util
  from decsim.rl import reasoning_gym
  if importlib.util.find_spec('reasoning_gym') is None:
    raise ConfigError("--task_source=reasoning_gym needs the optional extra: "
                      "pip install -e '.[rl]'")
  return reasoning_gym.NAMES, reasoning_gym.ANSWER_LEN


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def validate(c: SapoRunConfig) -> tuple[float, ...]:
  """Raises ConfigError (one line naming the flag and the fix); returns the task mix."""
  _check(c.nodes >= 2, f'--nodes={c.nodes}: SAPO needs at least 2 nodes to share with')
  _check(c.local_groups >= 1, f'--local_groups={c.local_groups}: each node needs >= 1 own group')
  _check(c.external_groups >= 0, f'--external_groups={c.external_groups} must be >= 0')
  _check(c.external_groups <= (c.nodes - 1) * c.local_groups,
         f'--external_groups={c.external_groups} exceeds the {(c.nodes - 1) * c.local_groups} groups '
         'other nodes share (nodes-1)*local_groups: lower it or raise --nodes')
  _check(c.generations >= 2, f'--generations={c.generations}: a group needs >= 2 completions '
         'for a group-standardised advantage')
  _check(c.rounds >= 1, f'--rounds={c.rounds} must be >= 1')
  _check(c.log_every >= 1 and c.rounds % c.log_every == 0,
         f'--rounds={c.rounds} is not a multiple of --log_every={c.log_every}: change one of them')
  _check(c.filter in sapo_lib.FILTERS,
         f'--filter={c.filter!r} is unknown: choose one of {", ".join(sapo_lib.FILTERS)}')
  _check(c.task_source in TASK_SOURCES,
         f'--task_source={c.task_source!r} is unknown: choose one of {", ".join(TASK_SOURCES)}')
  names, answer_len = _source_shape(c.task_source)
  _check(c.pool_size >= 1, f'--pool_size={c.pool_size}: items per ReasoningGYM task, >= 1')
  _check(answer_len + 1 <= c.completion_len <= 16,
         f'--completion_len={c.completion_len}: use {answer_len + 1}..16 (answer + EOS)')
  _check(c.temperature >= 0, f'--temperature={c.temperature} must be >= 0')
  _check(c.lr > 0, f'--lr={c.lr} must be > 0')
  _check(c.iterations >= 1, f'--iterations={c.iterations} must be >= 1')
  _check(c.kl_coef >= 0, f'--kl_coef={c.kl_coef} must be >= 0')
  _check(0 <= c.churn < 1, f'--churn={c.churn}: an offline probability in [0, 1)')
  _check(c.staleness >= 0, f'--staleness={c.staleness} must be >= 0 rounds')
  _check(c.dim >= 8 and c.dim % 4 == 0, f'--dim={c.dim}: a multiple of 4 heads, >= 8')
  _check(c.layers >= 1, f'--layers={c.layers} must be >= 1')
  _check(0 <= c.warmup_min <= c.warmup_max,
         f'--warmup_min={c.warmup_min} / --warmup_max={c.warmup_max}: need 0 <= min <= max')
  _check(0 <= c.warmup_kinds <= len(names),
         f'--warmup_kinds={c.warmup_kinds}: use 0 (all kinds) to {len(names)}')
  _check(c.base_init in base_lib.BASE_INITS,
         f'--base_init={c.base_init!r} is unknown: choose one of {", ".join(base_lib.BASE_INITS)}')
  try:
    return tasks.parse_task_mix(c.task_mix, names)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def build(c: SapoRunConfig):
  """``(policy, sapo, warmup config)`` of a validated configuration."""
  mix = validate(c)
  source = tasks.PROCEDURAL
  if c.task_source == 'reasoning_gym':
    from decsim.rl import reasoning_gym
    source = reasoning_gym.make_source(reasoning_gym.build_pool(size=c.pool_size, seed=c.seed))
  policy = policy_lib.make_policy(policy_lib.PolicyConfig(
      vocab=source.vocab_size, max_len=source.prompt_len + c.completion_len, dim=c.dim,
      layers=c.layers, mlp=2 * c.dim))
  config = sapo_lib.SapoConfig(
      nodes=c.nodes, local_groups=c.local_groups, external_groups=c.external_groups,
      generations=c.generations, completion_len=c.completion_len, temperature=c.temperature,
      filter=c.filter, task_mix=mix, source=source, churn=c.churn, staleness=c.staleness,
      grpo=grpo_lib.GRPOConfig(lr=c.lr, iterations=c.iterations, kl_coef=c.kl_coef),
      node_chunk=c.node_chunk)
  warmup = base_lib.WarmupConfig(steps_min=c.warmup_min, steps_max=c.warmup_max,
                                 kinds_per_node=c.warmup_kinds, init=c.base_init)
  return policy, sapo_lib.sapo(policy, config), warmup, mix, source


def run(c: SapoRunConfig, out_dir=None, log=print, cache_dir=None) -> dict[str, Any]:
  """Runs SAPO; writes ``metrics.jsonl`` (a row per round), ``summary.json``, ``config.json``.

  ``out_dir`` is locked and staged like a ``decsim`` run (``decsim.rundir``): an
  earlier run there is replaced only once this one has a finite chunk of rows.
  """
  policy, sapo, warmup, mix, source = build(c)
  run_dir = rundir.RunDirectory(out_dir, resume=False) if out_dir is not None else None
  writer = simulate.RunWriter(run_dir, {'config.json': dataclasses.asdict(c)}, 0)
  progress = {'rows': [], 'run_seconds': 0.0, 'status': 'completed', 'error': None}
  timings, state = {'warmup_seconds': 0.0, 'compile_seconds': 0.0}, None
  try:
    with interrupts.deferred():
      state = _prepare(c, policy, sapo, warmup, mix, source, cache_dir, log, timings)
      for _ in range(c.rounds // c.log_every):
        state = _sapo_chunk(c, _compiled_chunk(c, sapo, state), state, progress, writer, log)
  except BaseException as e:
    progress['status'], progress['error'] = simulate.ending(e)
    raise
  finally:
    summary = _sapo_summary(c, progress, state, timings)
    writer.finish(summary)
    if run_dir is not None:
      run_dir.discard()
      run_dir.release()
  return summary


def _prepare(c, policy, sapo, warmup, mix, source, cache_dir, log, timings):
  """The base models (warm-up) and the compiled chunk; returns the initial state."""
  t0 = time.perf_counter()
  params = base_lib.base_models(c.seed, c.nodes, policy, c.completion_len, warmup, mix,
                                cache_dir=cache_dir, source=source, log=log)
  jax.block_until_ready(params)
  timings['warmup_seconds'] = time.perf_counter() - t0
  simulate.stop_if_requested('during the warm-up')
  t0 = time.perf_counter()
  state = sapo.init(jax.random.key(c.seed), params)
  _compiled_chunk(c, sapo, state)
  timings['compile_seconds'] = time.perf_counter() - t0
  simulate.stop_if_requested('while compiling')
  return state


def _sapo_chunk(c, chunk, state, progress, writer, log):
  t = time.perf_counter()
  state, m = chunk(state)
  m = jax.device_get(m)
  progress['run_seconds'] += time.perf_counter() - t
  rows = progress['rows']
  new = [_row(len(rows) + 1 + k, m, k) for k in range(c.log_every)]
  rows += new
  finite = all(math.isfinite(r['loss']) for r in new)
  for r in new:
    writer.append(r, finite)
  recent = np.mean([r['reward'] for r in new])
  log(f'round {rows[-1]["round"]:>6}/{c.rounds}  reward {recent:.4f} (last {c.log_every})  '
      f'loss {rows[-1]["loss"]:.4f}  {len(rows) / max(progress["run_seconds"], 1e-9):6.1f} rounds/s')
  if not finite:
    raise SimulationDiverged(f'GRPO diverged by round {rows[-1]["round"]}: the loss is not '
                             'finite; lower --lr')
  simulate.stop_if_requested(f'at round {rows[-1]["round"]}')
  return state


def _sapo_summary(c, progress, state, timings) -> dict[str, Any]:
  rows, run_seconds = progress['rows'], progress['run_seconds']
  shared = int(np.asarray(state.bytes_shared).sum()) if rows and state is not None else 0
  summary = summarize(rows, shared, c)
  summary.update(status=progress['status'], **timings, wall_seconds=run_seconds,
                 rounds_per_second=len(rows) / run_seconds if run_seconds > 0 else None)
  if progress['error']:
    summary['error'] = progress['error']
  return summary


_COMPILED: dict = {}


def _compiled_chunk(c: SapoRunConfig, sapo, state):
  """One AOT-compiled chunk of ``log_every`` rounds per configuration; seeds share it."""
  key = dataclasses.replace(c, seed=0)
  if key not in _COMPILED:
    scan = lambda s: jax.lax.scan(lambda s, _: sapo.round(s), s, None, length=c.log_every)
    _COMPILED[key] = jax.jit(scan, donate_argnums=0).lower(state).compile()
  return _COMPILED[key]


def _row(round_: int, m: sapo_lib.SapoMetrics, k: int) -> dict[str, Any]:
  nr = m.node_reward[k]
  return {'round': round_, 'reward': float(m.reward[k]), 'exact': float(m.exact[k]),
          'node_reward_min': float(nr.min()), 'node_reward_max': float(nr.max()),
          'loss': float(m.loss[k]), 'external_groups': float(m.external_groups[k]),
          'signal_fraction': float(m.signal_fraction[k]), 'bytes_shared': int(m.bytes_shared[k]),
          'active_nodes': int(m.active_nodes[k])}


def moving_average(x, window: int) -> np.ndarray:
  x = np.asarray(x, np.float64)
  c = np.cumsum(np.insert(x, 0, 0.0))
  w = np.minimum(np.arange(1, len(x) + 1), window)
  return (c[1:] - c[np.arange(1, len(x) + 1) - w]) / w


def summarize(rows: list[dict[str, Any]], bytes_total: int, c: SapoRunConfig) -> dict[str, Any]:
  """``cumulative_reward`` = the sum over rounds of the swarm-mean reward (the paper's measure)."""
  rewards = np.asarray([r['reward'] for r in rows], np.float64)
  tenth = max(len(rewards) // 10, 1)
  return {
      'cumulative_reward': float(rewards.sum()),
      'mean_reward': float(rewards.mean()) if len(rewards) else None,
      'initial_reward': float(rewards[:tenth].mean()) if len(rewards) else None,
      'final_reward': float(rewards[-tenth:].mean()) if len(rewards) else None,
      'best_moving_average': float(moving_average(rewards, 20).max()) if len(rewards) else None,
      'final_exact': float(np.mean([r['exact'] for r in rows[-tenth:]])) if rows else None,
      'rounds': len(rows),
      'nodes': c.nodes,
      'config': f'{c.local_groups}/{c.external_groups}',
      'bytes_shared_total': bytes_total,
      'bytes_shared_per_node_round': bytes_total / (c.nodes * len(rows)) if rows else 0.0,
  }
