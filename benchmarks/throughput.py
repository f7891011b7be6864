r"""Node-steps per second of decsim's vectorised round against a per-node jitted loop.

Both run the same D-PSGD round (1 local SGD step of batch 32 per node, then
Metropolis-Hastings averaging on a random 4-regular graph) on random
MNIST-shaped data, in the same process.

  python -m benchmarks.throughput --quick --json=runs/bench.json
  python -m benchmarks.throughput --models=lenet --nodes=100 --node_chunks=1,2,4,8,16
"""

import json
import time

import jax
from absl import app, flags

from benchmarks import baseline_loop, common
from decsim import simulate
from decsim.protocols.base import init_params
from decsim.topology import build_topology

flags.DEFINE_list('models', ['logistic', 'mlp', 'lenet'], 'Models to time.')
flags.DEFINE_list('nodes', ['100', '1000'], 'Node counts N.')
flags.DEFINE_list('protocols', ['dpsgd'], 'dpsgd and/or fedavg (s=10 sampled clients).')
flags.DEFINE_list('node_chunks', ['-1'], 'Vectorisation settings to compare (-1 auto, 0 vmap).')
flags.DEFINE_integer('rounds', 5, 'Rounds per timed chunk (vmap).')
flags.DEFINE_bool('loop', True, 'Also time the per-node loop baseline.')
flags.DEFINE_bool('quick', False, 'Logistic and MLP at N=100 and 1000 only.')
flags.DEFINE_string('json', None, 'Write {"machine", "records"} here.')
FLAGS = flags.FLAGS


def time_vmap(protocol_name, model, nodes, node_chunk, rounds):
  from decsim import experiment
  config, learner, data = common.workload(model, nodes, node_chunk=node_chunk,
                                          protocol=protocol_name)
  protocol = experiment.make_protocol(config, learner)
  state = jax.jit(protocol.init)(jax.random.key(0), data)
  t = time.perf_counter()
  chunk = jax.jit(simulate.make_chunk(protocol, rounds)).lower(state, data).compile()
  compile_seconds = time.perf_counter() - t
  seconds = common.timed(lambda s: chunk(s, data)[0], state, repeats=2) / rounds
  trained = nodes if protocol_name == 'dpsgd' else config.sample_size
  return {'protocol': protocol_name, 'model': model, 'nodes': nodes, 'mode': 'vmap',
          'node_chunk': learner.node_chunk, 'round_seconds': seconds,
          'rounds_per_second': 1 / seconds, 'node_steps_per_second': trained / seconds,
          'compile_seconds': compile_seconds}


def time_loop(model, nodes):
  config, learner, data = common.workload(model, nodes)
  topology = build_topology('kregular', nodes, degree=config.degree, seed=0)
  models = baseline_loop.unstack(init_params(learner, jax.random.key(0), nodes), nodes)
  opts = [learner.tx.init(m) for m in models]
  round_ = baseline_loop.make_loop_dpsgd_round(learner, data, topology)
  round_(models, opts, 0)  # compile the per-node step and the average
  t = time.perf_counter()
  jax.block_until_ready(round_(models, opts, 1))
  seconds = time.perf_counter() - t
  return {'protocol': 'dpsgd', 'model': model, 'nodes': nodes, 'mode': 'loop_jax',
          'round_seconds': seconds, 'rounds_per_second': 1 / seconds,
          'node_steps_per_second': nodes / seconds, 'compile_seconds': None}


def main(argv):
  del argv
  models = ['logistic', 'mlp'] if FLAGS.quick else FLAGS.models
  records = []
  print(f'{"protocol":8} {"model":9} {"N":>6} {"mode":9} {"chunk":>5} {"node-steps/s":>13} '
        f'{"rounds/s":>9} {"compile s":>9} {"x loop":>7}', flush=True)
  for model in models:
    for nodes in map(int, FLAGS.nodes):
      loop = time_loop(model, nodes) if FLAGS.loop else None
      if loop:
        records.append(loop)
        print(f'{"dpsgd":8} {model:9} {nodes:6} {"loop_jax":9} {"":>5} '
              f'{loop["node_steps_per_second"]:13.0f} {loop["rounds_per_second"]:9.2f}', flush=True)
      for protocol_name in FLAGS.protocols:
        for chunk in map(int, FLAGS.node_chunks):
          rec = time_vmap(protocol_name, model, nodes, chunk, FLAGS.rounds)
          if loop and protocol_name == 'dpsgd':
            rec['speedup_vs_loop'] = rec['node_steps_per_second'] / loop['node_steps_per_second']
          records.append(rec)
          print(f'{protocol_name:8} {model:9} {nodes:6} {"vmap":9} {rec["node_chunk"]:5} '
                f'{rec["node_steps_per_second"]:13.0f} {rec["rounds_per_second"]:9.2f} '
                f'{rec["compile_seconds"]:9.2f} {rec.get("speedup_vs_loop", float("nan")):7.2f}',
                flush=True)
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump({'machine': common.machine(), 'records': records}, f, indent=2)


if __name__ == '__main__':
  app.run(main)
