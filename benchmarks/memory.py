r"""Measured bytes per node of a running round, and the largest N that fits a memory size.

Each (protocol, model, N) runs two compiled chunks of rounds in a fresh
subprocess and reports its peak memory (``simulate.peak_memory``: the device
allocator's peak on a GPU/TPU, the process's peak RSS on a CPU). The slope
between two node counts is the measured peak bytes per node (the runtime, data
and compiled code cancel out: every N gets the same 60,000 samples); ``N_max = (memory - intercept) / slope``.

  python -m benchmarks.memory --models=logistic,mlp,lenet --nodes=250,1000 \
      --json=runs/bench/memory.json
"""

import json
import subprocess
import sys

from absl import app, flags

flags.DEFINE_list('models', ['logistic', 'mlp', 'lenet'], 'Models.')
flags.DEFINE_list('protocols', ['dpsgd', 'fedavg'], 'Protocols.')
flags.DEFINE_list('nodes', ['250', '1000'], 'Two node counts for the slope.')
flags.DEFINE_string('param_dtype', 'float32', 'float32 or bfloat16.')
flags.DEFINE_list('targets_gib', ['24', '80'], 'Memory sizes to extrapolate to (GiB).')
flags.DEFINE_string('json', None, 'Write the records here.')
FLAGS = flags.FLAGS

_CHILD = r'''
import json, sys, jax
from benchmarks import common
from decsim import experiment, sharding, simulate
protocol_name, model, nodes, dtype = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
spn = -(-common.MAX_SAMPLES // nodes)  # the same 60,000 samples at every N: only nodes differ
config, learner, data = common.workload(model, nodes, protocol=protocol_name, param_dtype=dtype,
                                        samples_per_node=spn)
config = common.replace(config, momentum=0.9)  # the default run: momentum state included
learner, _ = experiment.make_learner(config, common.random_dataset(
    common.INPUT_SHAPES[model], 8, vocabulary=common.VOCABULARY.get(model)))
protocol = experiment.make_protocol(config, learner)
state = jax.jit(protocol.init)(jax.random.key(0), data)
# Bytes of the state's node axis: leaves with N rows (FedAvg's s rows in flight are not per node).
per_node = sharding.bytes_per_node([l for l in jax.tree.leaves(state)
                                    if getattr(l, 'ndim', 0) and l.shape[0] == nodes])
chunk = simulate.compile_chunk(protocol, state, data, 2)
for _ in range(2):
  state, _ = chunk(state, data)
jax.block_until_ready(state)
peak, source = simulate.peak_memory()
print(json.dumps({'peak_bytes': peak, 'source': source, 'state_bytes_per_node': per_node}))
'''


def measure(protocol, model, nodes, dtype):
  proc = subprocess.run([sys.executable, '-c', _CHILD, protocol, model, str(nodes), dtype],
                        capture_output=True, text=True, timeout=1200)
  if proc.returncode:
    raise RuntimeError(proc.stderr[-2000:])
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  lo, hi = map(int, FLAGS.nodes)
  records = []
  print(f'{"protocol":8} {"model":9} {"param":8} {"state B/node":>12} {"peak B/node":>12} '
        + ' '.join(f'{"N max " + t + " GiB":>14}' for t in FLAGS.targets_gib), flush=True)
  for model in FLAGS.models:
    for protocol in FLAGS.protocols:
      a, b = measure(protocol, model, lo, FLAGS.param_dtype), measure(protocol, model, hi,
                                                                       FLAGS.param_dtype)
      # The node state must be resident: below it the slope is RSS noise (small models;
      # FedAvg's state per node is now its byte counters and availability only).
      slope = max((b['peak_bytes'] - a['peak_bytes']) / (hi - lo), a['state_bytes_per_node'])
      intercept = a['peak_bytes'] - slope * lo
      fits = {t: int((float(t) * 2**30 - intercept) / slope) for t in FLAGS.targets_gib}
      rec = {'protocol': protocol, 'model': model, 'param_dtype': FLAGS.param_dtype,
             'nodes': [lo, hi], 'peak_bytes': [a['peak_bytes'], b['peak_bytes']],
             'source': a['source'], 'state_bytes_per_node': a['state_bytes_per_node'],
             'peak_bytes_per_node': slope, 'intercept_bytes': intercept,
             'max_nodes': fits}
      records.append(rec)
      print(f'{protocol:8} {model:9} {FLAGS.param_dtype:8} {a["state_bytes_per_node"]:12,} '
            f'{slope:12,.0f} ' + ' '.join(f'{fits[t]:14,}' for t in FLAGS.targets_gib),
            flush=True)
  if FLAGS.json:
    import pathlib
    pathlib.Path(FLAGS.json).parent.mkdir(parents=True, exist_ok=True)
    with open(FLAGS.json, 'w') as f:
      json.dump({'records': records}, f, indent=2)


if __name__ == '__main__':
  app.run(main)
