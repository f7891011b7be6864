"""One experiment from one flat configuration: data, model, protocol, run.

``ExperimentConfig`` mirrors the flags of ``launch/simulate.py`` one to one, so a
run's ``config.json`` is its complete description, and tests and notebooks build
the same experiments as the command line without going through flags.
"""

import dataclasses
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from decsim import churn as churn_lib
from decsim import metrics as metrics_lib
from decsim import network as network_lib
from decsim import sharding
from decsim import simulate
from decsim.data import partition as partition_lib
from decsim.data import sources
from decsim.data.sampler import NodeData
from decsim.local import make_local_update, make_optimizer
from decsim.models import MODELS, build_model
from decsim.protocols.base import Learner, Protocol
from decsim.protocols.dpsgd import dpsgd
from decsim.protocols.fedavg import WEIGHTINGS, fedavg
from decsim.protocols import gossip as gossip_lib
from decsim.protocols.modest import VIEWS, modest
from decsim import mixing
from decsim import topology as topology_lib

PROTOCOLS = ('fedavg', 'dpsgd', 'gossip', 'modest')
DECENTRALIZED = ('dpsgd', 'gossip')
MAX_LOCAL_VIEW_NODES = 10_000  # MoDeST --views=local: three [N, N] int32 matrices
VARIANCE_CORRECTIONS = ('none', *mixing.VC_TARGETS)
TOPOLOGIES = (*topology_lib.TOPOLOGIES, 'one_peer_exponential')
PARTITIONS = ('iid', 'dirichlet', 'shards', 'natural')
OPTIMIZERS = ('sgd', 'adam')
INITS = ('shared', 'independent')
MIXING = ('auto', 'dense', 'sparse')
PARAM_DTYPES = ('float32', 'bfloat16')


class ConfigError(ValueError):
  """A bad setting; the message is one line naming the flag and the fix."""


@dataclasses.dataclass(frozen=True)
class ExperimentConfig(network_lib.NetworkConfig, churn_lib.ChurnConfig):
  """Every setting of a run; the network and churn fields come from their own configs."""

  protocol: str = 'fedavg'
  dataset: str = 'mnist1d'
  num_samples: int = 10_000
  data_dir: str | None = None
  model: str = 'lenet'
  partition: str = 'dirichlet'
  alpha: float = 0.5
  shards_per_node: int = 2
  nodes: int = 100
  sample_size: int = 10
  topology: str = 'kregular'
  degree: int = 4
  edge_probability: float = 0.1
  mixing: str = 'auto'
  init: str = 'shared'
  weighting: str = 'data_size'
  local_steps: int = 5
  local_epochs: float = 0.0
  batch_size: int = 32
  optimizer: str = 'sgd'
  lr: float = 0.05
  momentum: float = 0.9
  rounds: int = 300
  eval_every: int = 20
  eval_nodes: int = 10
  target_accuracy: float = 0.8
  seed: int = 0
  node_chunk: int = -1
  checkpoint_every: int = 0
  resume: bool = False
  replicas: int = 1
  # FedAvg and MoDeST
  success_fraction: float = 1.0
  # MoDeST
  aggregators: int = 1
  ping_timeout: float = 2.0
  inactivity_threshold: int = 20
  views: str = 'global'
  # Gossip learning (issue 4); one tick of --tick_seconds per round.
  gossip_delta: int = 10
  gossip_wake: str = 'uniform'
  gossip_peers: str = 'random'
  gossip_merge: str = 'half'
  gossip_beta: float = 0.5
  gossip_buffer: int = 1
  gossip_partitions: int = 1
  gossip_keep: float = 1.0
  gossip_max_active: int = 0
  tick_seconds: float = 1.0
  # Variance correction after averaging (Tian et al. 2024): gossip, dpsgd, fedavg.
  variance_correction: str = 'none'
  vc_biases: bool = False
  vc_unbiased: bool = False
  vc_epsilon: float = 1e-12
  vc_ratio: float = 1.0
  # Scale (issue 6)
  devices: int = 1
  param_dtype: str = 'float32'


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _choice(name: str, value: str, choices) -> None:
  _check(value in choices, f'--{name}={value!r} is unknown: choose one of {", ".join(choices)}')


