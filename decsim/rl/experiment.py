"""One SAPO run from one flat configuration: base models, rounds, output files.

``SapoRunConfig`` is a ``decsim.config.Component``: each field is declared once,
the flags of ``launch/sapo.py`` are generated from it, and a run's
``config.json`` is its complete description. A run goes through the same loop
as every ``decsim`` run (``decsim.simulate.run``: jit-compiled ``lax.scan``
chunks of ``log_every`` rounds, staged output, checkpoints, ``--resume``,
interrupts); ``sapo_report`` makes its rows, one per round, and its summary.
"""

import dataclasses
import functools
import time
from typing import Any, NamedTuple

import jax
import numpy as np

from decsim import interrupts, rundir, simulate
from decsim import report as report_lib
from decsim.config import Component, check, option
from decsim.errors import ConfigError, SimulationDiverged
from decsim.protocols.base import Protocol
from decsim.rng import MAX_SEED
from decsim.rl import base as base_lib
from decsim.rl import grpo as grpo_lib
from decsim.rl import policy as policy_lib
from decsim.rl import qwen2
from decsim.rl import sapo as sapo_lib
from decsim.rl import tasks


TASK_SOURCES = ('procedural', 'reasoning_gym')
POLICIES = ('small', 'qwen2')


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


@dataclasses.dataclass(frozen=True)
class SapoRunConfig(Component):
  """SAPO run: swarm, GRPO, tasks, base models, rounds and checkpoints.

  The defaults are the study's setting (BUILD_NOTES.md, SAPO). As in the paper's
  controlled runs every node starts from the same base model
  (``base_init='shared'``, one warm-up length), on task kinds whose multi-digit
  answers rarely earn partial credit (``rev,add``), so that most own groups are
  all-fail at the start and the base pass rate sits just below where a lone
  node's GRPO takes off. ``--base_init=independent --task_mix=add,chain,bits,rev,mod
  --warmup_min=60 --warmup_max=180`` is the earlier setting.
  """

  nodes: int = option(8, 'Number of nodes N (policies); SAPO needs 2 to share.', low=2,
                      high=1_000_000)
  local_groups: int = option(4, 'I: own questions per node per round.', low=1)
  external_groups: int = option(4, 'J: groups drawn from other nodes.', low=0)
  generations: int = option(8, 'G: completions per question (>= 2 for a group-standardised '
                            'advantage).', low=2)
  rounds: int = option(200, 'Rounds (a shorter last chunk ends at --rounds).', low=1,
                      high=2 ** 31 - 1)
  filter: str = option('nonzero_advantage', 'How external groups are drawn.',
                       choices=sapo_lib.FILTERS)
  task_mix: str = option('rev,add', 'Task kinds and weights, e.g. add,chain or add:2,bits:1; '
                         'procedural kinds: add, chain, bits, rev, mod.')
  seed: int = option(0, 'Seed of base models, questions, rollouts and draws.', low=0,
                     high=MAX_SEED)
  completion_len: int = option(6, 'T: tokens per completion (answer + EOS), at most 16.',
                               low=2, high=16)
  temperature: float = option(1.0, 'Sampling temperature (0: greedy).', low=0)
  lr: float = option(1e-3, 'Adam learning rate of GRPO.', low=0, low_open=True)
  iterations: int = option(1, 'GRPO steps per round on the same batch.', low=1)
  kl_coef: float = option(0.0, 'Reference-KL coefficient (0: none, as in SAPO).', low=0)
  churn: float = option(0.0, 'Probability a node is offline in a round (no share, no train).',
                        low=0, high=1, high_open=True)
  staleness: int = option(0, 'd: external groups come from round r - d.', low=0)
  policy: str = option('small', 'small (a character transformer warmed up here, --dim, '
                       '--layers, --warmup_*) or qwen2 (a pretrained Qwen2-family model read '
                       'from --policy_path; every node starts from it).', choices=POLICIES)
  policy_path: str | None = option(None, 'qwen2: a Hugging Face checkpoint directory downloaded once '
                            '(config.json, *.safetensors, tokenizer.json; nothing is fetched); '
                            "needs pip install -e '.[lm]'.")
  policy_groups: str | None = option(
      None, 'A heterogeneous swarm: groups COUNT:small (--dim x --layers), COUNT:small:DIMxLAYERS '
      'or COUNT:qwen2 (--policy_path), comma-separated, adding up to --nodes, e.g. '
      '4:small:48x2,4:small:96x2; they share rollouts as text (unset: --policy on every node).')
  lm_precision: str = option('float32', 'qwen2: float32, bfloat16 (parameters and compute) or '
                             'bfloat16_master (float32 master parameters, bfloat16 compute).',
                             choices=qwen2.PRECISIONS)
  top_p: float = option(1.0, 'qwen2: nucleus sampling mass (1: off).', low=0, high=1,
                        low_open=True)
  dim: int = option(48, 'Policy width (4 heads; a multiple of 4).', low=8)
  layers: int = option(2, 'Policy transformer layers.', low=1)
  warmup_min: int = option(50, 'Base models: fewest supervised warm-up steps.', low=0)
  warmup_max: int = option(50, 'Base models: most supervised warm-up steps.', low=0)
  warmup_kinds: int = option(0, 'Base models: task kinds each node is shown in warm-up '
                             '(0: all).', low=0)
  base_init: str = option('shared', 'Base models: shared (one init and demonstration stream; '
                          'node n stops at its own warm-up step, so equal steps give identical '
                          'nodes) or independent (own init and demonstrations per node).',
                          choices=base_lib.BASE_INITS)
  task_source: str = option('procedural', 'procedural (kinds generated in JAX) or reasoning_gym '
                            '(a pool pre-generated offline by the reasoning-gym package, scored '
                            "by its own score_answer; needs pip install -e '.[rl]'; --task_mix "
                            'then names basic_arithmetic, chain_sum, count_bits, gcd, '
                            'base_conversion).', choices=TASK_SOURCES)
  pool_size: int = option(2000, 'reasoning_gym: items generated per task.', low=1)
  log_every: int = option(50, 'Rounds per jit-compiled chunk between log lines.', low=1)
  node_chunk: int = option(0, 'Nodes per vectorised chunk (0: one vmap).', low=0)
  checkpoint_every: int = option(0, 'Save an orbax checkpoint every this many rounds into '
                                 'OUT/checkpoints (0: off; a multiple of --log_every).', low=0)
  resume: bool = option(False, 'Continue the run in --out from its newest readable checkpoint.')

  def check(self):
    check(self.external_groups <= (self.nodes - 1) * self.local_groups,
          f'--external_groups={self.external_groups} exceeds the '
          f'{(self.nodes - 1) * self.local_groups} groups other nodes share '
          '(nodes-1)*local_groups: lower it or raise --nodes')
    check(self.checkpoint_every % self.log_every == 0,
          f'--checkpoint_every={self.checkpoint_every} must be 0 (off) or a multiple of '
          f'--log_every={self.log_every}')
    check(self.dim % 4 == 0, f'--dim={self.dim}: a multiple of 4 heads')
    check(self.warmup_min <= self.warmup_max, f'--warmup_min={self.warmup_min} / '
          f'--warmup_max={self.warmup_max}: need min <= max')
    names, answer_len = _source_shape(self.task_source)
    check(answer_len + 1 <= self.completion_len,
          f'--completion_len={self.completion_len}: use {answer_len + 1}..16 (answer + EOS)')
    check(self.warmup_kinds <= len(names),
          f'--warmup_kinds={self.warmup_kinds}: use 0 (all kinds) to {len(names)}')
    task_mix(self)
    kinds = {g.kind for g in policy_groups(self)} if self.policy_groups else {self.policy}
    if 'qwen2' in kinds:
      which = '--policy_groups with qwen2' if self.policy_groups else '--policy=qwen2'
      check(self.policy_path is not None, f'{which} needs --policy_path=DIR, a Hugging Face '
            'Qwen2 checkpoint directory (config.json, *.safetensors, tokenizer.json)')
      from decsim.rl import hf_checkpoint
      hf_checkpoint.check_directory(self.policy_path)


