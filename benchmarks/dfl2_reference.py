"""decsim's gossip (``--gossip_mode=dfl2``) beside the vanishing-variance authors' simulator.

DFL2 (github.com/twoentartian/DFL2, ``DFL_simulator_opti``) is the measuring instrument:
built by ``/work/shared/reference/dfl2/build.sh``, fed the synthetic MNIST-format images of
that folder's ``gen.py``, configured by its ``make_config.py``. decsim runs the same setting
from the same idx files: N nodes on a ring (bilateral i--i+1 edges), every node training one
batch of 64 every tick (DFL2's ``training_interval_tick = [1]``; decsim: ``wake='fixed'``,
one-second period and tick, a network with no delay), pushing to both neighbours, merging
0.5 self + 0.5 mean(buffer) once it holds ``buffer`` models; caffe's MNIST LeNet (conv 20,
conv 50, ip 500, ip 10, Xavier-uniform weights, zero biases; written here in flax) with SGD
lr 0.01, momentum 0.9; every node samples batches from the whole training set (DFL2's
``dataset_mode = default``). Each side runs without correction (DFL2's method ``self``, a
no-op) and with it (``others`` / decsim's 'received').

Reported every ``--interval`` ticks: the mean over nodes of each layer's weight variance after
the tick's merges (DFL2's ``model_weight_var.csv`` rows t.9) and the nodes' mean test
accuracy. Writes ``dfl2_reference.json`` and the plot ``docs/results/dfl2_reference.png``.

  python benchmarks/dfl2_reference.py --dfl2_dir /work/dfl2/DFL2 --work /work/dfl2/cmp
"""

import argparse
import csv
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from decsim import experiment, mixing
from decsim.data.sampler import NodeData
from decsim.data.sources import ArrayDataset
from decsim.experiment import ExperimentConfig
from decsim.network import uniform_network
from decsim.protocols.gossip import gossip
from decsim.topology import build_topology

REFERENCE = pathlib.Path('/work/shared/reference/dfl2')
LAYERS = ('conv1', 'conv2', 'ip1', 'ip2')
VARIANTS = {'novc': ('self', None), 'vc': ('others', 'received')}  # DFL2 method, decsim target


class CaffeLeNet(nn.Module):
  """Caffe's MNIST LeNet (DFL2's ``lenet_train_memory.prototxt``): no activation after the
  convolutions, ReLU after ip1; Xavier (fan-in, uniform) weights, zero biases."""

  @nn.compact
  def __call__(self, x):
    xavier = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')
    x = nn.Conv(20, (5, 5), padding='VALID', kernel_init=xavier, name='conv1')(x)
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.Conv(50, (5, 5), padding='VALID', kernel_init=xavier, name='conv2')(x)
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Dense(500, kernel_init=xavier, name='ip1')(x.reshape((x.shape[0], -1))))
    return nn.Dense(10, kernel_init=xavier, name='ip2')(x)


def read_idx(path: pathlib.Path) -> np.ndarray:
  raw = path.read_bytes()
  dims = raw[3]
  shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], 'big') for i in range(dims))
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_images(data: pathlib.Path) -> ArrayDataset:
  """The idx files as decsim arrays, scaled by 1/256 as caffe's ``scale: 0.00390625``."""
  x = lambda name: (read_idx(data / name).astype(np.float32) / 256.0)[..., None]
  y = lambda name: read_idx(data / name).astype(np.int32)
  return ArrayDataset('dfl2_synthetic', x('train-images.idx3-ubyte'),
                      y('train-labels.idx1-ubyte'), x('t10k-images.idx3-ubyte'),
                      y('t10k-labels.idx1-ubyte'), 10)


# ------------------------------------------------------------------ DFL2 side


