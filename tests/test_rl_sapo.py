"""SAPO: the external draws, J = 0 as independent GRPO, churn, bytes, base-model cache, CLI,
and runs through decsim's one run loop (checkpoints, --resume, kill -9)."""

import dataclasses
import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decsim import rng
from decsim.rl import base as base_lib
from decsim.rl import experiment
from decsim.rl import grpo as grpo_lib
from decsim.rl import policy as policy_lib
from decsim.rl import sapo as sapo_lib
from decsim.rl import tasks

N, I, G = 5, 3, 4


def _rewards(key):
  # a mix of all-equal and mixed groups
  r = jax.random.bernoulli(key, 0.4, (N, I, G)).astype(jnp.float32)
  return r.at[:, 0].set(0.0).at[1, 1].set(1.0)


@pytest.mark.parametrize('filter', sapo_lib.FILTERS)
def test_a_node_never_draws_its_own_or_offline_groups(filter):
  for seed in range(5):
    rewards = _rewards(jax.random.key(seed))
    online = jnp.array([True, True, False, True, True])
    idx, valid = sapo_lib.select_external(jax.random.key(100 + seed), rewards, online, 6, filter)
    owner = np.asarray(idx) // I
    valid = np.asarray(valid)
    assert valid.any()
    for n in range(N):
      drawn = owner[n][valid[n]]
      assert (drawn != n).all() and (drawn != 2).all()
      assert len(set(np.asarray(idx)[n][valid[n]].tolist())) == valid[n].sum()  # no repeats


def test_nonzero_advantage_drops_all_equal_groups():
  rewards = _rewards(jax.random.key(0))
  idx, valid = sapo_lib.select_external(jax.random.key(1), rewards, jnp.ones(N, bool), 12,
                                        'nonzero_advantage')
  flat = np.asarray(grpo_lib.nonzero_advantage(rewards)).reshape(-1)
  idx, valid = np.asarray(idx), np.asarray(valid)
  assert flat[idx[valid]].all()
  # every eligible group is drawn when J is large enough, and the rest is invalid
  owner = np.arange(N * I) // I
  for n in range(N):
    assert valid[n].sum() == min(12, (flat & (owner != n)).sum())
  # uniform keeps all-equal groups
  _, valid_u = sapo_lib.select_external(jax.random.key(1), rewards, jnp.ones(N, bool), 12, 'uniform')
  assert np.asarray(valid_u).all()


def test_top_k_and_first_k_orders():
  rewards = jnp.arange(N * I * G, dtype=jnp.float32).reshape(N, I, G) / (N * I * G)
  idx, _ = sapo_lib.select_external(jax.random.key(0), rewards, jnp.ones(N, bool), 2, 'top_k')
  np.testing.assert_array_equal(np.asarray(idx)[0], [N * I - 1, N * I - 2])  # best of others
  np.testing.assert_array_equal(np.asarray(idx)[N - 1], [(N - 1) * I - 1, (N - 1) * I - 2])
  idx, _ = sapo_lib.select_external(jax.random.key(0), rewards, jnp.ones(N, bool), 2, 'first_k')
  np.testing.assert_array_equal(np.asarray(idx)[0], [I, I + 1])
  np.testing.assert_array_equal(np.asarray(idx)[1], [0, 1])


CONFIG = policy_lib.PolicyConfig(max_len=tasks.PROMPT_LEN + 4, dim=16, heads=2, layers=1, mlp=32)


def _setup(j, **kw):
  policy = policy_lib.make_policy(CONFIG)
  params = jax.vmap(policy.init)(jax.random.split(jax.random.key(0), 3))
  # Adam's eps raised so that gradients at float32 noise level (which differ between
  # a vmapped and a single-node computation) are not normalised up to +-lr
  grpo = grpo_lib.GRPOConfig(lr=1e-2, adam_eps=1e-4)
  config = sapo_lib.SapoConfig(nodes=3, local_groups=2, external_groups=j, generations=4,
                               completion_len=4, grpo=grpo, **kw)
  return policy, params, sapo_lib.sapo(policy, config), config


def _pool(value, online=True):
  """A tiny stand-in pool whose every leaf holds ``value``."""
  full = lambda shape, dtype=jnp.float32: jnp.full(shape, value, dtype)
  return sapo_lib.Pool(questions=full((N, I, 2)), completions=full((N, I, G, 3), jnp.int32),
                       rewards=full((N, I, G)), online=jnp.full((N,), online))