def validate(c: ExperimentConfig) -> None:
  """Raises ConfigError on the first bad value or combination."""
  _choice('protocol', c.protocol, PROTOCOLS)
  _choice('dataset', c.dataset, sources.DATASETS)
  _choice('model', c.model, MODELS)
  _choice('partition', c.partition, PARTITIONS)
  _choice('topology', c.topology, TOPOLOGIES)
  _choice('mixing', c.mixing, MIXING)
  _choice('init', c.init, INITS)
  _choice('weighting', c.weighting, WEIGHTINGS)
  _choice('optimizer', c.optimizer, OPTIMIZERS)
  _check(c.nodes >= 1, f'--nodes={c.nodes} must be at least 1')
  _check(c.num_samples >= 0, f'--num_samples={c.num_samples} must be >= 0 (0: the whole dataset)')
  _check(c.alpha > 0, f'--alpha={c.alpha} must be > 0 (small: label skew; large: near IID)')
  _check(c.shards_per_node >= 1, f'--shards_per_node={c.shards_per_node} must be at least 1')
  if c.protocol in ('fedavg', 'modest'):
    _check(0 < c.success_fraction <= 1,
           f'--success_fraction={c.success_fraction} must be in (0, 1]')
  if c.protocol == 'modest':
    _check(1 <= c.sample_size <= c.nodes,
           f'--sample_size={c.sample_size} must be in 1..--nodes={c.nodes}: lower --sample_size')
    _check(1 <= c.aggregators <= c.nodes,
           f'--aggregators={c.aggregators} must be in 1..--nodes={c.nodes}')
    _check(c.ping_timeout >= 0, f'--ping_timeout={c.ping_timeout} must be >= 0 seconds')
    _check(c.inactivity_threshold >= 1,
           f'--inactivity_threshold={c.inactivity_threshold} must be at least 1 round')
    _choice('views', c.views, VIEWS)
    _check(c.views != 'local' or c.nodes <= MAX_LOCAL_VIEW_NODES,
           f'--views=local keeps an [N, N] view matrix ({12 * c.nodes ** 2 / 2 ** 30:.1f} GiB at '
           f'--nodes={c.nodes}); use --views=global or at most {MAX_LOCAL_VIEW_NODES} nodes')
    _check(c.init == 'shared', '--init=independent has no meaning for --protocol=modest (one '
           'model travels between samples); drop --init')
  if c.protocol == 'fedavg':
    _check(c.init == 'shared', '--init=independent has no meaning for --protocol=fedavg (one '
           'server model); drop --init or use a decentralized protocol')
    _check(1 <= c.sample_size <= c.nodes,
           f'--sample_size={c.sample_size} must be in 1..--nodes={c.nodes}: lower --sample_size')
  if c.protocol in DECENTRALIZED:
    _check(c.nodes >= 2, f'--protocol={c.protocol} needs --nodes >= 2')
    if c.topology in ('kregular',):
      _check(1 <= c.degree < c.nodes,
             f'--degree={c.degree} must be in 1..{c.nodes - 1} (below --nodes): lower --degree')
      _check(c.nodes * c.degree % 2 == 0,
             f'--nodes={c.nodes} x --degree={c.degree} is odd: a k-regular graph needs an even '
             'product; change --degree or --nodes')
    if c.topology == 'erdos_renyi':
      _check(0 < c.edge_probability <= 1,
             f'--edge_probability={c.edge_probability} must be in (0, 1]')
  _check(c.local_steps >= 1, f'--local_steps={c.local_steps} must be at least 1')
  _check(c.local_epochs >= 0, f'--local_epochs={c.local_epochs} must be >= 0 (0: use --local_steps)')
  _check(c.batch_size >= 1, f'--batch_size={c.batch_size} must be at least 1')
  _check(c.lr > 0, f'--lr={c.lr} must be > 0')
  _check(0 <= c.momentum < 1, f'--momentum={c.momentum} must be in [0, 1)')
  _check(c.rounds >= 1, f'--rounds={c.rounds} must be at least 1')
  _check(c.eval_every >= 1, f'--eval_every={c.eval_every} must be at least 1')
  _check(c.rounds % c.eval_every == 0,
         f'--rounds={c.rounds} is not a multiple of --eval_every={c.eval_every}: '
         'make it one (rounds run in chunks of eval_every)')
  _check(c.eval_nodes >= 0, f'--eval_nodes={c.eval_nodes} must be >= 0')
  _check(0 <= c.target_accuracy <= 1, f'--target_accuracy={c.target_accuracy} must be in [0, 1]')
  _check(c.checkpoint_every >= 0 and c.checkpoint_every % c.eval_every == 0,
         f'--checkpoint_every={c.checkpoint_every} must be 0 (off) or a multiple of '
         f'--eval_every={c.eval_every}')
  _check(c.replicas >= 1, f'--replicas={c.replicas} must be at least 1')
  _check(c.node_chunk >= -1, f'--node_chunk={c.node_chunk} must be -1 (auto), 0 (one vmap) or > 0')
  _choice('param_dtype', c.param_dtype, PARAM_DTYPES)
  if c.devices != 1:  # asks JAX how many devices there are only when sharding
    error = sharding.device_error(c.devices, c.nodes, jax.device_count())
    _check(error is None, error)
    _check(c.replicas == 1, f'--replicas={c.replicas} cannot be combined with --devices='
           f'{c.devices}: run replicas on one device or shard one replica')
  _validate_gossip_and_vc(c)


