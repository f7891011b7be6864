"""One experiment from one flat configuration: data, model, protocol, run.

``ExperimentConfig`` mirrors the flags of ``launch/simulate.py`` one to one, so a
run's ``config.json`` is its complete description, and tests and notebooks build
the same experiments as the command line without going through flags.
"""

import dataclasses
import json
import math
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from decsim import aggregation
from decsim import churn as churn_lib
from decsim import metrics as metrics_lib
from decsim import mixing
from decsim import network as network_lib
from decsim import interrupts, rundir, sharding, simulate
from decsim.config import check
from decsim.configs import (MAX_LOCAL_STEPS, DataConfig, FedAvgConfig, GossipConfig, ModelConfig,
                            ModestConfig, RunConfig, TopologyConfig, TrainConfig, VarianceConfig)
from decsim.data import partition as partition_lib
from decsim.data import sources
from decsim.data.sampler import NodeData
from decsim.errors import ConfigError
from decsim.local import make_local_update, make_optimizer
from decsim.models import build_model
from decsim.protocols import gossip as gossip_lib
from decsim.protocols.base import Learner, Protocol
from decsim.protocols.dpsgd import dpsgd
from decsim.protocols.fedavg import fedavg
from decsim.protocols.modest import modest
from decsim import topology as topology_lib

DECENTRALIZED = ('dpsgd', 'gossip')
SAMPLED = ('fedavg', 'modest')
MAX_LOCAL_VIEW_NODES = 10_000  # MoDeST --views=local: three [N, N] int32 matrices


@dataclasses.dataclass(frozen=True)
class ExperimentConfig(GossipConfig, ModestConfig, FedAvgConfig, VarianceConfig,
                       churn_lib.ChurnConfig, network_lib.NetworkConfig, TopologyConfig,
                       TrainConfig, ModelConfig, DataConfig, RunConfig):
  """Every setting of a run: the fields of all components, flat (one flag each).

  Making one checks every field (``decsim.config.check_fields``) and every
  combination (the components' ``check`` methods, then this one's).
  """

  def check(self):
    c = self
    if c.protocol in SAMPLED:
      check(c.sample_size <= c.nodes,
            f'--sample_size={c.sample_size} must be in 1..--nodes={c.nodes}: lower --sample_size')
      check(c.init == 'shared', f'--init=independent has no meaning for --protocol={c.protocol} '
            '(one model travels between clients); drop --init or use a decentralized protocol')
    if c.protocol == 'modest':
      check(c.aggregators <= c.nodes, f'--aggregators={c.aggregators} must be in 1..--nodes={c.nodes}')
      check(c.views != 'local' or c.nodes <= MAX_LOCAL_VIEW_NODES,
            f'--views=local keeps an [N, N] view matrix ({12 * c.nodes ** 2 / 2 ** 30:.1f} GiB at '
            f'--nodes={c.nodes}); use --views=global or at most {MAX_LOCAL_VIEW_NODES} nodes')
    if c.protocol in DECENTRALIZED:
      _check_graph(c)
    check(c.gossip_peers == 'random' or c.topology != 'one_peer_exponential',
          f'--gossip_peers={c.gossip_peers} needs a static --topology, not one_peer_exponential')
    churn_lib.validate(c, c.nodes)


def _check_graph(c: ExperimentConfig) -> None:
  check(c.nodes >= 2, f'--protocol={c.protocol} needs --nodes >= 2')
  if c.topology == 'kregular':
    check(c.degree < c.nodes,
          f'--degree={c.degree} must be in 1..{c.nodes - 1} (below --nodes): lower --degree')
    check(c.nodes * c.degree % 2 == 0,
          f'--nodes={c.nodes} x --degree={c.degree} is odd: a k-regular graph needs an even '
          'product; change --degree or --nodes')