def run_dfl2(a, data: pathlib.Path, name: str, method: str) -> pathlib.Path:
  """One DFL2 run (reused when its output exists); returns its output folder."""
  d = a.work / 'dfl2' / name
  done = sorted(d.glob('20*/model_weight_var.csv'))
  if done and not a.rerun:
    return done[-1].parent
  d.mkdir(parents=True, exist_ok=True)
  solver = data / 'lenet_solver_abs.prototxt'
  text = (REFERENCE / 'lenet_solver.prototxt.in').read_text()
  solver.write_text(text.replace('@DFL2_DIR@', str(a.dfl2_dir)).replace('@WORK@', str(data)))
  (data / 'snap').mkdir(exist_ok=True)
  subprocess.run([sys.executable, str(REFERENCE / 'make_config.py'), '--nodes', str(a.nodes),
                  '--degree', '2', '--buffer', str(a.buffer), '--ticks', str(a.ticks),
                  '--interval', str(a.interval), '--data', str(data), '--solver', str(solver),
                  '--algo', 'train_average_standard', '--vc_method', method],
                 cwd=d, check=True, stdout=subprocess.DEVNULL)
  env = dict(os.environ, OPENBLAS_NUM_THREADS='1', GOTO_NUM_THREADS='1', OMP_NUM_THREADS='1')
  t0 = time.time()
  with open(d / 'stdout.txt', 'w') as out, open(d / 'stderr.txt', 'w') as err:
    subprocess.run([str(a.dfl2_dir / 'build/bin/simulation/DFL_simulator_opti')], cwd=d,
                   env=env, stdout=out, stderr=err, check=True, timeout=3600)
  print(f'[dfl2] {name}: {time.time() - t0:.0f} s', flush=True)
  return sorted(d.glob('20*/model_weight_var.csv'))[-1].parent


def dfl2_curves(out: pathlib.Path) -> dict:
  """{tick: {'accuracy': mean over nodes, layer: mean weight variance after averaging}}."""
  curves: dict[int, dict] = {}
  rows = list(csv.reader(open(out / 'model_weight_var.csv')))
  header = rows[0]
  for row in rows[1:]:
    if not row[0].endswith('.9'):
      continue
    tick = int(float(row[0]))
    curves.setdefault(tick, {})
    for layer in LAYERS:
      vals = [float(v) for h, v in zip(header, row) if h.endswith('-' + layer) and v != '']
      curves[tick][layer] = statistics.mean(vals)
  acc = list(csv.reader(open(out / 'accuracy.csv')))
  for row in acc[1:]:
    curves.setdefault(int(float(row[0])), {})['accuracy'] = statistics.mean(map(float, row[1:]))
  return curves


# ------------------------------------------------------------------ decsim side


def run_decsim(a, dataset: ArrayDataset, target: str | None) -> dict:
  """decsim's dfl2-mode gossip on the same setting; the same curves as ``dfl2_curves``."""
  n = a.nodes
  c = ExperimentConfig(protocol='gossip', nodes=n, init='independent', optimizer='sgd', lr=0.01,
                       momentum=0.9, batch_size=64, local_steps=1, seed=a.seed, node_chunk=0)
  learner, apply_fn = experiment.make_learner(c, dataset, module=CaffeLeNet())
  m = len(dataset.y_train)
  data = NodeData(x=jnp.asarray(dataset.x_train), y=jnp.asarray(dataset.y_train),
                  idx=jnp.tile(jnp.arange(m, dtype=jnp.int32), (n, 1)),
                  sizes=jnp.full((n,), m, jnp.int32))
  vc = None if target is None else mixing.VarianceCorrection(target=target)
  protocol = gossip(learner, nodes=n, topology=build_topology('ring', n), peers='all_neighbours',
                    merge='half', wake='fixed', period_seconds=1.0, tick_seconds=1.0,
                    buffer_size=a.buffer, variance_correction=vc,
                    network=uniform_network(n, latency=0.0, speed=1e9))
  x_test, y_test = jnp.asarray(dataset.x_test), jnp.asarray(dataset.y_test)

  @jax.jit
  def measure(params):
    logits = jax.vmap(apply_fn, (0, None))(params, x_test)  # [N, T, 10]
    acc = jnp.mean(jnp.argmax(logits, -1) == y_test[None], axis=1)  # [N]
    var = mixing.layer_variance(params)
    return jnp.mean(acc), {k.split('/')[0]: jnp.mean(v) for k, v in
                           zip(mixing.layer_names(params), jax.tree.leaves(var))
                           if k.endswith('kernel')}

  state = protocol.init(jax.random.key(a.seed), data)
  step = jax.jit(protocol.round)
  curves = {}
  for tick in range(a.ticks + 1):
    state, _ = step(state, data)
    if tick % a.interval == 0:
      acc, var = measure(state.nodes.params)
      curves[tick] = {'accuracy': float(acc), **{k: float(v) for k, v in var.items()}}
  curves['merges'] = int(state.extra.merges)
  return curves


