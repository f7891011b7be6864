"""decsim's MoDeST beside a run of the authors' simulator (devos50/decentralized-learning),
on the same nodes, sample size, aggregators, success fraction, churn trace, device
capacities, latencies and model size (issue 13, item 6).

The reference run is made by ``../shared/reference/modest/run_tiny.sh`` (run A: 20
nodes, s=5, a=1, sf=0.6, 30 rounds, FedScale-format traces) and summarised by its
``summarize_rounds.py``; this script only reads what that run wrote:

* ``node_map.csv``: each node's trace device, compute (ms/sample), bandwidth (bytes/s);
* the availability trace (``tiny_availability_traces.pkl``): active/inactive seconds per
  device, replayed every ``finish_time`` seconds, graceful leaves and joins;
* ``latencies.txt`` (the reference's site matrix, ms; node i on site i mod S);
* ``statistics.json`` (bytes and messages by type) and ``rounds.csv`` (per round: time,
  aggregator, the next participants).

decsim runs the same setting through its Python API: a ``Network`` with the reference's
per-node bandwidth (up = down, as its bandwidth scheduler), latencies and training time
(3 x local steps x ms/sample, ``accdfl/core/model_trainer.py``), the model message size
of the reference (its pickled GN-LeNet plus the view), and an availability function
that replays the trace in simulated seconds (a node's next leave is its crash time for
the round). Nothing of the reference goes into decsim: this is a measuring script.

    python benchmarks/modest_reference.py --ref_data=REF/data/n_20_..._sd42dfl \\
        --ref_root=REF --out=runs/modest_reference
"""

import argparse
import csv
import dataclasses
import json
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np

from decsim import churn, experiment
from decsim.network import MODEL, PING, VIEW, Network
from decsim.protocols.base import Learner
from decsim.protocols.modest import modest

LOCAL_STEPS = 5  # the reference's default --local-steps
AUGMENTATION = 3.0  # AUGMENTATION_FACTOR_SIM in accdfl/core/model_trainer.py


def read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def trace_events(trace: dict, periods: int) -> tuple[bool, list[tuple[float, bool]]]:
  """(online at 0, [(time, online after)]) of one device over ``periods`` trace periods
  (joins at 0 are skipped, as ``LearningCommunity.set_traces`` does)."""
  period = trace['finish_time']
  events = []
  for k in range(periods):
    events += [(k * period + t, True) for t in trace['active'] if t != 0]
    events += [(k * period + t, False) for t in trace['inactive']]
  return bool(trace['active'] and trace['active'][0] == 0), sorted(events)


def trace_availability(traces: list[dict], periods: int = 2):
  """``availability(key, round, clock)`` replaying the traces in simulated seconds:
  online and member follow the last event before ``clock`` (leaves are graceful); the
  crash time is the node's next leave."""
  parsed = [trace_events(t, periods) for t in traces]
  width = max(len(e) for _, e in parsed)
  times = np.full((len(parsed), width), np.inf, np.float32)
  after = np.zeros((len(parsed), width), bool)
  for i, (_, events) in enumerate(parsed):
    for j, (t, on) in enumerate(events):
      times[i, j], after[i, j] = t, on
  start = jnp.asarray([on for on, _ in parsed])
  times_j, after_j = jnp.asarray(times), jnp.asarray(after)

  def availability(key, round_, clock):
    del key, round_
    seen = jnp.sum(times_j <= clock, axis=1)  # [N] events so far
    last = jnp.take_along_axis(after_j, jnp.maximum(seen - 1, 0)[:, None], axis=1)[:, 0]
    online = jnp.where(seen > 0, last, start)
    leaves = jnp.where((times_j > clock) & ~after_j, times_j, jnp.inf)
    return churn.Availability(online=online, member=online,
                              crash_time=jnp.min(leaves, axis=1))

  return availability