def test_stale_pool_serves_round_r_minus_d_and_rolls_the_history():
  config = sapo_lib.SapoConfig(nodes=N, local_groups=I, generations=G, staleness=2)
  history = jax.tree.map(lambda a, b: jnp.stack([a, b]), _pool(0, False), _pool(0, False))
  pools = [_pool(r + 1) for r in range(4)]
  for r, pool in enumerate(pools):
    shared, history = sapo_lib.stale_pool(config, history, pool, jnp.int32(r))
    want = pool if r < 2 else pools[r - 2]  # no stale pool yet: this round's
    same = jax.tree.map(lambda x, y: bool(jnp.all(x == y)), shared, want)
    assert all(jax.tree.leaves(same)), r
    np.testing.assert_array_equal(history.rewards[-1], pool.rewards)  # newest last
  fresh = sapo_lib.SapoConfig(nodes=N, staleness=0)
  assert sapo_lib.stale_pool(fresh, None, pools[0], jnp.int32(5)) == (pools[0], None)


def test_online_nodes_follow_the_churn_probability():
  none = sapo_lib.online_nodes(sapo_lib.SapoConfig(nodes=N), jax.random.key(0), jnp.int32(3))
  assert np.all(none)
  config = sapo_lib.SapoConfig(nodes=2000, churn=0.25)
  online = sapo_lib.online_nodes(config, jax.random.key(0), jnp.int32(3))
  assert 0.70 < float(jnp.mean(online)) < 0.80
  again = sapo_lib.online_nodes(config, jax.random.key(0), jnp.int32(3))
  np.testing.assert_array_equal(online, again)  # a function of (key, round)


def test_zero_external_groups_equals_independent_grpo_per_node():
  policy, params, sapo, config = _setup(0)
  state = sapo.init(jax.random.key(7), params)
  new_state, metrics = jax.jit(sapo.round)(state)
  tx, update = grpo_lib.make_grpo(policy, config.grpo)

  @jax.jit
  def one_node(p, n):  # plain single-node GRPO with the node's own keys
    qkey = rng.node_keys(state.key, 0, jnp.arange(3), rng.Stream.TASK)[n]
    skey = rng.node_keys(state.key, 0, jnp.arange(3), rng.Stream.ROLLOUT)[n]
    q = tasks.sample_questions(qkey, (2,))
    out = policy_lib.sample(policy, p, skey, jnp.repeat(q.prompt, 4, 0), 4).reshape(2, 4, 4)
    rewards = tasks.score_groups(out, q.oracle, q.oracle_len)
    p_new, _, _ = update(p, tx.init(p), grpo_lib.Batch(q.prompt, out, rewards, jnp.ones(2)))
    return p_new, rewards

  moved = 0.0
  for n in range(3):
    p = jax.tree.map(lambda x: x[n], params)
    p_new, rewards = one_node(p, n)
    assert float(rewards.mean()) == pytest.approx(float(metrics.node_reward[n]), abs=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b[n], atol=2e-6), p_new,
                 new_state.nodes.params)
    moved += float(jnp.abs(p_new['head']['kernel'] - p['head']['kernel']).max())
  assert moved > 1e-4  # the update did something


@pytest.mark.slow
def test_churn_freezes_offline_nodes_and_bytes_count_only_sharers():
  _, params, sapo, _ = _setup(2, churn=0.5)
  state = sapo.init(jax.random.key(3), params)
  round_ = jax.jit(sapo.round)
  seen_offline = False
  for _ in range(4):
    old = state
    state, m = round_(state)
    online = ~jax.random.bernoulli(rng.round_key(old.key, old.round, rng.Stream.CHURN), 0.5, (3,))
    sent = np.asarray(state.bytes_shared - old.bytes_shared)
    for n in range(3):
      moved = not np.allclose(state.nodes.params['head']['kernel'][n],
                              old.nodes.params['head']['kernel'][n])
      if online[n]:
        assert sent[n] > 0
      else:
        seen_offline = True
        assert sent[n] == 0 and not moved
    assert int(m.active_nodes) == int(online.sum())
  assert seen_offline


@pytest.mark.slow
def test_staleness_round_runs_and_external_groups_fill():
  _, params, sapo, _ = _setup(2, staleness=2)
  state = sapo.init(jax.random.key(3), params)
  round_ = jax.jit(sapo.round)
  for _ in range(3):
    state, m = round_(state)
    assert float(m.external_groups) <= 2
  assert state.history.completions.shape[:3] == (2, 3, 2)


