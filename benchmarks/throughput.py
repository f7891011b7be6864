r"""Throughput of decsim's rounds against per-node loops: protocol x model x N.

Every record is one (protocol, model, N, mode): ``vmap`` is decsim's compiled
chunk of rounds (the entry point ``simulate.run`` uses: AOT-compiled, state
donated), ``loop_jax`` a Python loop over nodes of a jitted single-node step
(fedjax's default backend), ``loop_torch`` a PyTorch module-per-node loop
(decentralizepy, gossipy; only when torch is installed), all measured in the
same process on the same workload: ``--local_steps`` SGD steps of batch 32 per
trained node on random MNIST-shaped data (32x32x3 for ``gn_lenet`` and the GN-ResNets,
40 random character ids for ``char_lstm``); D-PSGD mixes on a random 4-regular
graph with Metropolis-Hastings weights, FedAvg trains s=10 sampled clients.
``node_steps_per_second`` counts the optimiser steps of the nodes that trained
(N for D-PSGD, s for FedAvg); compile time is reported separately.

A configuration runs only when its estimated memory fits ``--memory_fraction``
of the device's (or host's) free memory; the others are recorded as skipped.

  python -m benchmarks.throughput --quick --json=runs/bench/quick.json
  python -m benchmarks.throughput --models=logistic,mlp,lenet --nodes=100,1000,4000,10000 \
      --json=runs/bench/full.json
  python -m benchmarks.throughput --models=lenet --nodes=100 --node_chunks=1,2,4,8,16 --modes=vmap
  python -m benchmarks.throughput --models=gn_resnet8,char_lstm --nodes=8 --protocols=dpsgd \
      --node_chunks=0,1,2,4 --rounds=1 --repeats=2 --modes=vmap,loop_jax   # CIFAR and text
"""

import json
import time

import jax
import numpy as np
from absl import app, flags

from benchmarks import baseline_loop, common
from decsim import experiment, mixing, sharding, simulate
from decsim.protocols.base import init_params
from decsim.topology import build_topology

flags.DEFINE_list('models', ['logistic', 'mlp', 'lenet'], 'Models to time (any --model: also '
                  'gn_lenet, gn_resnet8, gn_resnet18, char_lstm).')
flags.DEFINE_list('nodes', ['100', '1000', '4000', '10000'], 'Node counts N.')
flags.DEFINE_list('protocols', ['dpsgd', 'fedavg'], 'dpsgd, fedavg (s=10 clients) and/or '
                  'modest (s=10, a=1; no loop baseline; modest_local: per-node views).')
flags.DEFINE_list('modes', ['vmap', 'loop_jax', 'loop_torch'],
                  'vmap (decsim), loop_jax, loop_torch (skipped when torch is missing).')
flags.DEFINE_bool('loop', True, 'Time the loop baselines of --modes (--noloop: vmap only).')
flags.DEFINE_list('node_chunks', ['-1'], 'Vectorisation settings to compare (-1 auto, 0 vmap).')
flags.DEFINE_integer('rounds', 5, 'Rounds per timed compiled chunk (vmap).')
flags.DEFINE_integer('repeats', 3, 'Timed chunks (vmap) or rounds (loops); the median is kept.')
flags.DEFINE_integer('local_steps', 1, 'Local SGD steps per trained node per round.')
flags.DEFINE_integer('loop_max_nodes', 1000, 'Loop baselines only up to this N (they are slow).')
flags.DEFINE_integer('torch_threads', 0, 'loop_torch threads (0: torch default; 1 on a busy host).')
flags.DEFINE_string('param_dtype', 'float32', 'float32 or bfloat16 node params (vmap).')
flags.DEFINE_float('memory_fraction', 0.6, 'Run a configuration only if its estimated peak '
                   'fits this fraction of free memory.')
flags.DEFINE_bool('quick', False, 'Logistic and MLP at N=100 and 1000, FedAvg and D-PSGD.')
flags.DEFINE_string('json', None, 'Write {"machine", "records"} here.')
FLAGS = flags.FLAGS

# Peak memory of a D-PSGD round in multiples of the node state (params + optimiser
# state): the donated state, the trained copy, the mixed copy and the gradients.
# FedAvg touches s rows and keeps the N node rows once.
STATE_COPIES = {'dpsgd': 4.0, 'fedavg': 1.2, 'modest': 1.2, 'modest_local': 1.2}


def _protocol(name: str) -> dict:
  """workload() arguments of a benchmarked protocol name."""
  if name == 'modest_local':
    return {'protocol': 'modest', 'views': 'local'}
  return {'protocol': name}


