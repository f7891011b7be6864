r"""Population scale (issue 16): FedAvg's and MoDeST's round time and peak memory from 10^3 to
10^7 clients.

Every (protocol, model, N) runs in a fresh subprocess on generated clients
(``--client_data=generated``: LEAF Synthetic(1, 1) made on the device from (seed, client),
lognormal sizes, no N x L table), s=100 sampled clients, 5 local SGD steps of batch 32:
one compiled chunk of ``--rounds`` rounds is run once to warm up and then timed
``--repeats`` times (the median is kept); the peak memory is the process's
(``simulate.peak_memory``: the device allocator's peak on a GPU, peak RSS on a CPU,
which includes Python, the runtime and compiled code). ``state MiB`` is the simulation
state's bytes (``SimState``: FedAvg's global model and s rows in flight, the [N, K] byte
counters and the [N] availability mask; MoDeST's a aggregates and s rows in flight, its
global view's [1, N] records and membership counters). ``ratio`` is the round time over the same
protocol and model's smallest N, measured in the same run.

MoDeST runs with s=100, a=1, the global view (``--views=local`` is N x N).

  python -m benchmarks.population --json=runs/bench/population.json
  python -m benchmarks.population --models=logistic --nodes=1000,1000000 --protocols=fedavg
"""

import json
import subprocess
import sys

from absl import app, flags

flags.DEFINE_list('models', ['logistic', 'mlp'], 'Models (on Synthetic: 60 features, 10 classes).')
flags.DEFINE_list('nodes', ['1000', '10000', '100000', '1000000', '10000000'], 'Node counts N.')
flags.DEFINE_list('protocols', ['fedavg', 'modest'], 'fedavg and/or modest.')
flags.DEFINE_integer('sample_size', 100, 'Clients per round (s).')
flags.DEFINE_integer('rounds', 5, 'Rounds per timed compiled chunk.')
flags.DEFINE_integer('repeats', 3, 'Timed chunks; the median is kept.')
flags.DEFINE_integer('timeout', 900, 'Seconds one (protocol, model, N) may take.')
flags.DEFINE_string('json', None, 'Write {"machine", "records"} here.')
FLAGS = flags.FLAGS

_CHILD = r'''
import json, statistics, sys, time
import jax
from benchmarks import common
from decsim import experiment, simulate
from decsim.data import virtual
protocol, model, nodes, s, rounds, repeats = (sys.argv[1], sys.argv[2], int(sys.argv[3]),
                                              int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
config = experiment.ExperimentConfig(protocol=protocol, model=model, nodes=nodes, sample_size=s,
                                     dataset='synthetic', client_data='generated',
                                     local_steps=5, batch_size=32, momentum=0.9)
t0 = time.perf_counter()
data = virtual.synthetic_data(0, nodes, config)
dataset = common.random_dataset((virtual.SYNTHETIC_DIM,), 8)
learner, _ = experiment.make_learner(config, dataset)
protocol_ = experiment.make_protocol(config, learner)
state = jax.jit(protocol_.init)(jax.random.key(0), data)
jax.block_until_ready(state)
build = time.perf_counter() - t0
state_bytes = sum(l.size * l.dtype.itemsize for l in jax.tree.leaves(state)
                  if not jax.dtypes.issubdtype(l.dtype, jax.dtypes.prng_key))
t0 = time.perf_counter()
chunk = simulate.compile_chunk(protocol_, state, data, rounds)
compile_s = time.perf_counter() - t0
state, _ = chunk(state, data)
jax.block_until_ready(state)
times = []
for _ in range(repeats):
  t0 = time.perf_counter()
  state, m = chunk(state, data)
  jax.block_until_ready(state)
  times.append((time.perf_counter() - t0) / rounds)
peak, source = simulate.peak_memory()
print(json.dumps({'round_seconds': statistics.median(times), 'round_seconds_all': times,
                  'compile_seconds': compile_s, 'build_seconds': build,
                  'peak_bytes': peak, 'source': source, 'state_bytes': state_bytes,
                  'model_bytes': learner.model_bytes(),
                  'train_loss': float(m.train_loss[-1])}))
'''


def measure(protocol: str, model: str, nodes: int) -> dict:
  args = [protocol, model, str(nodes), str(FLAGS.sample_size), str(FLAGS.rounds),
          str(FLAGS.repeats)]
  try:
    proc = subprocess.run([sys.executable, '-c', _CHILD, *args], capture_output=True, text=True,
                          timeout=FLAGS.timeout)
  except subprocess.TimeoutExpired:
    return {'error': f'over {FLAGS.timeout} s'}
  if proc.returncode:
    return {'error': proc.stderr.strip().splitlines()[-1][:300]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  records = []
  print(f'{"protocol":8} {"model":8} {"N":>10} {"round ms":>9} {"ratio":>6} {"peak MiB":>9} '
        f'{"state MiB":>9} {"compile s":>9}', flush=True)
  for protocol in FLAGS.protocols:
    for model in FLAGS.models:
      base = None
      for nodes in map(int, FLAGS.nodes):
        rec = {'protocol': protocol, 'model': model, 'nodes': nodes,
               'sample_size': FLAGS.sample_size, **measure(protocol, model, nodes)}
        records.append(rec)
        if 'error' in rec:
          print(f'{protocol:8} {model:8} {nodes:10,} failed: {rec["error"]}', flush=True)
          continue
        base = base or rec['round_seconds']
        rec['ratio'] = rec['round_seconds'] / base
        print(f'{protocol:8} {model:8} {nodes:10,} {1e3 * rec["round_seconds"]:9.1f} '
              f'{rec["ratio"]:6.2f} {rec["peak_bytes"] / 2**20:9,.0f} '
              f'{rec["state_bytes"] / 2**20:9,.1f} {rec["compile_seconds"]:9.1f}', flush=True)
  if FLAGS.json:
    import pathlib  # pylint: disable=g-import-not-at-top
    pathlib.Path(FLAGS.json).parent.mkdir(parents=True, exist_ok=True)
    with open(FLAGS.json, 'w') as f:
      json.dump({'machine': common.machine(), 'records': records}, f, indent=2)


if __name__ == '__main__':
  app.run(main)