class GroupSpec(NamedTuple):
  """One group of ``--policy_groups``."""

  nodes: int
  kind: str  # a POLICIES name
  dim: int
  layers: int


def policy_groups(c: SapoRunConfig) -> tuple[GroupSpec, ...]:
  """The groups of ``--policy_groups`` (unset: one group of ``--policy``), checked."""
  if not c.policy_groups:
    return (GroupSpec(c.nodes, c.policy, c.dim, c.layers),)
  flag = f'--policy_groups={c.policy_groups}'
  check(c.policy == 'small', f'{flag} names each group\'s policy: leave --policy at small')
  groups = tuple(_group(c, part, flag) for part in c.policy_groups.split(','))
  total = sum(g.nodes for g in groups)
  check(total == c.nodes, f'{flag}: the groups have {total} nodes but --nodes={c.nodes}; '
        'make them add up')
  return groups


def _group(c: SapoRunConfig, part: str, flag: str) -> GroupSpec:
  fields = part.strip().split(':')
  usage = (f'{flag}: write COUNT:small, COUNT:small:DIMxLAYERS or COUNT:qwen2, comma-separated, '
           'e.g. 4:small:48x2,4:small:96x2')
  check(2 <= len(fields) <= 3 and fields[0].isdigit() and int(fields[0]) >= 1
        and fields[1] in POLICIES, usage)
  size = fields[2].split('x') if len(fields) == 3 else [str(c.dim), str(c.layers)]
  check(fields[1] == 'small' or len(fields) == 2, f'{flag}: a qwen2 group takes its size from '
        '--policy_path; write COUNT:qwen2')
  check(len(size) == 2 and all(x.isdigit() and int(x) >= 1 for x in size), usage)
  dim, layers = int(size[0]), int(size[1])
  check(dim % 4 == 0 and dim >= 8, f'{flag}: a small policy\'s DIM must be a multiple of 4 '
        f'heads and >= 8, not {dim}')
  return GroupSpec(int(fields[0]), fields[1], dim, layers)


