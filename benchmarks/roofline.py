r"""This machine's rooflines and each workload's achieved fraction of them.

* matmul GFLOP/s: the best of square float32 ``jnp.dot`` (1024..4096), the
  compute ceiling a dense model's local step can reach;
* memory GB/s: ``y = 2 * x + 1`` over 256 MiB (bytes read + written / time), the
  ceiling of the mixing step, which is a weighted sum of gathered rows.

Then, per model and N, the vectorised *local step alone* (``train_nodes`` over
all N nodes, one SGD step of batch 32; FLOPs per node-step from XLA's cost
analysis of the single-node step) as a fraction of the matmul roofline, and the
sparse mixing step alone (k=5 slots of a 4-regular graph) as a fraction of the
memory roofline. ``--from_json`` adds the fraction achieved by every full round
recorded by ``benchmarks.throughput``.

  python -m benchmarks.roofline --models=logistic,mlp --nodes=1000 --json=runs/bench/roofline.json
  python -m benchmarks.roofline --from_json=runs/bench/quick.json
"""

import json
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from benchmarks import common
from decsim import mixing
from decsim.protocols.base import init_params, train_nodes
from decsim.rng import Stream, node_keys
from decsim.topology import build_topology

flags.DEFINE_list('models', ['logistic', 'mlp'], 'Models whose local step is measured.')
flags.DEFINE_list('nodes', ['1000'], 'Node counts N.')
flags.DEFINE_integer('repeats', 5, 'Timed repetitions; the best is kept (a roofline is a max).')
flags.DEFINE_string('from_json', None, 'A benchmarks.throughput JSON whose rounds to rate.')
flags.DEFINE_string('json', None, 'Write {"machine", "roofline", "records"} here.')
FLAGS = flags.FLAGS


def best_seconds(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return min(times)


def matmul_gflops(repeats: int) -> float:
  best = 0.0
  for n in (1024, 2048, 4096):
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    seconds = best_seconds(jax.jit(jnp.dot), a, a, repeats=repeats)
    best = max(best, 2 * n**3 / seconds / 1e9)
  return best


def memory_gbps(repeats: int) -> float:
  """Donated, so the output reuses the input's pages (a fresh 256 MiB output each call
  measured page faults, ~10x below the copy rate)."""
  x = jnp.ones((64 * 2**20,), jnp.float32)  # 256 MiB
  nbytes = x.nbytes
  fn = jax.jit(lambda x: 2 * x + 1, donate_argnums=0)
  x = jax.block_until_ready(fn(x))
  best = float('inf')
  for _ in range(repeats):
    t = time.perf_counter()
    x = jax.block_until_ready(fn(x))
    best = min(best, time.perf_counter() - t)
  return 2 * nbytes / best / 1e9


def step_flops(model: str) -> float:
  """FLOPs of one node's local step (batch 32), from XLA's cost analysis."""
  _, learner, data = common.workload(model, 8)
  params = learner.init_params(jax.random.key(0))
  opt = learner.tx.init(params)
  step = jax.jit(lambda p, o, k, i, s: learner.local_update(p, o, k, data.x, data.y, i, s))
  compiled = step.lower(params, opt, jax.random.key(0), data.idx[0], data.sizes[0]).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost['flops'])


def local_step(model: str, nodes: int, repeats: int) -> float:
  """Node-steps per second of the vectorised local step alone, all N nodes."""
  config, learner, data = common.workload(model, nodes)
  params = init_params(learner, jax.random.key(0), nodes)
  opt = jax.vmap(learner.tx.init)(params)
  keys = node_keys(jax.random.key(0), 0, jnp.arange(nodes), Stream.BATCH)
  fn = jax.jit(lambda p, o, k, d: train_nodes(learner, p, o, k, d).params)
  return nodes / best_seconds(fn, params, opt, keys, data, repeats=repeats)


def sparse_mix(model: str, nodes: int, repeats: int) -> tuple[float, float]:
  """(seconds, bytes moved) of one sparse mixing step of N models on a 4-regular graph."""
  _, learner, _ = common.workload(model, 8)
  params = init_params(learner, jax.random.key(0), nodes)
  topo = build_topology('kregular', nodes, degree=4, seed=0)
  k = topo.idx.shape[1]
  seconds = best_seconds(jax.jit(lambda p: mixing.mix_sparse(topo.idx, topo.weights, p)), params,
                         repeats=repeats)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
  return seconds, (k + 1) * state_bytes  # k gathered reads + one write


def main(argv):
  del argv
  peak = matmul_gflops(FLAGS.repeats)
  bandwidth = memory_gbps(FLAGS.repeats)
  print(f'# {common.machine()}')
  print(f'matmul roofline {peak:.1f} GFLOP/s   memory roofline {bandwidth:.1f} GB/s', flush=True)
  flops = {m: step_flops(m) for m in FLAGS.models}
  records = []
  print(f'{"workload":22} {"model":9} {"N":>6} {"node-steps/s":>13} {"GFLOP/s | GB/s":>15} '
        f'{"of roofline":>11}', flush=True)
  for model in FLAGS.models:
    for nodes in map(int, FLAGS.nodes):
      rate = local_step(model, nodes, FLAGS.repeats)
      gflops = rate * flops[model] / 1e9
      rec = {'workload': 'local_step', 'model': model, 'nodes': nodes,
             'node_steps_per_second': rate, 'flops_per_node_step': flops[model],
             'achieved_gflops': gflops, 'fraction_of_matmul_roofline': gflops / peak}
      records.append(rec)
      print(f'{"local step (vmap)":22} {model:9} {nodes:6} {rate:13.0f} {gflops:15.1f} '
            f'{gflops / peak:11.0%}', flush=True)
      seconds, moved = sparse_mix(model, nodes, FLAGS.repeats)
      gbps = moved / seconds / 1e9
      records.append({'workload': 'sparse_mix', 'model': model, 'nodes': nodes,
                      'seconds': seconds, 'bytes_moved': moved, 'achieved_gbps': gbps,
                      'fraction_of_memory_roofline': gbps / bandwidth})
      print(f'{"sparse mix k=5":22} {model:9} {nodes:6} {"":>13} {gbps:15.1f} '
            f'{gbps / bandwidth:11.0%}', flush=True)
  if FLAGS.from_json:
    with open(FLAGS.from_json) as f:
      rounds = json.load(f)['records']
    for r in rounds:
      if r.get('skipped') or r['model'] not in flops:
        continue
      gflops = r['node_steps_per_second'] * flops[r['model']] / 1e9
      rec = {'workload': f'{r["protocol"]} round', 'model': r['model'], 'nodes': r['nodes'],
             'mode': r['mode'], 'node_steps_per_second': r['node_steps_per_second'],
             'achieved_gflops': gflops, 'fraction_of_matmul_roofline': gflops / peak}
      records.append(rec)
      print(f'{r["protocol"] + " round " + r["mode"]:22} {r["model"]:9} {r["nodes"]:6} '
            f'{r["node_steps_per_second"]:13.0f} {gflops:15.1f} {gflops / peak:11.0%}', flush=True)
  if FLAGS.json:
    import pathlib
    pathlib.Path(FLAGS.json).parent.mkdir(parents=True, exist_ok=True)
    with open(FLAGS.json, 'w') as f:
      json.dump({'machine': common.machine(),
                 'roofline': {'matmul_gflops': peak, 'memory_gbps': bandwidth},
                 'records': records}, f, indent=2)
    print(f'wrote {FLAGS.json}')


if __name__ == '__main__':
  app.run(main)