def validate(c: ExperimentConfig) -> None:
  """Raises ConfigError on what the config alone cannot know: devices, model size, memory.

  Every field and combination was checked when ``c`` was made; this checks them
  again (``c`` may have been made with ``object.__setattr__``) and adds the checks
  that ask JAX or the machine.
  """
  ExperimentConfig.__post_init__(c)
  if c.devices != 1:  # asks JAX how many devices there are only when sharding
    error = sharding.device_error(c.devices, c.nodes, jax.device_count())
    check(error is None, error)


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything a run needs, built from a config."""

  config: ExperimentConfig
  protocol: Protocol
  learner: Learner
  data: NodeData
  evaluate: simulate.EvaluateFn
  dataset: sources.ArrayDataset


def load_data(c: ExperimentConfig) -> tuple[sources.ArrayDataset, NodeData]:
  dataset = sources.load_dataset(c.dataset, data_dir=c.data_dir, num_samples=c.num_samples,
                                 seed=c.seed, nodes=c.nodes)
  part = partition_lib.make_partition(c.partition, dataset.y_train, c.nodes, seed=c.seed,
                                      alpha=c.alpha, shards_per_node=c.shards_per_node,
                                      groups=dataset.groups)
  data = NodeData(x=jnp.asarray(dataset.x_train), y=jnp.asarray(dataset.y_train),
                  idx=part.idx, sizes=part.sizes)
  return dataset, data


def node_chunk(c: ExperimentConfig, cpu_default: int) -> int:
  """--node_chunk, or by platform: chunks where the model prefers them on a CPU, one vmap elsewhere."""
  if c.node_chunk >= 0:
    return c.node_chunk
  return cpu_default if jax.default_backend() == 'cpu' else 0


def make_learner(c: ExperimentConfig, dataset: sources.ArrayDataset) -> tuple[Learner, Any]:
  spec = build_model(c.model, dataset.num_classes)
  sample = jnp.zeros((1, *dataset.x_train.shape[1:]), jnp.float32)
  dtype = jnp.dtype(c.param_dtype)  # params, optimiser state and transfers; compute stays float32
  init_params = lambda key: jax.tree.map(lambda p: p.astype(dtype),
                                         spec.module.init(key, sample)['params'])
  apply_fn = lambda params, x: spec.module.apply({'params': params}, x)
  tx = make_optimizer(c.optimizer, c.lr, c.momentum)
  local_update = make_local_update(metrics_lib.make_loss_fn(apply_fn), tx, c.local_steps,
                                   c.batch_size, c.local_epochs or None)
  learner = Learner(init_params=init_params, tx=tx, local_update=local_update,
                    batch_size=c.batch_size, node_chunk=node_chunk(c, spec.cpu_node_chunk),
                    independent_init=c.init == 'independent')
  return learner, apply_fn


def _sub_config(cls, c: ExperimentConfig):
  """The fields of ``cls`` (a config dataclass) taken from the flat experiment config."""
  return cls(**{f.name: getattr(c, f.name) for f in dataclasses.fields(cls)})


def make_network(c: ExperimentConfig) -> network_lib.Network:
  return network_lib.make_network(_sub_config(network_lib.NetworkConfig, c), c.nodes, c.seed)


def variance_correction(c: ExperimentConfig) -> mixing.VarianceCorrection | None:
  if c.variance_correction == 'none':
    return None
  return mixing.VarianceCorrection(target=c.variance_correction, unbiased=c.vc_unbiased,
                                   epsilon=c.vc_epsilon, ratio=c.vc_ratio, biases=c.vc_biases)


def make_protocol(c: ExperimentConfig, learner: Learner) -> Protocol:
  """The protocol of ``c`` on its simulated network, wrapped in its churn schedule."""
  network = make_network(c)
  churn = _sub_config(churn_lib.ChurnConfig, c)
  availability = churn_lib.make_availability(churn, c.nodes, c.seed) if churn.enabled else None
  vc = variance_correction(c)
  if c.protocol == 'fedavg':
    protocol = fedavg(learner, nodes=c.nodes, sample_size=c.sample_size, weighting=c.weighting,
                      network=network, server=network_lib.lowest_median_latency_node(network),
                      success_fraction=c.success_fraction, variance_correction=vc,
                      aggregator=aggregation.make_aggregator(c.aggregator, c.trim_fraction),
                      server_optimizer=c.server())
  elif c.protocol == 'modest':
    protocol = modest(learner, nodes=c.nodes, sample_size=c.sample_size,
                      aggregators=c.aggregators, success_fraction=c.success_fraction,
                      ping_timeout=c.ping_timeout, inactivity_threshold=c.inactivity_threshold,
                      views=c.views, network=network, availability=availability,
                      variance_correction=vc)
  elif c.protocol == 'gossip':
    graph = None
    if c.gossip_peers != 'random':
      graph = topology_lib.build_topology(c.topology, c.nodes, degree=c.degree,
                                          p=c.edge_probability, seed=c.seed)
    protocol = gossip_lib.gossip(
        learner, nodes=c.nodes, topology=graph, delta=c.gossip_delta, wake=c.gossip_wake,
        peers=c.gossip_peers, merge=c.gossip_merge, beta=c.gossip_beta,
        buffer_size=c.gossip_buffer, partitions=c.gossip_partitions, keep_prob=c.gossip_keep,
        max_active=c.gossip_max_active, tick_seconds=c.tick_seconds, variance_correction=vc)
  else:
    if c.topology == 'one_peer_exponential':
      graph = lambda r: topology_lib.one_peer_exponential(c.nodes, r)
    else:
      graph = topology_lib.build_topology(c.topology, c.nodes, degree=c.degree,
                                          p=c.edge_probability, seed=c.seed)
    protocol = dpsgd(learner, nodes=c.nodes, topology=graph, mixing_mode=c.mixing,
                     network=network, variance_correction=vc)
  return churn_lib.with_churn(protocol, availability) if availability else protocol


def make_evaluate(c: ExperimentConfig, protocol: Protocol, apply_fn, x_test: jax.Array,
                  y_test: jax.Array) -> simulate.EvaluateFn:
  """Accuracy and loss of the protocol's model; for decentralized protocols also of
  ``eval_nodes`` individual nodes (evenly spaced ids) and the consensus distance."""
  evaluate_model = metrics_lib.make_evaluate(apply_fn)
  count = min(c.eval_nodes, c.nodes)  # all nodes when fewer than asked
  eval_ids = jnp.asarray(np.linspace(0, c.nodes - 1, count).round().astype(np.int32))

  def evaluate(state) -> dict[str, jax.Array]:
    accuracy, loss = evaluate_model(protocol.model(state), x_test, y_test)
    out = {'accuracy': accuracy, 'loss': loss}
    models = (state.nodes.params if c.protocol in DECENTRALIZED
              else jax.tree.map(lambda x: x[None], protocol.model(state)))
    out.update(metrics_lib.weight_variance(models))
    if c.protocol == 'gossip':
      out['gossip_dropped'] = state.extra.dropped
    if c.protocol in DECENTRALIZED:
      out['consensus_distance'] = metrics_lib.consensus_distance(state.nodes.params)
      if count:
        rows = jax.tree.map(lambda p: p[eval_ids], state.nodes.params)
        node_acc, _ = jax.lax.map(lambda p: evaluate_model(p, x_test, y_test), rows)
        out.update(node_accuracy_mean=jnp.mean(node_acc), node_accuracy_min=jnp.min(node_acc),
                   node_accuracy_max=jnp.max(node_acc))
    return out

  return evaluate


def _memory_limit() -> int:
  """Bytes the run may use: the device's limit where it reports one, else physical memory."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'bytes_limit' in stats:
    return int(stats['bytes_limit']) * jax.local_device_count()
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def check_feasible(c: ExperimentConfig, learner: Learner, data: NodeData) -> None:
  """Refuses what would only fail later: too many local steps, partitions or bytes."""
  steps = math.ceil(c.local_epochs * int(data.idx.shape[1]) / c.batch_size)
  check(steps <= MAX_LOCAL_STEPS,
        f'--local_epochs={c.local_epochs} means {steps} local steps per round for the largest '
        f'node (at most {MAX_LOCAL_STEPS}): lower --local_epochs or raise --batch_size')
  shapes = jax.eval_shape(learner.init_params, jax.random.key(0))
  params = sum(leaf.size for leaf in jax.tree.leaves(shapes))
  check(c.gossip_partitions <= params,
        f'--gossip_partitions={c.gossip_partitions} exceeds the model\'s {params} parameters: '
        'use at most one partition per parameter')
  slots = {'sgd': 2, 'adam': 3}[c.optimizer]  # params + momentum (+ second moment)
  need = c.replicas * c.nodes * learner.model_bytes() * (slots + 1)  # + one transient copy
  limit = _memory_limit()
  check(need <= limit, f'--nodes={c.nodes} x --replicas={c.replicas} of this --model need about '
        f'{need / 2 ** 30:.1f} GiB for models and optimiser state, more than the '
        f'{limit / 2 ** 30:.1f} GiB here: lower --nodes, use --param_dtype=bfloat16 or --devices')