def _record(protocol, model, nodes, mode, seconds, trained, **extra):
  return {'protocol': protocol, 'model': model, 'nodes': nodes, 'mode': mode,
          'round_seconds': seconds, 'rounds_per_second': 1 / seconds,
          'node_steps_per_second': trained * FLAGS.local_steps / seconds, **extra}


def estimate_bytes(protocol_name, model, nodes) -> tuple[int, int]:
  """(estimated peak bytes, node-state bytes per node) from shapes only."""
  config, learner, data = common.workload(model, 8, param_dtype=FLAGS.param_dtype,
                                          **_protocol(protocol_name))
  protocol = experiment.make_protocol(config, learner)
  shapes = jax.eval_shape(protocol.init, jax.random.key(0), data)
  per_node = sharding.bytes_per_node(shapes.nodes)
  if protocol_name == 'modest_local':  # three [N, N] int32 view matrices
    per_node += 12 * nodes
  samples = min(nodes * 64, common.MAX_SAMPLES)
  data_bytes = samples * int(np.prod(common.INPUT_SHAPES[model])) * 4
  return int(STATE_COPIES[protocol_name] * per_node * nodes + data_bytes), per_node


def time_vmap(protocol_name, model, nodes, node_chunk):
  config, learner, data = common.workload(model, nodes, node_chunk=node_chunk,
                                          local_steps=FLAGS.local_steps,
                                          param_dtype=FLAGS.param_dtype, **_protocol(protocol_name))
  protocol = experiment.make_protocol(config, learner)
  state = jax.jit(protocol.init)(jax.random.key(0), data)
  t = time.perf_counter()
  chunk = simulate.compile_chunk(protocol, state, data, FLAGS.rounds)
  compile_seconds = time.perf_counter() - t
  state, _ = chunk(state, data)  # warm-up
  jax.block_until_ready(state)
  times = []
  for _ in range(FLAGS.repeats):
    t = time.perf_counter()
    state, _ = chunk(state, data)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t)
  seconds = float(np.median(times)) / FLAGS.rounds
  trained = nodes if protocol_name == 'dpsgd' else config.sample_size
  return _record(protocol_name, model, nodes, 'vmap', seconds, trained,
                 node_chunk=learner.node_chunk, compile_seconds=compile_seconds,
                 param_dtype=FLAGS.param_dtype,
                 mixing=(('dense' if mixing.use_dense(nodes, config.degree + 1) else 'sparse')
                         if protocol_name == 'dpsgd' else None))


def _median_round(round_fn, args_fn) -> float:
  times = []
  for r in range(FLAGS.repeats):
    t = time.perf_counter()
    jax.block_until_ready(round_fn(*args_fn(r + 1)))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def time_loop_jax(protocol_name, model, nodes):
  config, learner, data = common.workload(model, nodes, protocol=protocol_name,
                                          local_steps=FLAGS.local_steps)
  if protocol_name == 'dpsgd':
    topology = build_topology('kregular', nodes, degree=config.degree, seed=0)
    models = baseline_loop.unstack(init_params(learner, jax.random.key(0), nodes), nodes)
    opts = [learner.tx.init(m) for m in models]
    round_ = baseline_loop.make_loop_dpsgd_round(learner, data, topology)
    t = time.perf_counter()
    jax.block_until_ready(round_(models, opts, 0))  # compiles the per-node step and the average
    compile_seconds = time.perf_counter() - t
    seconds = _median_round(round_, lambda r: (models, opts, r))
    trained = nodes
  else:
    params = learner.init_params(jax.random.key(0))
    round_ = baseline_loop.make_loop_fedavg_round(learner, data, config.sample_size)
    t = time.perf_counter()
    jax.block_until_ready(round_(params, 0))
    compile_seconds = time.perf_counter() - t
    seconds = _median_round(round_, lambda r: (params, r))
    trained = config.sample_size
  return _record(protocol_name, model, nodes, 'loop_jax', seconds, trained,
                 compile_seconds=compile_seconds)