def reference_network(nodes: list[dict], latencies: np.ndarray, batch_size: int,
                      latency_scale: float = 1.0) -> Network:
  n = len(nodes)
  bw = np.asarray([float(r['bw_limit_bytes_per_s']) for r in nodes], np.float32)
  ms = np.asarray([float(r['computation_ms_per_sample']) for r in nodes])
  # The reference trains 3 x local_steps x ms/1000 seconds; decsim local_steps x batch / speed.
  speed = batch_size * 1000.0 / (AUGMENTATION * ms)
  sites = np.arange(n) % latencies.shape[0]
  lat = np.floor(latencies[np.ix_(sites, sites)]) / 1000.0  # int(ms) / 1000, as apply_latencies
  lat = lat * latency_scale
  return Network(site=jnp.arange(n, dtype=jnp.int32), latency=jnp.asarray(lat, jnp.float32),
                 upload=jnp.asarray(bw), download=jnp.asarray(bw),
                 speed=jnp.asarray(speed, jnp.float32))


def sized(learner: Learner, nbytes: int) -> Learner:
  """``learner`` whose messages are priced at ``nbytes`` (the reference's model message)."""

  class Sized(type(learner)):
    def model_bytes(self) -> int:
      return nbytes

  return Sized(**{f.name: getattr(learner, f.name) for f in dataclasses.fields(learner)})


def run_decsim(args, nodes, traces, latencies, model_bytes):
  config = experiment.ExperimentConfig(num_samples=2000, nodes=len(nodes), model='logistic',
                                       local_steps=LOCAL_STEPS, batch_size=20, momentum=0.0,
                                       lr=0.1, seed=args.seed)
  dataset, data, _ = experiment.load_data(config)
  learner, _ = experiment.make_learner(config, dataset)
  net = reference_network(nodes, latencies, config.batch_size, args.latency_scale)
  avail = trace_availability(traces)
  protocol = churn.with_churn(
      modest(sized(learner, model_bytes), nodes=len(nodes), sample_size=args.sample_size,
             aggregators=args.aggregators, success_fraction=args.success_fraction,
             ping_timeout=5.0, inactivity_threshold=1000, network=net, availability=avail,
             aggregator_order=args.aggregator_order, reforward_timeout=args.reforward_timeout),
      avail)
  state = protocol.init(jax.random.key(args.seed), data)
  step = jax.jit(protocol.round)
  rows = []
  for r in range(args.rounds):
    before = {int(i) for i, t in zip(state.extra.agg_ids, state.extra.agg_done) if np.isfinite(t)}
    state, m = step(state, data)
    part = set(np.asarray(state.extra.participants).tolist())
    after = set(np.asarray(state.extra.agg_ids).tolist())
    first = int(jnp.argmin(state.extra.agg_done))
    rows.append(dict(round=r + 1, time=float(state.clock), duration=float(m.sim_seconds),
                     participants=int(m.active_nodes), aggregator=int(state.extra.agg_ids[first]),
                     online=int(jnp.sum(state.available)),
                     models=int(m.messages[MODEL]), views=int(m.messages[VIEW]),
                     pings=int(m.messages[PING]),
                     # models to oneself (an aggregator in the sample it serves, a participant
                     # that is its own aggregator): decsim counts and times them as transfers,
                     # the reference hands them over in memory
                     self_models=len(before & part) + len(after & part)))
  return rows


def reference_rows(ref_data, short_to_index):
  rows = []
  for r in read_csv(os.path.join(ref_data, 'rounds.csv')):
    nxt = [short_to_index[s] for s in r['next_participants'].split('-') if s]
    rows.append(dict(round=int(r['round']), time=float(r['time']), duration=float(r['duration']),
                     aggregator=int(r['aggregator_node']) if r['aggregator_node'] else -1,
                     next_participants=len(nxt), online=int(r['online_nodes'] or 0),
                     bytes_up=float(r['bytes_up_total'])))
  return rows


