"""Sharding the node axis, multi-host runs, donation and the parameter dtype.

Fake CPU devices must be requested before JAX starts, so the 8-device runs go
through a subprocess (tests/scripts/sharded_equivalence.py); this process keeps
its single device.
"""

import dataclasses
import json
import math
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import conftest
from decsim import experiment, sharding, simulate

ROOT = os.path.join(os.path.dirname(__file__), '..')


def _env(**extra):
  """The subprocess's environment: only the test flags in XLA_FLAGS, plus ``extra``'s."""
  flags = ' '.join(f for f in (extra.pop('XLA_FLAGS', ''), conftest.TEST_XLA_FLAGS) if f)
  return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT, XLA_FLAGS=flags, **extra)


def _close(a, b):
  if isinstance(a, float) and isinstance(b, float):
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
  return a == b


# CI runs the two heaviest ways of touching the node axis (neighbour gathers, per-node
# views); the slow suite runs the others (FedAvg's replicated rows in flight, gossip's
# inboxes, dense mixing, one-peer, global views).
SHARDED_CASES = [('dpsgd_sparse', 'modest_local'),
                 pytest.param(('fedavg', 'gossip', 'dpsgd_dense', 'dpsgd_onepeer', 'modest'),
                              marks=pytest.mark.slow)]


@pytest.mark.parametrize('cases', SHARDED_CASES, ids=['ci', 'more'])
def test_sharded_round_matches_one_device_on_8_fake_devices(cases):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'tests', 'scripts', 'sharded_equivalence.py'),
       *cases], capture_output=True, text=True, timeout=300, cwd=ROOT,
      env=_env(XLA_FLAGS='--xla_force_host_platform_device_count=8'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith('{')]
  assert [r['case'] for r in results] == list(cases)
  for r in results:
    assert r['devices'] == 8
    # The state really is split: 16 nodes, 2 rows on each of the 8 devices.
    assert r['placement'] == {'spec': "P('nodes',)", 'rows_per_device': [2],
                              'idx_rows_per_device': [2], 'shards': 8}, r['case']
    assert len(r['one']) == len(r['many']) == 3  # rounds 0, 2 and 4
    for one, many in zip(r['one'], r['many']):
      assert one.keys() == many.keys()
      bad = {k: (one[k], many[k]) for k in one if not _close(one[k], many[k])}
      assert not bad, (r['case'], bad)
    assert r['one'][-1]['train_loss'] < r['one'][1]['train_loss'] + 1.0  # a real run


@pytest.mark.parametrize('requested,nodes,available,named', [
    (-1, 16, 8, '--devices=-1'),
    (9, 16, 8, 'only 8 devices'),
    (3, 16, 8, '--nodes=16 is not a multiple of 3'),
    (0, 100, 8, 'use --nodes=104'),
])
def test_device_error_names_the_flag_and_the_fix(requested, nodes, available, named):
  error = sharding.device_error(requested, nodes, available)
  assert error is not None and named in error and '\n' not in error


@pytest.mark.parametrize('requested,nodes', [(1, 7), (0, 16), (4, 16), (8, 16)])
def test_device_error_accepts_even_splits(requested, nodes):
  assert sharding.device_error(requested, nodes, 8) is None


def test_validate_rejects_more_devices_than_visible(tiny_config):
  assert jax.device_count() == 1
  with pytest.raises(experiment.ConfigError, match='--devices=2 but only 1 devices'):
    experiment.validate(dataclasses.replace(tiny_config, devices=2))
  with pytest.raises(experiment.ConfigError, match='--param_dtype'):
    experiment.validate(dataclasses.replace(tiny_config, param_dtype='float16'))


@pytest.mark.parametrize('args,named', [
    (['--devices=-2'], '--devices=-2'),
    (['--devices=3', '--nodes=20'], 'not a multiple of 3'),
    (['--num_processes=2'], '--coordinator_address'),
    (['--num_processes=2', '--coordinator_address=localhost:1', '--process_id=2'],
     '--process_id=2'),
])
def test_cli_bad_device_flags_exit_2_with_one_line(args, named, tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'launch.simulate', f'--out={tmp_path}', *args],
                        capture_output=True, text=True, timeout=120, cwd=ROOT,
                        env=_env(XLA_FLAGS='--xla_force_host_platform_device_count=4'))
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith('decsim: error:') and named in lines[0], \
      proc.stderr