def decsim_cached(a, dataset: ArrayDataset, name: str, target: str | None) -> dict:
  """``run_decsim``'s curves, kept in the work folder (reused unless ``--rerun``)."""
  path = a.work / f'decsim_{name}_n{a.nodes}_b{a.buffer}_t{a.ticks}_s{a.seed}.json'
  if path.exists() and not a.rerun:
    raw = json.loads(path.read_text())
    return {int(k) if k.isdigit() else k: v for k, v in raw.items()}
  if a.report_only:
    return None
  t0 = time.time()
  curves = run_decsim(a, dataset, target)
  print(f'[decsim] {name}: {time.time() - t0:.0f} s', flush=True)
  path.write_text(json.dumps(curves))
  return curves


# ------------------------------------------------------------------ report


def table(results: dict) -> str:
  lines = ['| variant | tick | layer | DFL2 | decsim | decsim / DFL2 |', '|---|---|---|---|---|---|']
  for name in VARIANTS:
    if name not in results['decsim']:
      continue
    ref, ours = results['dfl2'][name], results['decsim'][name]
    for tick in sorted(t for t in ref if t in ours):
      for key in LAYERS + ('accuracy',):
        if key in ref[tick] and key in ours[tick]:
          r, o = ref[tick][key], ours[tick][key]
          fmt = '.3f' if key == 'accuracy' else '.3e'
          lines.append(f'| {name} | {tick} | {key} | {r:{fmt}} | {o:{fmt}} | {o / r:.3f} |')
  return '\n'.join(lines)


def plot(results: dict, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 1 + len(LAYERS), figsize=(4 * (1 + len(LAYERS)), 3.2))
  for side, style in (('dfl2', '-'), ('decsim', '--')):
    for name, color in (('novc', 'C0'), ('vc', 'C1')):
      if name not in results[side]:
        continue
      curve = results[side][name]
      ticks = sorted(t for t in curve if isinstance(t, int))
      for ax, key in zip(axes, ('accuracy',) + LAYERS):
        ax.plot(ticks, [curve[t].get(key, np.nan) for t in ticks], style, color=color,
                label=f'{side} {name}')
        ax.set_title(key if key == 'accuracy' else f'{key} weight variance')
        ax.set_xlabel('tick')
  for ax in axes[1:]:
    ax.set_yscale('log')
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--dfl2_dir', type=pathlib.Path, required=True, help='DFL2 tree built by build.sh')
  p.add_argument('--work', type=pathlib.Path, required=True, help='data and DFL2 runs go here')
  p.add_argument('--nodes', type=int, default=8)
  p.add_argument('--buffer', type=int, default=2)
  p.add_argument('--ticks', type=int, default=40)
  p.add_argument('--interval', type=int, default=5)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--rerun', action='store_true', help='rerun both even when outputs exist')
  p.add_argument('--report_only', action='store_true', help='table and plot of the kept runs')
  p.add_argument('--decsim_only', action='store_true', help='only run (and keep) decsim\'s side')
  p.add_argument('--plot', type=pathlib.Path, default=pathlib.Path('docs/results/dfl2_reference.png'))
  a = p.parse_args()
  data = a.work / 'data'
  data.mkdir(parents=True, exist_ok=True)
  if not (data / 'train-images.idx3-ubyte').exists():
    subprocess.run([sys.executable, str(REFERENCE / 'gen.py'), str(data), '6000', '1000'],
                   check=True)
  dataset = load_images(data)
  results = {'dfl2': {}, 'decsim': {}, 'setting': vars(a) | {'dfl2_dir': str(a.dfl2_dir),
                                                             'work': str(a.work),
                                                             'plot': str(a.plot)}}
  for name, (method, target) in VARIANTS.items():
    if not a.decsim_only:
      results['dfl2'][name] = dfl2_curves(run_dfl2(a, data, name, method))
    curves = decsim_cached(a, dataset, name, target)
    if curves is not None:
      results['decsim'][name] = curves
  if a.decsim_only:
    return
  print(table(results))
  (a.work / 'dfl2_reference.json').write_text(json.dumps(results, indent=1, default=str))
  plot(results, a.plot)


if __name__ == '__main__':
  main()
