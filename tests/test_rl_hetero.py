"""Heterogeneous SAPO swarms (decsim.rl.hetero): one group is the homogeneous swarm bitwise, a
node trains on text another group shared, an LM group re-encodes text to the same text, and
--policy_groups is checked in one line."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decsim.errors import ConfigError
from decsim.rl import experiment
from decsim.rl import grpo as grpo_lib
from decsim.rl import hetero
from decsim.rl import policy as policy_lib
from decsim.rl import sapo as sapo_lib
from decsim.rl import tasks

T = 4
DATA = pathlib.Path(__file__).parent / 'data'


def _policy(dim: int) -> policy_lib.Policy:
  return policy_lib.make_policy(policy_lib.PolicyConfig(
      max_len=tasks.PROMPT_LEN + T, dim=dim, layers=1, mlp=2 * dim))


def _params(policy, n, seed):
  return jax.vmap(policy.init)(jax.random.split(jax.random.key(seed), n))


def _config(nodes, j, **kw):
  return sapo_lib.SapoConfig(nodes=nodes, local_groups=2, external_groups=j, generations=4,
                             completion_len=T, grpo=grpo_lib.GRPOConfig(lr=1e-2), **kw)


def _rounds(sapo, params, rounds):
  state = sapo.init(jax.random.key(3), params)
  step = jax.jit(sapo.round)
  out = []
  for _ in range(rounds):
    state, metrics = step(state)
    out.append(metrics)
  return state, out


# CI time: two SAPO rounds compiled (about 45 s on a quiet core); the CI suite keeps the
# text round trip and the flag checks, the slow suite runs this and the runs below.
@pytest.mark.slow
@pytest.mark.parametrize('j,kw', [
    (3, dict(filter='uniform', churn=0.3, staleness=1)), (0, {})],
    ids=['shared-churn-stale', 'independent'])
def test_one_group_is_the_homogeneous_swarm_bitwise(j, kw):
  policy, config = _policy(16), _config(4, j, **kw)
  params = _params(policy, 4, 0)
  state, metrics = _rounds(sapo_lib.sapo(policy, config), params, 2)
  h_state, h_metrics = _rounds(hetero.hetero_sapo((hetero.Group(policy, 4),), config),
                               (params,), 2)
  for m, hm in zip(metrics, h_metrics):
    jax.tree.map(np.testing.assert_array_equal, m, hm)
  jax.tree.map(np.testing.assert_array_equal, state.nodes, h_state.nodes[0])
  np.testing.assert_array_equal(state.bytes_shared, h_state.bytes_shared)
  if j:
    assert any(float(m.external_groups) > 0 for m in metrics)  # the draws were exercised


@pytest.mark.slow
def test_a_node_trains_on_the_text_another_group_shared():
  small, large = _policy(16), _policy(32)  # two sizes, 2 nodes each
  groups = (hetero.Group(small, 2), hetero.Group(large, 2))
  config = _config(4, 3, filter='uniform')
  params = (_params(small, 2, 0), _params(large, 2, 1))
  state = hetero.hetero_sapo(groups, config).init(jax.random.key(5), params)
  update = grpo_lib.make_grpo(small, config.grpo)[1]

  @jax.jit
  def drawn(state):  # round 0's sharing, draws and the small group's GRPO step
    online = jnp.ones((4,), bool)
    pools = hetero.share_all(groups, config, state.key, state.round, params, online)
    shared = hetero.text_pool(groups, pools)  # [4, 2, 4, T]
    idx, valid = sapo_lib.draw_external(config, state.key, state.round, shared)  # [4, 3]
    batch = hetero.group_batch(groups[0], config, pools[0], shared, idx[:2], valid[:2])
    nodes, loss = sapo_lib.train_nodes(update, config._replace(nodes=2), online[:2],
                                       state.nodes[0], batch, None)
    return pools[1].completions, idx[:2], valid[:2], batch.completions[:, 2:], loss, nodes

  sent, idx, valid, ext, loss, nodes = drawn(state)  # sent [2, I, G, T], ext [2, J, G, T]
  sent, idx, valid, ext = map(np.asarray, (sent, idx, valid, ext))
  owner, item = idx // 2, idx % 2
  from_large = owner >= 2
  assert from_large.any() and valid.all()
  for n, k in zip(*np.nonzero(from_large)):
    np.testing.assert_array_equal(ext[n, k], sent[owner[n, k] - 2, item[n, k]])
  assert np.isfinite(np.asarray(loss)).all()
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), nodes.params, params[0])
  assert max(jax.tree.leaves(moved)) > 0  # the small group trained on what it drew


def test_a_qwen2_group_reencodes_shared_text_to_the_same_text():
  from decsim.rl import hf_checkpoint, lm_policy
  checkpoint = hf_checkpoint.load(DATA / 'qwen2_tiny')
  rollouts = lm_policy.make_lm_policy(checkpoint, tasks.CHARS).rollouts
  tok = checkpoint.tokenizer
  answers = ['42', '385', '7', '1+2']
  text = jnp.asarray(np.stack([tasks.encode(a + '$', 6) for a in answers]))  # [4, 6] task text
  ids = rollouts.from_text(text, 6)  # [4, 6] the model's tokens
  np.testing.assert_array_equal(rollouts.task_tokens(ids)[:, :6], text)  # back to the same text
  for row, answer in zip(np.asarray(ids), answers):
    eos = list(row).index(tok.eos_ids[0])
    assert tok.tokenizer.decode(row[:eos].tolist()) == answer
    assert (row[eos + 1:] == tok.pad_id).all()
  mask = rollouts.completion_mask(ids)
  np.testing.assert_array_equal(mask.sum(-1), [len(a) + 1 for a in answers])  # answer + EOS


@pytest.mark.parametrize('spec,named', [
    ('4:small,3:small', 'make them add up'),
    ('4:small,4:tiny', 'COUNT:small'),
    ('4:small,4:small:96', 'COUNT:small'),
    ('4:small,4:small:10x2', 'multiple of 4'),
    ('4:small,4:qwen2', '--policy_path'),
    ('4:small,4:qwen2:8x1', 'write COUNT:qwen2'),
])
def test_bad_policy_groups_are_one_line(spec, named):
  with pytest.raises(ConfigError, match=named) as e:
    experiment.SapoRunConfig(policy_groups=spec)
  assert '\n' not in str(e.value) and '--policy_groups' in str(e.value)


def test_policy_groups_parse_and_a_bad_one_exits_2(tmp_path):
  c = experiment.SapoRunConfig(policy_groups='4:small, 4:small:96x3', dim=32)
  assert experiment.policy_groups(c) == (experiment.GroupSpec(4, 'small', 32, 2),
                                         experiment.GroupSpec(4, 'small', 96, 3))
  env = dict(os.environ, JAX_PLATFORMS='cpu', DECSIM_CACHE=str(tmp_path / 'cache'))
  proc = subprocess.run([sys.executable, '-m', 'launch.sapo', f'--out={tmp_path / "run"}',
                         '--policy_groups=4:small,5:small'], capture_output=True, text=True,
                        timeout=300, env=env, cwd=os.path.join(os.path.dirname(__file__), '..'))
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and '--policy_groups' in lines[0], proc.stderr


def _run(tmp_path, name, **kw):
  c = experiment.SapoRunConfig(nodes=3, local_groups=2, external_groups=2, generations=2,
                               rounds=3, log_every=3, dim=8, layers=1, warmup_min=1,
                               warmup_max=2, task_mix='bits', **kw)
  experiment.run(c, out_dir=tmp_path / name, log=lambda *a: None, cache_dir=tmp_path / 'cache')
  rows = (tmp_path / name / 'metrics.jsonl').read_text().splitlines()
  return [{k: v for k, v in json.loads(r).items() if k != 'seconds'} for r in rows]


@pytest.mark.slow
def test_a_run_with_one_policy_group_is_the_plain_run(tmp_path):
  assert _run(tmp_path, 'one', policy_groups='3:small') == _run(tmp_path, 'plain')
  rows = _run(tmp_path, 'two', policy_groups='1:small,2:small:16x1')
  assert len(rows) == 3 and all(r['bytes_shared'] > 0 for r in rows)
  for r in rows:  # node 0 is the first group, nodes 1-2 the second
    assert r['node_reward_min'] <= min(r['group_reward']) <= max(r['group_reward']) \
        <= r['node_reward_max']
    assert r['reward'] == pytest.approx((r['group_reward'][0] + 2 * r['group_reward'][1]) / 3)


@pytest.mark.slow
def test_a_small_and_a_qwen2_group_share_one_swarm(tmp_path):
  rows = _run(tmp_path, 'mixed', policy_groups='1:small,2:qwen2',
              policy_path=str(DATA / 'qwen2_tiny'), filter='uniform')
  assert len(rows) == 3 and all(len(r['group_reward']) == 2 for r in rows)
  assert all(np.isfinite(r['loss']) and r['external_groups'] == 2 for r in rows)
  summary = json.loads((tmp_path / 'mixed' / 'summary.json').read_text())
  assert len(summary['group_cumulative_reward']) == 2
