"""CHOCO-SGD and the compression operators: identity CHOCO is D-PSGD, the operators keep
what they promise, bytes follow the compressed size, the CLI runs it."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decsim import compression, experiment
from decsim.errors import ConfigError
from decsim.network import MODEL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model():
  key = jax.random.key(3)
  return {'a': jax.random.normal(key, (7, 13)), 'b': jax.random.normal(jax.random.fold_in(key, 1), (50,))}


def _config(tiny_config, **kw):
  base = dict(protocol='choco', model='logistic', nodes=8, degree=2, rounds=3, eval_every=3,
              local_steps=2, optimizer='sgd', momentum=0.0)
  return dataclasses.replace(tiny_config, **{**base, **kw})


def _run_rounds(c, rounds):
  exp = experiment.build(c)
  round_ = jax.jit(chex.assert_max_traces(exp.protocol.round, n=1))
  state = exp.protocol.init(jax.random.key(c.seed), exp.data)
  metrics = []
  for _ in range(rounds):
    state, m = round_(state, exp.data)
    metrics.append(m)
  return exp, state, metrics


def test_identity_choco_with_gamma_one_is_dpsgd(tiny_config):
  c = _config(tiny_config, compression='none', choco_gamma=1.0)
  _, choco_state, _ = _run_rounds(c, 3)
  _, dpsgd_state, _ = _run_rounds(dataclasses.replace(c, protocol='dpsgd'), 3)
  chex.assert_trees_all_close(choco_state.nodes.params, dpsgd_state.nodes.params,
                              rtol=1e-5, atol=1e-6)
  assert not np.allclose(choco_state.nodes.params['Dense_0']['kernel'][0],
                         choco_state.nodes.params['Dense_0']['kernel'][1])  # nodes differ


def test_topk_keeps_the_k_largest_entries_of_each_leaf():
  params = _model()
  out = compression.topk(params, 0.1)
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(out)):
    k = math.ceil(0.1 * x.size)
    kept = np.nonzero(np.asarray(y).ravel())[0]
    assert len(kept) == k
    np.testing.assert_array_equal(np.asarray(y).ravel()[kept], np.asarray(x).ravel()[kept])
    smallest_kept = np.min(np.abs(np.asarray(x).ravel()[kept]))
    dropped = np.delete(np.abs(np.asarray(x).ravel()), kept)
    assert np.all(dropped <= smallest_kept)


def test_randk_keeps_k_unscaled_entries_and_depends_on_the_key():
  params = _model()
  a = compression.randk(jax.random.key(0), params, 0.2)
  b = compression.randk(jax.random.key(1), params, 0.2)
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(a)):
    kept = np.nonzero(np.asarray(y).ravel())[0]
    assert len(kept) == math.ceil(0.2 * x.size)
    np.testing.assert_array_equal(np.asarray(y).ravel()[kept], np.asarray(x).ravel()[kept])
  assert not np.array_equal(np.asarray(a['b']), np.asarray(b['b']))


def test_qsgd_is_unbiased_and_takes_only_its_levels():
  x = {'w': jax.random.normal(jax.random.key(5), (40,))}
  levels = 4
  keys = jax.random.split(jax.random.key(0), 4000)
  outs = jax.vmap(lambda k: compression.qsgd(k, x, levels))(keys)['w']  # [4000, 40]
  norm = float(jnp.linalg.norm(x['w']))
  # one draw of an entry has std <= norm / (2 s): 5 standard errors of the mean
  np.testing.assert_allclose(np.mean(np.asarray(outs), axis=0), x['w'],
                             atol=5 * norm / (2 * levels) / np.sqrt(len(keys)))
  scaled_levels = np.asarray(outs) / norm * levels
  np.testing.assert_allclose(scaled_levels, np.round(scaled_levels), atol=1e-4)
  assert np.all(np.abs(np.round(scaled_levels)) <= levels)
  assert np.all(np.sign(np.asarray(outs)) * np.sign(np.asarray(x['w'])) >= 0)
  tau = compression.qsgd_tau(40, levels)
  scaled = compression.qsgd(keys[0], x, levels, scaled=True)['w']
  np.testing.assert_allclose(scaled * tau, outs[0], rtol=1e-5)


def test_message_sizes():
  params = _model()  # leaves of 91 and 50 float32
  assert compression.message_bytes('none', params) == (91 + 50) * 4
  assert compression.message_bytes('topk', params, 0.1) == (10 + 5) * (4 + 4)
  bits = 1 + math.ceil(math.log2(17))  # sign + 5 level bits
  assert compression.message_bytes('qsgd', params, levels=16) == (
      4 + math.ceil(91 * bits / 8) + 4 + math.ceil(50 * bits / 8))


def test_round_bytes_are_messages_times_the_compressed_size(tiny_config):
  c = _config(tiny_config, compression='topk', compression_ratio=0.1)
  exp, state, metrics = _run_rounds(c, 2)
  shapes = jax.eval_shape(exp.learner.init_params, jax.random.key(0))
  size = sum(math.ceil(0.1 * x.size) * (4 + 4) for x in jax.tree.leaves(shapes))
  priced = experiment.message_bytes(c, exp.protocol, exp.learner)
  assert priced[MODEL] == size < exp.learner.model_bytes()
  # every node of a 2-regular graph sends to its 2 neighbours each round
  assert [int(m.messages[MODEL]) for m in metrics] == [c.nodes * c.degree] * 2
  assert int(jnp.sum(state.sent[:, MODEL])) * priced[MODEL] == 2 * c.nodes * c.degree * size


def test_compressed_choco_learns_and_tracks_public_copies(tiny_config):
  c = _config(tiny_config, compression='topk', compression_ratio=0.3, choco_gamma=0.3)
  _, state, metrics = _run_rounds(c, 4)
  assert all(np.isfinite(float(m.train_loss)) for m in metrics)
  # x̂ follows x: after 4 rounds the public copy is no longer zero
  assert float(jnp.max(jnp.abs(state.extra['Dense_0']['kernel']))) > 0


def test_bad_configs_name_the_flag(tiny_config):
  with pytest.raises(ConfigError, match='--compression=topk applies only to'):
    dataclasses.replace(tiny_config, protocol='dpsgd', compression='topk')
  with pytest.raises(ConfigError, match='--compression_ratio'):
    _config(tiny_config, compression_ratio=0.0)
  with pytest.raises(ConfigError, match='--choco_gamma'):
    _config(tiny_config, choco_gamma=1.5)
  with pytest.raises(ConfigError, match='--variance_correction'):
    experiment.build(_config(tiny_config, variance_correction='received'))


@pytest.mark.slow  # a subprocess: about 35 s on 2 busy cores
def test_cli_writes_node_and_consensus_accuracy(tmp_path):
  out = tmp_path / 'choco1'
  env = {**os.environ, 'PYTHONPATH': ROOT}
  subprocess.run([sys.executable, '-m', 'launch.simulate', '--protocol=choco',
                  '--compression=topk', '--compression_ratio=0.1', '--nodes=16', '--degree=4',
                  '--rounds=4', '--eval_every=2', f'--out={out}'],
                 check=True, cwd=ROOT, env=env, capture_output=True, timeout=300)
  rows = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
  assert [r['round'] for r in rows] == [0, 2, 4]
  assert all('accuracy' in r and 'consensus_accuracy' in r for r in rows)


def test_offline_nodes_neither_train_send_nor_receive(tiny_config):
  c = _config(tiny_config, compression='randk', compression_ratio=0.2, choco_gamma=0.5)
  exp = experiment.build(c)
  round_ = jax.jit(chex.assert_max_traces(exp.protocol.round, n=1))
  state = exp.protocol.init(jax.random.key(0), exp.data)
  state, _ = round_(state, exp.data)  # one round with everyone: x̂ != 0
  offline = jnp.arange(c.nodes) < 2  # nodes 0 and 1 go offline
  before = state.replace(available=~offline)
  after, metrics = round_(before, exp.data)
  for old, new in [(before.nodes.params, after.nodes.params), (before.extra, after.extra)]:
    for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new)):
      np.testing.assert_array_equal(a[:2], b[:2])  # offline rows untouched
      assert not np.array_equal(a[2:], b[2:])  # the live ones moved
  np.testing.assert_array_equal(after.sent[:2], before.sent[:2])
  assert int(metrics.active_nodes) == c.nodes - 2
  assert int(metrics.messages[MODEL]) < c.nodes * c.degree  # no message to or from 0 and 1
