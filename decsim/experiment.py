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

from decsim import metrics as metrics_lib
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
from decsim import topology as topology_lib

PROTOCOLS = ('fedavg', 'dpsgd')
DECENTRALIZED = ('dpsgd',)
TOPOLOGIES = (*topology_lib.TOPOLOGIES, 'one_peer_exponential')
PARTITIONS = ('iid', 'dirichlet', 'shards', 'natural')
OPTIMIZERS = ('sgd', 'adam')
INITS = ('shared', 'independent')
MIXING = ('auto', 'dense', 'sparse')
PARAM_DTYPES = ('float32', 'bfloat16')


class ConfigError(ValueError):
  """A bad setting; the message is one line naming the flag and the fix."""


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
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
  if c.protocol in DECENTRALIZED:
    _check(0 <= c.eval_nodes <= c.nodes,
           f'--eval_nodes={c.eval_nodes} must be in 0..--nodes={c.nodes}')
  _check(0 <= c.target_accuracy <= 1, f'--target_accuracy={c.target_accuracy} must be in [0, 1]')
  _check(c.node_chunk >= -1, f'--node_chunk={c.node_chunk} must be -1 (auto), 0 (one vmap) or > 0')
  _choice('param_dtype', c.param_dtype, PARAM_DTYPES)
  if c.devices != 1:  # asks JAX how many devices there are only when sharding
    error = sharding.device_error(c.devices, c.nodes, jax.device_count())
    _check(error is None, error)


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


def make_protocol(c: ExperimentConfig, learner: Learner) -> Protocol:
  if c.protocol == 'fedavg':
    return fedavg(learner, nodes=c.nodes, sample_size=c.sample_size, weighting=c.weighting)
  if c.topology == 'one_peer_exponential':
    graph = lambda r: topology_lib.one_peer_exponential(c.nodes, r)
  else:
    graph = topology_lib.build_topology(c.topology, c.nodes, degree=c.degree,
                                        p=c.edge_probability, seed=c.seed)
  return dpsgd(learner, nodes=c.nodes, topology=graph, mixing_mode=c.mixing)


def make_evaluate(c: ExperimentConfig, protocol: Protocol, apply_fn, x_test: jax.Array,
                  y_test: jax.Array) -> simulate.EvaluateFn:
  """Accuracy and loss of the protocol's model; for decentralized protocols also of
  ``eval_nodes`` individual nodes (evenly spaced ids) and the consensus distance."""
  evaluate_model = metrics_lib.make_evaluate(apply_fn)
  eval_ids = jnp.asarray(np.linspace(0, c.nodes - 1, c.eval_nodes).round().astype(np.int32))

  def evaluate(state) -> dict[str, jax.Array]:
    accuracy, loss = evaluate_model(protocol.model(state), x_test, y_test)
    out = {'accuracy': accuracy, 'loss': loss}
    if c.protocol in DECENTRALIZED:
      out['consensus_distance'] = metrics_lib.consensus_distance(state.nodes.params)
      if c.eval_nodes:
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


def run(c: ExperimentConfig, out_dir: str | pathlib.Path | None = None, log=print) -> dict[str, Any]:
  """Builds and runs ``c``; writes config.json, metrics.jsonl, summary.json, accuracy.png."""
  exp = build(c)
  if out_dir is not None:
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'config.json').write_text(json.dumps(dataclasses.asdict(c), indent=2) + '\n')
  summary = simulate.run(exp.protocol, exp.data, exp.evaluate, key=jax.random.key(c.seed),
                         rounds=c.rounds, eval_every=c.eval_every,
                         model_bytes=exp.learner.model_bytes(),
                         target_accuracy=c.target_accuracy, out_dir=out_dir, log=log,
                         mesh=sharding.make_mesh(c.devices) if c.devices != 1 else None)
  if out_dir is not None:
    from decsim import plotting  # matplotlib only when writing a run directory
    plotting.plot_accuracy(pathlib.Path(out_dir))
  return summary