def task_mix(c: SapoRunConfig) -> tuple[float, ...]:
  """The weights of ``--task_mix`` over the task source's kinds."""
  try:
    return tasks.parse_task_mix(c.task_mix, _source_shape(c.task_source)[0])
  except ValueError as e:
    raise ConfigError(str(e)) from None


def validate(c: SapoRunConfig) -> tuple[float, ...]:
  """Checks ``c`` again (it may have been made with ``object.__setattr__``); returns the mix."""
  SapoRunConfig.__post_init__(c)
  return task_mix(c)


def build(c: SapoRunConfig):
  """``(policy, sapo, warmup config, mix, source)`` of a validated configuration; with
  ``--policy_groups`` the policy is a tuple, one per group."""
  mix = validate(c)
  source = tasks.PROCEDURAL
  if c.task_source == 'reasoning_gym':
    from decsim.rl import reasoning_gym
    source = reasoning_gym.make_source(reasoning_gym.build_pool(size=c.pool_size, seed=c.seed))
  config = sapo_lib.SapoConfig(
      nodes=c.nodes, local_groups=c.local_groups, external_groups=c.external_groups,
      generations=c.generations, completion_len=c.completion_len, temperature=c.temperature,
      filter=c.filter, task_mix=mix, source=source, churn=c.churn, staleness=c.staleness,
      grpo=grpo_lib.GRPOConfig(lr=c.lr, iterations=c.iterations, kl_coef=c.kl_coef),
      node_chunk=c.node_chunk)
  warmup = base_lib.WarmupConfig(steps_min=c.warmup_min, steps_max=c.warmup_max,
                                 kinds_per_node=c.warmup_kinds, init=c.base_init)
  if c.policy_groups:
    from decsim.rl import hetero
    specs = policy_groups(c)
    policies = tuple(make_policy(c, source, spec) for spec in specs)
    groups = tuple(hetero.Group(p, spec.nodes) for p, spec in zip(policies, specs))
    return policies, hetero.hetero_sapo(groups, config), warmup, mix, source
  policy = make_policy(c, source)
  return policy, sapo_lib.sapo(policy, config), warmup, mix, source


