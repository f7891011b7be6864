"""The benchmark suite runs from the command line and writes the documented JSON records."""

import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), '..')


def test_throughput_writes_records_for_every_mode(tmp_path):
  out = tmp_path / 'bench.json'
  proc = subprocess.run(
      [sys.executable, '-m', 'benchmarks.throughput', '--models=logistic', '--nodes=8',
       '--protocols=dpsgd,fedavg', '--modes=vmap,loop_jax,loop_torch', '--rounds=1',
       '--repeats=1', '--torch_threads=1', f'--json={out}'],
      capture_output=True, text=True, timeout=300, cwd=ROOT,
      env=dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT))
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = json.loads(out.read_text())['records']
  try:
    import torch  # noqa: F401
    modes = {'vmap', 'loop_jax', 'loop_torch'}
  except ImportError:
    modes = {'vmap', 'loop_jax'}
  for protocol in ('dpsgd', 'fedavg'):
    got = {r['mode']: r for r in records if r['protocol'] == protocol}
    assert set(got) == modes
    for r in got.values():
      assert r['model'] == 'logistic' and r['nodes'] == 8
      assert r['node_steps_per_second'] > 0 and r['rounds_per_second'] > 0
      assert 'compile_seconds' in r
    assert got['vmap']['compile_seconds'] > 0 and 'speedup_vs_loop_jax' in got['vmap']
  # FedAvg trains s = min(10, N) = 8 clients per round, D-PSGD all 8 nodes.
  vm = {r['protocol']: r for r in records if r['mode'] == 'vmap'}
  for r in vm.values():
    assert abs(r['node_steps_per_second'] / r['rounds_per_second'] - 8) < 1e-6
  assert 'vmap' in proc.stdout and 'node-steps/s' in proc.stdout