@pytest.mark.slow
def test_base_models_are_cached_and_restored_identically(tmp_path):
  policy = policy_lib.make_policy(CONFIG)
  warm = base_lib.WarmupConfig(steps_min=1, steps_max=3, batch_size=4, kinds_per_node=2)
  mix = (1.0,) * len(tasks.TASKS)
  logs = []
  first = base_lib.base_models(0, 3, policy, 4, warm, mix, cache_dir=tmp_path, log=logs.append)
  second = base_lib.base_models(0, 3, policy, 4, warm, mix, cache_dir=tmp_path, log=logs.append)
  assert len(logs) == 1  # trained once, restored once
  path = base_lib.cache_path(0, 3, policy.config, 4, warm, mix, tmp_path)
  assert path.is_absolute() and path.exists()
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), first, second)
  assert jax.tree.structure(first) == jax.tree.structure(second)
  # nodes differ (own init, own step count)
  assert not np.allclose(first['head']['kernel'][0], first['head']['kernel'][1])
  np.testing.assert_array_equal(base_lib.warmup_steps(3, warm), [1, 2, 3])


@pytest.mark.slow
def test_shared_base_models_are_one_trajectory():
  """``base_init='shared'``: node n is the shared warm-up stopped at its own step count."""
  policy = policy_lib.make_policy(CONFIG)
  mix = (1.0,) * len(tasks.TASKS)
  key = jax.random.key(0)
  warm = lambda lo, hi: base_lib.make_warmup(
      policy, 3, 4, base_lib.WarmupConfig(lo, hi, batch_size=4, init='shared'), mix)
  shared = jax.jit(warm(1, 3))(key)  # steps [1, 2, 3]
  equal = jax.jit(warm(2, 2))(key)  # every node 2 steps
  leaf = lambda p, n: np.asarray(p['head']['kernel'][n])
  np.testing.assert_allclose(leaf(shared, 1), leaf(equal, 0), rtol=1e-6, atol=1e-7)
  assert not np.allclose(leaf(shared, 0), leaf(shared, 1))  # different step counts
  jax.tree.map(lambda x: np.testing.assert_array_equal(x[0], x[2]), equal)  # identical nodes
  # shared and independent base models are cached apart (independent nodes differ:
  # the cache round-trip test)
  c = base_lib.WarmupConfig(1, 3)
  assert base_lib.cache_path(0, 3, CONFIG, 4, c, mix) != base_lib.cache_path(
      0, 3, CONFIG, 4, c._replace(init='shared'), mix)
  with pytest.raises(ValueError, match='--base_init'):
    base_lib.make_warmup(policy, 3, 4, c._replace(init='same'), mix)