def build(c: ExperimentConfig) -> Experiment:
  """Validates ``c`` and builds its data, learner, protocol and evaluation."""
  validate(c)
  dataset, data = load_data(c)
  learner, apply_fn = make_learner(c, dataset)
  check_feasible(c, learner, data)
  protocol = make_protocol(c, learner)
  evaluate = make_evaluate(c, protocol, apply_fn, jnp.asarray(dataset.x_test),
                           jnp.asarray(dataset.y_test))
  return Experiment(c, protocol, learner, data, evaluate, dataset)


def root_keys(c: ExperimentConfig) -> jax.Array:
  """The run's root key, or one per replica: replica i draws init, batches, samples and
  churn from seed + i; data, partition, graph and network come from ``seed`` for all."""
  if c.replicas == 1:
    return jax.random.key(c.seed)
  return jax.vmap(jax.random.key)(c.seed + jnp.arange(c.replicas))


RESUMABLE_CHANGES = ('resume', 'checkpoint_every', 'rounds')


def check_resume(out: pathlib.Path, c: ExperimentConfig) -> None:
  """--resume must continue the same experiment (more rounds are allowed) from a directory
  that still has its config.json; an empty or missing directory simply starts."""
  path = out / 'config.json'
  if not out.exists() or not any(out.iterdir()):
    return
  if not path.exists():
    raise ConfigError(f'--resume: {path} is missing, so the run in {out} cannot be checked; '
                      'start a new run with another --out')
  try:
    saved = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ConfigError(f'--resume: {path} cannot be read ({e}); start a new run with another '
                      '--out') from None
  current = dataclasses.asdict(c)
  changed = sorted(k for k in current.keys() | saved.keys()
                   if k not in RESUMABLE_CHANGES and saved.get(k, '?') != current.get(k, '?'))
  if changed:
    raise ConfigError(f'--resume with settings that differ from {path}: '
                      f'{", ".join(f"--{k}" for k in changed)}; resume with the same flags or '
                      'use a new --out')