def make_policy(c: SapoRunConfig, source: tasks.TaskSource, spec: GroupSpec | None = None):
  """The small policy, or the ``LMPolicy`` of the checkpoint in ``--policy_path``, of
  ``spec`` (a group of ``--policy_groups``; default: ``--policy``, ``--dim``, ``--layers``)."""
  spec = spec or policy_groups(c)[0]
  if spec.kind == 'qwen2':
    from decsim.rl import hf_checkpoint, lm_policy
    alphabet = tasks.CHARS
    if c.task_source == 'reasoning_gym':
      from decsim.rl import reasoning_gym
      alphabet = reasoning_gym.CHARS
    checkpoint = hf_checkpoint.load(c.policy_path, c.lm_precision)
    return lm_policy.make_lm_policy(checkpoint, alphabet, c.top_p)
  return policy_lib.make_policy(policy_lib.PolicyConfig(
      vocab=source.vocab_size, max_len=source.prompt_len + c.completion_len, dim=spec.dim,
      layers=spec.layers, mlp=2 * spec.dim))


def start_params(c: SapoRunConfig, policy, warmup, mix, source, cache_dir, log):
  """The N nodes' first parameters (leaves ``[N, ...]``): the checkpoint on every node, or the
  small policy's warmed-up base models; with ``--policy_groups`` a tuple, one per group (each
  group's base models are warmed up as a swarm of its size)."""
  if c.policy_groups:
    return tuple(_group_params(c, p, spec, warmup, mix, source, cache_dir, log)
                 for p, spec in zip(policy, policy_groups(c)))
  return _group_params(c, policy, policy_groups(c)[0], warmup, mix, source, cache_dir, log)


def _group_params(c: SapoRunConfig, policy, spec: GroupSpec, warmup, mix, source, cache_dir,
                  log):
  if spec.kind == 'qwen2':
    from decsim.rl import hf_checkpoint
    return hf_checkpoint.stack(policy.params, spec.nodes)
  return base_lib.base_models(c.seed, spec.nodes, policy, c.completion_len, warmup, mix,
                              cache_dir=cache_dir, source=source, log=log)


def run(c: SapoRunConfig, out_dir=None, log=print, cache_dir=None) -> dict[str, Any]:
  """Runs SAPO through ``decsim.simulate.run``; returns the summary.

  Writes ``config.json``, ``metrics.jsonl`` (a row per round) and ``summary.json``
  into ``out_dir``, locked and staged like a ``decsim`` run (``decsim.rundir``):
  an earlier run there is replaced only once this one has a finite chunk of rows.
  ``--checkpoint_every`` and ``--resume`` work as they do there.
  """
  validate(c)
  with interrupts.deferred(), rundir.opened(out_dir, dataclasses.asdict(c)) as run_dir:
    return _run_in(run_dir, c, log, cache_dir)


def _run_in(run_dir, c: SapoRunConfig, log, cache_dir) -> dict[str, Any]:
  policy, sapo, warmup, mix, source = build(c)
  t0 = time.perf_counter()
  params = start_params(c, policy, warmup, mix, source, cache_dir, log)  # leaves [N, ...]
  jax.block_until_ready(params)
  warmup_seconds = time.perf_counter() - t0
  simulate.stop_if_requested('during the warm-up')
  return simulate.run(as_protocol(sapo), params, lambda state: {}, key=jax.random.key(c.seed),
                      rounds=c.rounds, eval_every=c.log_every,
                      report=sapo_report(c, warmup_seconds), run_dir=run_dir,
                      checkpoint_every=c.checkpoint_every, resume=c.resume, log=log,
                      files={'config.json': dataclasses.asdict(c)})


def as_protocol(sapo: sapo_lib.Sapo) -> Protocol:
  """SAPO as a ``Protocol`` of the run loop: its data are the base models (leaves
  ``[N, ...]``), which only ``init`` reads; it delivers no one model to evaluate."""
  return Protocol(init=sapo.init, round=lambda state, base_params: sapo.round(state),
                  model=None)