def test_distributed_error():
  assert sharding.distributed_error(None, 1, 0) is None
  assert sharding.distributed_error('h:1', 2, 1) is None
  assert '--num_processes=0' in sharding.distributed_error(None, 0, 0)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_run_on_localhost_matches_one_process(tmp_path):
  """jax.distributed over gloo CPU collectives: 2 processes x 1 device == 1 process."""
  args = [sys.executable, '-m', 'launch.simulate', '--num_samples=1000', '--nodes=10',
          '--model=logistic', '--rounds=4', '--eval_every=2', '--local_steps=1',
          '--protocol=dpsgd', '--degree=2', '--eval_nodes=2', '--mixing=sparse']
  port = _free_port()
  multi = [subprocess.Popen(
      [*args, '--devices=0', '--num_processes=2', f'--process_id={p}',
       f'--coordinator_address=localhost:{port}', f'--out={tmp_path / "multi"}'],
      cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for p in (0, 1)]
  outs = [p.communicate(timeout=180) for p in multi]
  for p, (_, err) in zip(multi, outs):
    assert p.returncode == 0, err[-3000:]
  single = subprocess.run([*args, f'--out={tmp_path / "single"}'], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=180)
  assert single.returncode == 0, single.stderr[-3000:]
  read = lambda d: [json.loads(l) for l in (tmp_path / d / 'metrics.jsonl').read_text().splitlines()]
  assert json.loads((tmp_path / 'multi' / 'summary.json').read_text())['devices'] == 2
  for a, b in zip(read('multi'), read('single'), strict=True):
    assert all(_close(a[k], b[k]) for k in a), (a, b)


def _tiny(tiny_config, **kw):
  return dataclasses.replace(tiny_config, rounds=4, eval_every=2, num_samples=1000,
                             model='logistic', **kw)


def test_compiled_chunk_donates_the_input_state(tiny_config):
  exp = experiment.build(_tiny(tiny_config, protocol='dpsgd', degree=2))
  state = jax.jit(exp.protocol.init)(jax.random.key(0), exp.data)
  chunk = simulate.compile_chunk(exp.protocol, state, exp.data, 2)
  leaves = jax.tree.leaves(state.nodes.params)
  new_state, _ = chunk(state, exp.data)
  assert all(leaf.is_deleted() for leaf in leaves)
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(new_state.nodes.params))


@pytest.mark.parametrize('protocol', ['fedavg', 'dpsgd'])
def test_bfloat16_params_halve_bytes_and_train(tiny_config, protocol):
  summaries, exps = {}, {}
  for dtype in ('float32', 'bfloat16'):
    c = _tiny(tiny_config, protocol=protocol, degree=2, param_dtype=dtype)
    exps[dtype] = experiment.build(c)
    summaries[dtype] = experiment.run(c, log=lambda _: None)
  exp = exps['bfloat16']
  state = jax.jit(exp.protocol.init)(jax.random.key(0), exp.data)
  assert {leaf.dtype for leaf in jax.tree.leaves(state.nodes.params)} == {np.dtype('bfloat16')}
  before = [np.asarray(l, np.float32) for l in jax.tree.leaves(exp.protocol.model(state))]
  state, _ = simulate.compile_chunk(exp.protocol, state, exp.data, 2)(state, exp.data)
  after = jax.tree.leaves(exp.protocol.model(state))
  assert {leaf.dtype for leaf in after} == {np.dtype('bfloat16')}
  assert any(np.abs(np.asarray(a, np.float32) - b).max() > 0 for a, b in zip(after, before))
  assert exps['bfloat16'].learner.model_bytes() * 2 == exps['float32'].learner.model_bytes()
  f32, bf16 = summaries['float32'], summaries['bfloat16']
  assert bf16['bytes_total'] * 2 == f32['bytes_total'] > 0
  assert math.isfinite(bf16['final_accuracy'])
  assert abs(bf16['final_accuracy'] - f32['final_accuracy']) < 0.05
  # Every run reports its peak memory and where it came from.
  assert bf16['peak_memory_bytes'] > 10 * 2**20  # at least the JAX runtime
  assert bf16['peak_memory_source'] in ('host ru_maxrss', 'device peak_bytes_in_use')
  assert bf16['devices'] == 1


def test_bytes_per_node():
  tree = {'a': np.zeros((5, 3, 2), np.float32), 'b': np.zeros((5,), np.int32)}
  assert sharding.bytes_per_node(tree) == 3 * 2 * 4 + 4


def test_state_shardings_split_exactly_the_node_leaves(tiny_config):
  exp = experiment.build(_tiny(tiny_config))  # FedAvg, N=20: no server weight has a dim of 20
  shapes = jax.eval_shape(exp.protocol.init, jax.random.key(0), exp.data)
  mesh = sharding.make_mesh(1)
  split = jax.tree.map(lambda s: s.spec == P('nodes'), sharding.state_shardings(shapes, mesh))
  # FedAvg's rows are the s clients in flight, not one per node: replicated.
  assert jax.tree.leaves(split.nodes.params) and not any(jax.tree.leaves(split.nodes.params))
  assert split.available and not split.round and not split.clock
  assert not any(jax.tree.leaves(split.extra))  # the server model is replicated
  dpsgd = experiment.build(dataclasses.replace(_tiny(tiny_config), protocol='dpsgd'))
  shapes = jax.eval_shape(dpsgd.protocol.init, jax.random.key(0), dpsgd.data)
  split = jax.tree.map(lambda s: s.spec == P('nodes'), sharding.state_shardings(shapes, mesh))
  assert jax.tree.leaves(split.nodes.params) and all(jax.tree.leaves(split.nodes.params))
  data_split = jax.tree.map(lambda s: s.spec == P('nodes'), sharding.data_shardings(exp.data, mesh))
  assert data_split.idx and data_split.sizes and not data_split.x and not data_split.y