def message_bytes(c: ExperimentConfig, learner: Learner) -> tuple[int, int, int]:
  """Bytes of one message of each kind; a gossip model message is a partition or a sample."""
  model = learner.model_bytes()
  if c.protocol == 'gossip':
    model = gossip_lib.message_bytes(model, c.gossip_partitions, c.gossip_keep)
  return network_lib.message_bytes(model, c.nodes)


def run(c: ExperimentConfig, out_dir: str | pathlib.Path | None = None, log=print) -> dict[str, Any]:
  """Builds and runs ``c``; writes config.json, metrics.jsonl, summary.json, accuracy.png.

  ``out_dir`` is locked for the run and an earlier run there is kept until this one
  has a first finite evaluation (``decsim.rundir``); nothing is written before ``c``
  is valid, the data is loaded and the round has compiled.
  """
  if out_dir is None and (c.resume or c.checkpoint_every):
    raise ConfigError('--resume and --checkpoint_every need an output directory (--out)')
  validate(c)
  with interrupts.deferred():
    return _run_in(rundir.RunDirectory(out_dir, c.resume) if out_dir is not None else None, c, log)


def _run_in(run_dir: rundir.RunDirectory | None, c: ExperimentConfig, log) -> dict[str, Any]:
  try:
    if c.resume:
      check_resume(run_dir.path, c)
    exp = build(c)
    summary = simulate.run(exp.protocol, exp.data, exp.evaluate, key=root_keys(c),
                           rounds=c.rounds, eval_every=c.eval_every,
                           message_bytes=message_bytes(c, exp.learner),
                           target_accuracy=c.target_accuracy, run_dir=run_dir,
                           checkpoint_every=c.checkpoint_every, resume=c.resume, log=log,
                           mesh=sharding.make_mesh(c.devices) if c.devices != 1 else None,
                           files={'config.json': dataclasses.asdict(c)})
    if run_dir is not None:
      from decsim import plotting  # matplotlib only when writing a run directory
      plotting.plot_accuracy(run_dir.path)
    return summary
  finally:
    if run_dir is not None:
      run_dir.discard()
      run_dir.release()