def _launch(args, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', DECSIM_CACHE=str(tmp_path / 'cache'))
  return subprocess.run([sys.executable, '-m', 'launch.sapo', f'--out={tmp_path / "run"}', *args],
                        capture_output=True, text=True, timeout=300, env=env,
                        cwd=os.path.join(os.path.dirname(__file__), '..'))


@pytest.mark.parametrize('args,named', [
    (['--filter=best'], '--filter'),
    (['--external_groups=40', '--nodes=3', '--local_groups=2'], '--external_groups'),
    (['--task_mix=add,sort'], '--task_mix'),
    (['--log_every=0'], '--log_every'),
    (['--generations=1'], '--generations'),
    (['--base_init=same'], '--base_init'),
    (['--rounds=8', '--log_every=2', '--checkpoint_every=3'], '--checkpoint_every'),
], ids=['filter', 'external', 'task_mix', 'log_every', 'generations', 'base_init', 'checkpoint'])
def test_bad_flags_exit_2_with_one_line(args, named, tmp_path):
  proc = _launch(args, tmp_path)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith('decsim: error:') and named in lines[0], proc.stderr


@pytest.mark.slow
def test_launch_writes_metrics_and_summary(tmp_path):
  proc = _launch(['--nodes=3', '--local_groups=2', '--external_groups=2', '--generations=2',
                  '--rounds=4', '--log_every=2', '--dim=8', '--layers=1', '--warmup_min=1',
                  '--warmup_max=2', '--task_mix=bits'], tmp_path)
  assert proc.returncode == 0, proc.stderr
  rows = [json.loads(l) for l in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert [r['round'] for r in rows] == [1, 2, 3, 4]
  summary = json.loads((tmp_path / 'run' / 'summary.json').read_text())
  assert summary['cumulative_reward'] == pytest.approx(sum(r['reward'] for r in rows))
  assert summary['bytes_shared_total'] == sum(r['bytes_shared'] for r in rows) > 0
  assert json.loads((tmp_path / 'run' / 'config.json').read_text())['nodes'] == 3


@pytest.mark.slow
def test_quick_sapo_study_writes_all_four_labels(tmp_path, monkeypatch):
  from decsim import studies
  monkeypatch.setenv('DECSIM_CACHE', str(tmp_path / 'cache'))
  runs = studies.get_study('sapo')(tmp_path / 'study', quick=True)
  study = json.loads((tmp_path / 'study' / 'study.json').read_text())
  assert study['study'] == 'sapo' and list(study['runs']) == ['8/0', '6/2', '4/4', '2/6']
  for label, r in study['runs'].items():
    assert r['cumulative_reward'] == pytest.approx(runs[label]['cumulative_reward'])
    assert r['cumulative_reward'] > 0
  assert (tmp_path / 'study' / 'reward.png').stat().st_size > 0


TINY = ['--nodes=3', '--local_groups=2', '--external_groups=2', '--generations=2', '--dim=8',
        '--layers=1', '--warmup_min=1', '--warmup_max=2', '--task_mix=bits']


@pytest.mark.slow
def test_resume_continues_a_sapo_run_bitwise(tmp_path, monkeypatch):
  """The run loop checkpoints SAPO's whole state (the staleness history included): a run
  stopped at round 20 and resumed to 40 writes the rows of an uninterrupted 40-round run."""
  monkeypatch.setenv('DECSIM_CACHE', str(tmp_path / 'cache'))
  c = experiment.SapoRunConfig(nodes=3, local_groups=2, external_groups=2, generations=2,
                               dim=8, layers=1, warmup_min=1, warmup_max=2, task_mix='bits',
                               staleness=1, rounds=40, log_every=10, checkpoint_every=20)
  experiment.run(c, out_dir=tmp_path / 'full', log=lambda _: None)
  experiment.run(dataclasses.replace(c, rounds=20), out_dir=tmp_path / 'cut', log=lambda _: None)
  logs = []
  summary = experiment.run(dataclasses.replace(c, resume=True), out_dir=tmp_path / 'cut',
                           log=logs.append)
  assert 'resumed from the checkpoint at round 20' in logs
  full = (tmp_path / 'full' / 'metrics.jsonl').read_text()
  assert (tmp_path / 'cut' / 'metrics.jsonl').read_text() == full and full.count('\n') == 40
  rows = [json.loads(l) for l in full.splitlines()]
  assert summary['rounds'] == 40 and summary['status'] == 'completed'
  assert summary['cumulative_reward'] == pytest.approx(sum(r['reward'] for r in rows))


@pytest.mark.slow
def test_kill_9_then_resume_reproduces_the_uninterrupted_sapo_run(tmp_path):
  args = [*TINY, '--rounds=600', '--log_every=10', '--checkpoint_every=20']
  full, killed = tmp_path / 'full', tmp_path / 'killed'
  assert _launch([*args, f'--out={full}'], tmp_path).returncode == 0
  env = dict(os.environ, JAX_PLATFORMS='cpu', DECSIM_CACHE=str(tmp_path / 'cache'))
  proc = subprocess.Popen([sys.executable, '-u', '-m', 'launch.sapo', *args, f'--out={killed}'],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                          cwd=os.path.join(os.path.dirname(__file__), '..'))
  for line in proc.stdout:  # progress lines: kill once two checkpoints are written
    if line.startswith('round') and int(line.split()[1].split('/')[0]) >= 50:
      break
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  kept = (killed / 'metrics.jsonl').read_text().count('\n')
  assert 50 <= kept < 600, kept  # killed mid-run
  resumed = _launch([*args, f'--out={killed}', '--resume'], tmp_path)
  assert resumed.returncode == 0, resumed.stderr
  assert 'resumed from the checkpoint at round' in resumed.stdout
  assert (killed / 'metrics.jsonl').read_text() == (full / 'metrics.jsonl').read_text()


def test_help_lists_the_generated_flags_by_group(capsys):
  from launch import sapo
  sapo.run_main(['sapo', '--helpfull'])
  out = capsys.readouterr().out
  assert 'sapo: SAPO run' in out and 'sapo: study and output' in out
  for name in ('--checkpoint_every', '--resume', '--local_groups', '--study'):
    assert name in out