def _validate_gossip_and_vc(c: ExperimentConfig) -> None:
  _choice('variance_correction', c.variance_correction, VARIANCE_CORRECTIONS)
  _check(0 <= c.vc_ratio <= 1, f'--vc_ratio={c.vc_ratio} must be in [0, 1] (1: full correction)')
  _check(c.vc_epsilon > 0, f'--vc_epsilon={c.vc_epsilon} must be > 0')
  if c.protocol != 'gossip':
    return
  _choice('gossip_wake', c.gossip_wake, gossip_lib.WAKES)
  _choice('gossip_peers', c.gossip_peers, gossip_lib.PEERS)
  _choice('gossip_merge', c.gossip_merge, gossip_lib.MERGES)
  _check(c.gossip_delta >= 1, f'--gossip_delta={c.gossip_delta} must be at least 1 tick')
  _check(0 <= c.gossip_beta <= 1, f'--gossip_beta={c.gossip_beta} must be in [0, 1]')
  _check(c.gossip_buffer >= 1, f'--gossip_buffer={c.gossip_buffer} must be at least 1')
  _check(c.gossip_partitions >= 1,
         f'--gossip_partitions={c.gossip_partitions} must be at least 1 (1: whole models)')
  _check(0 < c.gossip_keep <= 1, f'--gossip_keep={c.gossip_keep} must be in (0, 1] (1: no '
         'sampling compression)')
  _check(c.gossip_max_active >= 0,
         f'--gossip_max_active={c.gossip_max_active} must be >= 0 (0: all nodes, masked)')
  _check(c.tick_seconds > 0, f'--tick_seconds={c.tick_seconds} must be > 0')
  _check(c.gossip_peers == 'random' or c.topology != 'one_peer_exponential',
         f'--gossip_peers={c.gossip_peers} needs a static --topology, not one_peer_exponential')


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
                      success_fraction=c.success_fraction, variance_correction=vc)
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


def build(c: ExperimentConfig) -> Experiment:
  """Validates ``c`` and builds its data, learner, protocol and evaluation."""
  validate(c)
  dataset, data = load_data(c)
  learner, apply_fn = make_learner(c, dataset)
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


def _check_same_run(path: pathlib.Path, c: ExperimentConfig) -> None:
  """--resume must continue the same experiment (more rounds are allowed)."""
  if not path.exists():
    return
  saved = json.loads(path.read_text())
  changed = sorted(k for k, v in dataclasses.asdict(c).items()
                   if k not in RESUMABLE_CHANGES and k in saved and saved[k] != v)
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
  """Builds and runs ``c``; writes config.json, metrics.jsonl, summary.json, accuracy.png."""
  exp = build(c)
  if out_dir is not None:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if c.resume:
      _check_same_run(out / 'config.json', c)
    (out / 'config.json').write_text(json.dumps(dataclasses.asdict(c), indent=2) + '\n')
  elif c.resume or c.checkpoint_every:
    raise ConfigError('--resume and --checkpoint_every need an output directory (--out)')
  summary = simulate.run(exp.protocol, exp.data, exp.evaluate, key=root_keys(c),
                         rounds=c.rounds, eval_every=c.eval_every,
                         message_bytes=message_bytes(c, exp.learner),
                         target_accuracy=c.target_accuracy, out_dir=out_dir,
                         checkpoint_every=c.checkpoint_every, resume=c.resume, log=log,
                         mesh=sharding.make_mesh(c.devices) if c.devices != 1 else None)
  if out_dir is not None:
    from decsim import plotting  # matplotlib only when writing a run directory
    plotting.plot_accuracy(pathlib.Path(out_dir))
  return summary