def time_loop_torch(protocol_name, model, nodes):
  config, _, data = common.workload(model, nodes, protocol=protocol_name)
  loop = baseline_loop.TorchLoop(model, common.INPUT_SHAPES[model], np.asarray(data.x),
                                 np.asarray(data.y), np.asarray(data.idx),
                                 np.asarray(data.sizes), local_steps=FLAGS.local_steps,
                                 threads=FLAGS.torch_threads)
  if protocol_name == 'dpsgd':
    topology = build_topology('kregular', nodes, degree=config.degree, seed=0)
    idx, w = np.asarray(topology.idx), np.asarray(topology.weights)
    fn = lambda: loop.dpsgd_round(idx, w)
    trained = nodes
  else:
    fn = lambda: loop.fedavg_round(config.sample_size)
    trained = config.sample_size
  fn()  # warm-up (allocator, threads)
  times = []
  for _ in range(FLAGS.repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  import torch
  return _record(protocol_name, model, nodes, 'loop_torch', float(np.median(times)), trained,
                 compile_seconds=None, torch_threads=torch.get_num_threads())


HEADER = (f'{"protocol":8} {"model":9} {"N":>6} {"mode":10} {"chunk":>5} {"node-steps/s":>13} '
          f'{"rounds/s":>9} {"compile s":>9} {"vs loop_jax":>11} {"vs torch":>8}')


def row(rec) -> str:
  if rec.get('skipped'):
    return f'{rec["protocol"]:8} {rec["model"]:9} {rec["nodes"]:6} {rec["mode"]:10} skipped: {rec["skipped"]}'
  compile_s = '' if rec.get('compile_seconds') is None else f'{rec["compile_seconds"]:.2f}'
  chunk = '' if rec.get('node_chunk') is None else str(rec['node_chunk'])
  ratio = lambda k: f'{rec[k]:.2f}x' if k in rec else ''
  return (f'{rec["protocol"]:8} {rec["model"]:9} {rec["nodes"]:6} {rec["mode"]:10} {chunk:>5} '
          f'{rec["node_steps_per_second"]:13.0f} {rec["rounds_per_second"]:9.2f} {compile_s:>9} '
          f'{ratio("speedup_vs_loop_jax"):>11} {ratio("speedup_vs_loop_torch"):>8}')


def run_suite(models, nodes_list, protocols, modes, node_chunks, log=print) -> list[dict]:
  limit, source = common.available_memory_bytes()
  budget = FLAGS.memory_fraction * limit
  has_torch = baseline_loop.torch_available()
  records = []
  log(HEADER)
  for model in models:
    for protocol_name in protocols:
      for nodes in nodes_list:
        need, per_node = estimate_bytes(protocol_name, model, nodes)
        base = {'protocol': protocol_name, 'model': model, 'nodes': nodes}
        if need > budget:
          rec = {**base, 'mode': 'vmap', 'skipped': f'needs ~{need / 2**30:.1f} GiB > '
                 f'{budget / 2**30:.1f} GiB ({FLAGS.memory_fraction} x {source})',
                 'state_bytes_per_node': per_node}
          records.append(rec)
          log(row(rec))
          continue
        baselines = {}
        for mode in modes:
          if (mode == 'vmap' or nodes > FLAGS.loop_max_nodes or not FLAGS.loop
              or protocol_name.startswith('modest')):
            continue
          if mode == 'loop_torch' and (not has_torch or model not in ('logistic', 'mlp', 'lenet')):
            continue
          fn = time_loop_jax if mode == 'loop_jax' else time_loop_torch
          rec = fn(protocol_name, model, nodes)
          baselines[mode] = rec
          records.append(rec)
          log(row(rec))
        if 'vmap' in modes:
          for chunk in node_chunks:
            rec = time_vmap(protocol_name, model, nodes, chunk)
            rec['state_bytes_per_node'] = per_node
            rec['estimated_peak_bytes'] = need
            for mode, b in baselines.items():
              rec[f'speedup_vs_{mode}'] = b['round_seconds'] / rec['round_seconds']
            records.append(rec)
            log(row(rec))
  return records


def main(argv):
  del argv
  if FLAGS.quick:
    models, nodes_list, protocols = ['logistic', 'mlp'], [100, 1000], ['fedavg', 'dpsgd']
  else:
    models, nodes_list, protocols = FLAGS.models, list(map(int, FLAGS.nodes)), FLAGS.protocols
  print(f'# {common.machine()}', flush=True)
  records = run_suite(models, nodes_list, protocols, FLAGS.modes,
                      list(map(int, FLAGS.node_chunks)), log=lambda s: print(s, flush=True))
  if FLAGS.json:
    import pathlib
    pathlib.Path(FLAGS.json).parent.mkdir(parents=True, exist_ok=True)
    with open(FLAGS.json, 'w') as f:
      json.dump({'machine': common.machine(), 'records': records}, f, indent=2)
    print(f'wrote {FLAGS.json}')


if __name__ == '__main__':
  app.run(main)