def sapo_report(c: SapoRunConfig, warmup_seconds: float) -> report_lib.Report:
  """A row per round (reward, loss, external groups, bytes shared); the paper's summary."""
  return report_lib.Report(
      fields=functools.partial(_fields, c.iterations),
      rows=functools.partial(_rows, _group_sizes(c)), problem=_problem,
      summarize=lambda rows: {**summarize(rows, c), 'warmup_seconds': warmup_seconds},
      line=_line)


def _fields(iterations: int, state: sapo_lib.SapoState, metrics: sapo_lib.SapoMetrics,
            evals) -> dict[str, Any]:
  """The round count and the chunk's metrics (leaves ``[rounds, ...]``); node-steps =
  GRPO steps of the online nodes."""
  return {'round': state.round, 'node_steps': metrics.active_nodes.sum(-1) * iterations,
          'metrics': metrics}


def _group_sizes(c: SapoRunConfig) -> tuple[int, ...]:
  """Nodes per group of a heterogeneous swarm; () for one policy."""
  groups = policy_groups(c)
  return tuple(g.nodes for g in groups) if len(groups) > 1 else ()


def _rows(group_sizes: tuple[int, ...], fields: dict[str, Any]) -> list[dict[str, Any]]:
  """A row per round; with several policy groups also each group's mean reward."""
  m = fields['metrics']
  count = len(m.reward)
  first = int(fields['round']) - count + 1
  rows = [_row(first + k, m, k) for k in range(count)]
  if group_sizes:
    ends = np.cumsum(group_sizes)[:-1]
    for k, row in enumerate(rows):  # node_reward [N] split at the groups' ends
      row['group_reward'] = [float(p.mean()) for p in np.split(np.asarray(m.node_reward[k]), ends)]
  return rows


def _row(round_: int, m: sapo_lib.SapoMetrics, k: int) -> dict[str, Any]:
  nr = m.node_reward[k]  # [N]
  return {'round': round_, 'reward': float(m.reward[k]), 'exact': float(m.exact[k]),
          'node_reward_min': float(nr.min()), 'node_reward_max': float(nr.max()),
          'loss': float(m.loss[k]), 'external_groups': float(m.external_groups[k]),
          'signal_fraction': float(m.signal_fraction[k]),
          'bytes_shared': int(m.bytes_shared[k]), 'active_nodes': int(m.active_nodes[k])}


def _problem(rows: list[dict[str, Any]], node_steps: int, fields) -> Exception | None:
  if any(r['loss'] is None for r in rows):
    return SimulationDiverged(f'GRPO diverged by round {rows[-1]["round"]}: the loss is not '
                              'finite; lower --lr')
  return None


def _line(rows: list[dict[str, Any]]) -> str:
  recent = np.mean([r['reward'] for r in rows])
  return f'reward {recent:.4f} (last {len(rows)})  loss {rows[-1]["loss"]:.4f}'


def moving_average(x, window: int) -> np.ndarray:
  x = np.asarray(x, np.float64)
  c = np.cumsum(np.insert(x, 0, 0.0))
  w = np.minimum(np.arange(1, len(x) + 1), window)
  return (c[1:] - c[np.arange(1, len(x) + 1) - w]) / w


def summarize(rows: list[dict[str, Any]], c: SapoRunConfig) -> dict[str, Any]:
  """``cumulative_reward`` = the sum over rounds of the swarm-mean reward (the paper's measure)."""
  rewards = np.asarray([r['reward'] for r in rows if r['reward'] is not None], np.float64)
  bytes_total = sum(r['bytes_shared'] for r in rows)
  tenth = max(len(rewards) // 10, 1)
  groups = {}
  if rows and 'group_reward' in rows[0]:  # a heterogeneous swarm: each group's sum over rounds
    groups['group_cumulative_reward'] = np.sum([r['group_reward'] for r in rows], 0).tolist()
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
      **groups,
  }