def summary(ref, dec, stats):
  out = stats['bw_out']
  ref_models = out['num']['model']
  size = {k: out['bytes'][k] / max(out['num'][k], 1) for k in out['bytes']}
  dec_models = sum(r['models'] for r in dec)
  dec_self = sum(r['self_models'] for r in dec)
  dec_pings = sum(r['pings'] for r in dec)
  dec_bytes = dec_models * (size['model'] + size['view']) + dec_pings * size['ping']
  ref_dur = np.asarray([r['duration'] for r in ref])
  dec_dur = np.asarray([r['duration'] for r in dec])
  return {
      'rounds (reference aggregation callbacks / decsim rounds)': (len(ref), len(dec)),
      'simulated seconds': (ref[-1]['time'], dec[-1]['time']),
      'mean round seconds': (float(ref_dur.mean()), float(dec_dur.mean())),
      'median round seconds': (float(np.median(ref_dur)), float(np.median(dec_dur))),
      'max round seconds': (float(ref_dur.max()), float(dec_dur.max())),
      'participants per round (mean)': (float(np.mean([r['next_participants'] for r in ref[:-1]])),
                                        float(np.mean([r['participants'] for r in dec]))),
      'distinct aggregators': (len({r['aggregator'] for r in ref}), len({r['aggregator'] for r in dec})),
      'model messages (out)': (ref_models, dec_models),
      'model messages per round': (ref_models / len(ref), dec_models / len(dec)),
      'decsim model messages to oneself': ('-', dec_self),
      'model messages without those (per round)': (ref_models / len(ref),
                                                   (dec_models - dec_self) / len(dec)),
      'ping + pong messages': (out['num']['ping'] + out['num']['pong'], dec_pings),
      'membership + ack messages': (out['num']['membership'] + out['num']['aggack'], 0),
      'bytes out, all types (MB)': (stats['bytes_up'] / 1e6, dec_bytes / 1e6),
      'bytes out without models to oneself (MB)': (
          stats['bytes_up'] / 1e6, (dec_bytes - dec_self * (size['model'] + size['view'])) / 1e6),
      'bytes out, model + view + ping (MB)': (
          (out['bytes']['model'] + out['bytes']['view'] + out['bytes']['ping']
           + out['bytes']['pong']) / 1e6, dec_bytes / 1e6),
  }


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--ref_data', required=True, help='the reference run directory (rounds.csv)')
  p.add_argument('--ref_root', required=True, help='the reference clone (latencies.txt, data/)')
  p.add_argument('--trace', default='data/tiny_availability_traces.pkl')
  p.add_argument('--sample_size', type=int, default=5)
  p.add_argument('--aggregators', type=int, default=1)
  p.add_argument('--success_fraction', type=float, default=0.6)
  p.add_argument('--rounds', type=int, default=30)
  p.add_argument('--aggregator_order', default='bandwidth', choices=('rank', 'bandwidth'))
  # The trace's leaves are graceful: a leaving aggregator acknowledges the failure at once
  # (HEAD's go_offline), so its participants re-forward without waiting.
  p.add_argument('--reforward_timeout', type=float, default=0.0)
  p.add_argument('--latency_scale', type=float, default=1.0,
                 help='0: no latency (the reference bypasses it on model transfers)')
  p.add_argument('--seed', type=int, default=42)
  p.add_argument('--out', default='runs/modest_reference')
  args = p.parse_args()
  nodes = read_csv(os.path.join(args.ref_data, 'node_map.csv'))
  with open(os.path.join(args.ref_root, args.trace), 'rb') as f:
    all_traces = pickle.load(f)
  traces = [all_traces[int(r['avail_device_id'])] for r in nodes]
  latencies = np.loadtxt(os.path.join(args.ref_root, 'latencies.txt'), delimiter=',')
  with open(os.path.join(args.ref_data, 'statistics.json')) as f:
    stats = [json.loads(line) for line in f if line.strip()][-1]['global']
  out = stats['bw_out']
  model_bytes = round((out['bytes']['model'] + out['bytes']['view']) / out['num']['model'])
  short_to_index = {r['short_id']: int(r['node_index']) for r in nodes}
  ref = reference_rows(args.ref_data, short_to_index)
  dec = run_decsim(args, nodes, traces, latencies, model_bytes)
  os.makedirs(args.out, exist_ok=True)
  for name, rows in (('reference_rounds.csv', ref), ('decsim_rounds.csv', dec)):
    with open(os.path.join(args.out, name), 'w', newline='') as f:
      w = csv.DictWriter(f, fieldnames=list(rows[0]))
      w.writeheader()
      w.writerows(rows)
  table = summary(ref, dec, stats)
  with open(os.path.join(args.out, 'summary.json'), 'w') as f:
    json.dump(table, f, indent=1)
  print(f'model message: {model_bytes} bytes (model + view, the reference mean)')
  print('| measure | reference | decsim |\n|---|---|---|')
  for k, (a, b) in table.items():
    fmt = (lambda v: f'{v:.2f}' if isinstance(v, float) else str(v))
    print(f'| {k} | {fmt(a)} | {fmt(b)} |')


if __name__ == '__main__':
  main()
