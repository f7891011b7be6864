"""One experiment from one flat configuration: data, model, protocol, run.

``ExperimentConfig`` mirrors the flags of ``launch/simulate.py`` one to one, so a
run's ``config.json`` is its complete description, and tests and notebooks build
the same experiments as the command line without going through flags.
"""

import dataclasses
import math
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import optax
from flax import linen as nn

from decsim import churn as churn_lib
from decsim import interrupts, replicas, rundir, sharding, simulate, tensorboard
from decsim import metrics as metrics_lib
from decsim import mixing
from decsim import report as report_lib
from decsim import network as network_lib
from decsim.config import check
from decsim.configs import (MAX_LOCAL_STEPS, DataConfig, ModelConfig, RunConfig, TopologyConfig,
                            TrainConfig, VarianceConfig)
from decsim.data import partition as partition_lib
from decsim.data import sources, virtual
from decsim.data.sampler import NodeData
from decsim.errors import ConfigError  # noqa: F401 - part of this module's API (tests, users)
from decsim.local import learning_rate_scale, make_local_update, make_optimizer
from decsim.models import ModelSpec, build_model, check_inputs
from decsim.protocols import registry
from decsim.protocols.base import Learner, Protocol
from decsim.rng import Seeds

COMMON = (VarianceConfig, churn_lib.ChurnConfig, network_lib.NetworkConfig, TopologyConfig,
          TrainConfig, ModelConfig, virtual.ClientDataConfig, DataConfig, RunConfig)


def _check_experiment(c) -> None:
  """The checks across components: the protocol's own, then churn against --nodes."""
  spec = registry.get(c.protocol)
  if spec.check is not None:
    spec.check(c)
  churn_lib.validate(c, c.nodes)
  virtual.validate(c)


def experiment_config_class() -> type:
  """``ExperimentConfig``: the fields of the common components and of every registered
  protocol's options, flat (one flag each). Made again after a late ``register``."""
  options = tuple(dict.fromkeys(registry.get(n).options for n in registry.names()
                                if registry.get(n).options is not None))
  return dataclasses.make_dataclass(
      'ExperimentConfig', [], bases=(*reversed(options), *COMMON), frozen=True,
      namespace={'check': _check_experiment, '__module__': __name__, '__doc__': (
          'Every setting of a run: the fields of all components, flat (one flag each).\n\n'
          'Making one checks every field (``decsim.config.check_fields``) and every\n'
          "combination (each component's ``check``, then the protocol's).")})


ExperimentConfig = experiment_config_class()


def validate(c: ExperimentConfig) -> None:
  """Raises ConfigError on what the config alone cannot know: devices, model size, memory.

  Every field and combination was checked when ``c`` was made; this checks them
  again (``c`` may have been made with ``object.__setattr__``) and adds the checks
  that ask JAX or the machine.
  """
  ExperimentConfig.__post_init__(c)
  if c.tensorboard:
    tensorboard.require()
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
  apply_fn: Any  # (params of one model, x [B, ...]) -> logits [B, classes]


def seeds_of(c: ExperimentConfig, seeds: Seeds | None) -> Seeds:
  """``seeds``, or those of a single run of ``c`` (``--seed`` for every part)."""
  return Seeds.of(c.seed) if seeds is None else seeds


def load_data(c: ExperimentConfig, dataset: sources.ArrayDataset | None = None,
              seeds: Seeds | None = None
              ) -> tuple[sources.ArrayDataset, NodeData, partition_lib.Partition | None]:
  """``--dataset`` (or the given arrays) split over the nodes by ``--partition``; with
  ``--local_test_fraction`` also each node's held-out local test samples (else None)."""
  seed = seeds_of(c, seeds).data
  if virtual.generated(c):  # no [N, L] table: clients made from (seed, c) in the round
    return (*virtual.load(c, seed, dataset), None)
  if dataset is None:
    dataset = sources.load_dataset(c.dataset, data_dir=c.data_dir, num_samples=c.num_samples,
                                   seed=seed, nodes=c.nodes)
  part = partition_lib.make_partition(c.partition, dataset.y_train, c.nodes, seed=seed,
                                      alpha=c.alpha, shards_per_node=c.shards_per_node,
                                      groups=dataset.groups)
  local_test = None
  if c.local_test_fraction > 0:
    part, local_test = partition_lib.hold_out(part, c.local_test_fraction, seed)
  data = NodeData(x=jnp.asarray(dataset.x_train), y=jnp.asarray(dataset.y_train),
                  idx=part.idx, sizes=part.sizes)
  return dataset, data, local_test


def node_chunk(c: ExperimentConfig, cpu_default: int) -> int:
  """--node_chunk, or by platform: chunks where the model prefers them on a CPU, one vmap elsewhere."""
  if c.node_chunk >= 0:
    return c.node_chunk
  return cpu_default if jax.default_backend() == 'cpu' else 0


def make_learner(c: ExperimentConfig, dataset: sources.ArrayDataset,
                 transform: optax.GradientTransformation | None = None,
                 module: nn.Module | None = None) -> tuple[Learner, Any]:
  """The learner of ``c`` (or of your flax ``module``, which maps a batch ``[B, ...]`` to
  logits ``[B, classes]``); ``transform`` is chained before the local optimiser."""
  spec = build_model(c.model, dataset.num_classes) if module is None else ModelSpec(module, 0)
  if module is None:
    check_inputs(c.model, spec, dataset.name, dataset.x_train)
  sample = jnp.zeros((1, *dataset.x_train.shape[1:]), jnp.float32)
  dtype = jnp.dtype(c.param_dtype)  # params, optimiser state and transfers; compute stays float32
  init_params = lambda key: jax.tree.map(lambda p: p.astype(dtype),
                                         spec.module.init(key, sample)['params'])
  apply_fn = lambda params, x: spec.module.apply({'params': params}, x)
  tx = make_optimizer(c.optimizer, c.lr, c.momentum)
  if transform is not None:
    tx = optax.chain(transform, tx)
  local_update = make_local_update(metrics_lib.make_loss_fn(apply_fn), tx, c.local_steps,
                                   c.batch_size, c.local_epochs or None)
  lr_scale = learning_rate_scale(c.lr_schedule, c.lr, c.lr_decay_rounds or c.rounds,
                                 c.lr_decay_factor)
  learner = Learner(init_params=init_params, tx=tx, local_update=local_update,
                    batch_size=c.batch_size, node_chunk=node_chunk(c, spec.cpu_node_chunk),
                    independent_init=c.init == 'independent', lr_scale=lr_scale)
  return learner, apply_fn


def _sub_config(cls, c: ExperimentConfig):
  """The fields of ``cls`` (a config dataclass) taken from the flat experiment config."""
  return cls(**{f.name: getattr(c, f.name) for f in dataclasses.fields(cls)})


def make_network(c: ExperimentConfig, seeds: Seeds | None = None) -> network_lib.Network:
  return network_lib.make_network(_sub_config(network_lib.NetworkConfig, c), c.nodes,
                                  seeds_of(c, seeds).network)


def variance_correction(c: ExperimentConfig) -> mixing.VarianceCorrection | None:
  if c.variance_correction == 'none':
    return None
  return mixing.VarianceCorrection(target=c.variance_correction, unbiased=c.vc_unbiased,
                                   epsilon=c.vc_epsilon, ratio=c.vc_ratio, biases=c.vc_biases)


def make_protocol(c: ExperimentConfig, learner: Learner, learner_with=None,
                  seeds: Seeds | None = None) -> Protocol:
  """The protocol of ``c`` (from the registry) on its simulated network, wrapped in its
  churn schedule. ``learner_with(transform)`` rebuilds the learner around an optax
  transform for protocols that change local training (FedProx)."""
  seeds = seeds_of(c, seeds)
  churn = _sub_config(churn_lib.ChurnConfig, c)
  availability = (churn_lib.make_availability(churn, c.nodes, seeds.network) if churn.enabled
                  else None)
  ctx = registry.BuildContext(config=c, learner=learner, network=make_network(c, seeds),
                              availability=availability,
                              variance_correction=variance_correction(c),
                              learner_with=learner_with, seeds=seeds)
  protocol = registry.get(c.protocol).build(ctx)
  return churn_lib.with_churn(protocol, availability) if availability else protocol


EVAL_NODE_SEED = 0x5E1EC7  # stream of the --eval_nodes subset, apart from every other draw


def eval_node_ids(c: ExperimentConfig, seeds: Seeds | None = None) -> np.ndarray | None:
  """The nodes whose own models are evaluated: None for all (``--eval_nodes=0`` or at
  least ``--nodes``), else a fixed random subset of ``eval_nodes`` ids, sorted (drawn
  with the data's seed)."""
  if c.eval_nodes == 0 or c.eval_nodes >= c.nodes:
    return None
  rng = np.random.default_rng([seeds_of(c, seeds).data, EVAL_NODE_SEED])
  ids = rng.choice(c.nodes, c.eval_nodes, replace=False)
  return np.sort(ids).astype(np.int32)


def make_evaluate(c: ExperimentConfig, protocol: Protocol, apply_fn, x_test: jax.Array,
                  y_test: jax.Array, data: NodeData | None = None,
                  local_test: partition_lib.Partition | None = None,
                  seeds: Seeds | None = None) -> simulate.EvaluateFn:
  """The row's evaluation (README, "Metrics").

  A protocol that delivers one model (FedAvg, MoDeST) is scored on it, and its
  clients' models after the last round's local training as ``client_accuracy``
  with quantiles (``protocol.client_models``). For one
  whose nodes hold their own models (``protocol.node_models``: D-PSGD, gossip)
  ``accuracy`` and ``loss`` are the means over the evaluated nodes' own models
  (``eval_node_ids``), with the accuracy's quantiles over nodes; the node-average
  model, which no node holds, is ``consensus_accuracy`` / ``consensus_loss``. With
  held-out ``local_test`` samples of the training ``data``, ``local_accuracy`` too.
  """
  evaluate_model = metrics_lib.make_evaluate(apply_fn)
  ids = eval_node_ids(c, seeds)
  local = local_evaluate(c, protocol, evaluate_model, data, local_test, ids)

  def evaluate(state) -> dict[str, jax.Array]:
    accuracy, loss = evaluate_model(protocol.model(state), x_test, y_test)
    nodes = protocol.node_models(state) if protocol.node_models else None
    if nodes is None:
      out = {'accuracy': accuracy, 'loss': loss}
      models = jax.tree.map(lambda x: x[None], protocol.model(state))
    else:
      evaluated = nodes if ids is None else jax.tree.map(lambda p: p[ids], nodes)
      out = metrics_lib.node_accuracy(evaluate_model, evaluated, x_test, y_test)
      out.update(consensus_accuracy=accuracy, consensus_loss=loss,
                 consensus_distance=metrics_lib.consensus_distance(nodes))
      models = nodes
    out.update(metrics_lib.weight_variance(models))
    if protocol.client_models:
      clients, valid = protocol.client_models(state)
      out.update(metrics_lib.client_accuracy(evaluate_model, clients, valid, x_test, y_test))
    if protocol.extra_metrics:
      out.update(protocol.extra_metrics(state))
    if local is not None:
      out.update(local(state))
    return out

  return evaluate


def local_evaluate(c: ExperimentConfig, protocol: Protocol, evaluate_model, data: NodeData,
                   local_test: partition_lib.Partition | None, ids: np.ndarray | None):
  """``state -> local_accuracy and its quantiles``: each evaluated node (``ids``; None:
  all) that holds local test samples scores the model it holds (its own, or the
  delivered one) on them; None without ``--local_test_fraction``."""
  if local_test is None:
    return None
  ids = np.arange(c.nodes) if ids is None else ids
  ids = jnp.asarray(ids[np.asarray(local_test.sizes)[ids] > 0])  # [k] nodes with test samples
  idx, sizes = local_test.idx[ids], local_test.sizes[ids]  # [k, T], [k]

  def local(state):
    nodes = protocol.node_models(state) if protocol.node_models else None
    models = None if nodes is None else jax.tree.map(lambda p: p[ids], nodes)
    return metrics_lib.local_accuracy(evaluate_model, models, protocol.model(state), data.x,
                                      data.y, idx, sizes)

  return local


def _memory_limit() -> int:
  """Bytes the run may use: the device's limit where it reports one, else physical memory."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'bytes_limit' in stats:
    return int(stats['bytes_limit']) * jax.local_device_count()
  return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')


def check_feasible(c: ExperimentConfig, learner: Learner, data: NodeData,
                   protocol: Protocol | None = None) -> None:
  """Refuses what would only fail later: too many local steps, partitions or bytes (the
  protocol's state where given, else N models with their optimiser state)."""
  steps = math.ceil(c.local_epochs * data_width(data) / c.batch_size)
  check(steps <= MAX_LOCAL_STEPS,
        f'--local_epochs={c.local_epochs} means {steps} local steps per round for the largest '
        f'node (at most {MAX_LOCAL_STEPS}): lower --local_epochs or raise --batch_size')
  slots = {'sgd': 2, 'adam': 3}[c.optimizer]  # params + momentum (+ second moment)
  together = c.replicas if c.replicas_vmapped else 1  # replicas in memory at once
  need = together * c.nodes * learner.model_bytes() * (slots + 1)  # + one transient copy
  if protocol is not None:  # the state it keeps (FedAvg: O(s)) and a transient copy of its rows
    shapes = jax.eval_shape(protocol.init, jax.random.key(0), data)
    need = together * (_tree_bytes(shapes) + _tree_bytes(shapes.nodes.params))
  limit = _memory_limit()
  check(need <= limit, f'--nodes={c.nodes} x {together} replica(s) of this --model need about '
        f'{need / 2 ** 30:.1f} GiB for models and optimiser state, more than the '
        f'{limit / 2 ** 30:.1f} GiB here: lower --nodes, use --param_dtype=bfloat16 or --devices')


def data_width(data) -> int:
  """L: the longest client's samples (a table's row width, or generated clients' maximum)."""
  return int(data.max_size)


def _tree_bytes(tree) -> int:
  return sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)
             if hasattr(leaf, 'size') and not jax.dtypes.issubdtype(leaf.dtype,
                                                                    jax.dtypes.prng_key))


def build(c: ExperimentConfig, *, dataset: sources.ArrayDataset | None = None,
          module: nn.Module | None = None, seeds: Seeds | None = None) -> Experiment:
  """Validates ``c`` and builds its data, learner, protocol and evaluation.

  ``dataset`` (your arrays) replaces ``--dataset`` and ``module`` (your flax model)
  replaces ``--model``; see docs/extending.md. ``seeds`` (default: ``--seed`` for
  every part) seed the data, graph and network apart (``decsim.rng.Seeds``).
  """
  validate(c)
  dataset, data, local_test = load_data(c, dataset, seeds)
  learner, apply_fn = make_learner(c, dataset, module=module)
  protocol = make_protocol(c, learner,
                           lambda transform: make_learner(c, dataset, transform, module)[0],
                           seeds)
  check_feasible(c, learner, data, protocol)
  evaluate = make_evaluate(c, protocol, apply_fn, jnp.asarray(dataset.x_test),
                           jnp.asarray(dataset.y_test), data, local_test, seeds)
  return Experiment(c, protocol, learner, data, evaluate, dataset, apply_fn)


def root_keys(c: ExperimentConfig) -> jax.Array:
  """The run's root key, or with vmapped replicas one per replica: replica i draws
  init, batches, samples and per-round churn from seed + i."""
  if not c.replicas_vmapped:
    return jax.random.key(c.seed)
  return jax.vmap(jax.random.key)(c.seed + jnp.arange(c.replicas))


def message_bytes(c: ExperimentConfig, protocol: Protocol, learner: Learner) -> tuple[int, ...]:
  """Bytes of one message of each kind: the protocol's own, or model, view and ping."""
  if protocol.message_bytes is not None:
    return protocol.message_bytes
  return network_lib.message_bytes(learner.model_bytes(), c.nodes)


def make_report(c: ExperimentConfig, exp: Experiment) -> report_lib.Report:
  """One row per evaluation, messages priced by ``message_bytes``, the target of ``c``."""
  return report_lib.network_report(message_bytes(c, exp.protocol, exp.learner),
                                   c.target_accuracy)


def run(c: ExperimentConfig, out_dir: str | pathlib.Path | None = None, log=print, *,
        dataset: sources.ArrayDataset | None = None,
        module: nn.Module | None = None) -> dict[str, Any]:
  """Builds and runs ``c``; writes config.json, metrics.jsonl, summary.json, accuracy.png.

  ``out_dir`` is locked for the run and an earlier run there is kept until this one
  has a first finite evaluation (``decsim.rundir``); nothing is written before ``c``
  is valid, the data is loaded and the round has compiled.
  """
  validate(c)
  with interrupts.deferred(), rundir.opened(out_dir, dataclasses.asdict(c)) as run_dir:
    return _run_in(run_dir, c, log, dict(dataset=dataset, module=module))


def _run_in(run_dir: rundir.RunDirectory | None, c: ExperimentConfig, log,
            parts: dict[str, Any]) -> dict[str, Any]:
  if c.replicas > 1 and not c.replicas_vmapped:  # independent replicas, one after another
    if run_dir is not None:
      run_dir.write_json('config.json', dataclasses.asdict(c))
    summary = replicas.run_apart(c.replicas, run_dir, c.rounds,
                                 lambda i, sub: _run_replica(c, i, sub, log, parts), log)
  else:
    summary = _run_one(c, run_dir, log, parts, None, {'config.json': dataclasses.asdict(c)})
  if run_dir is not None:
    from decsim import plotting  # matplotlib only when writing a run directory
    plotting.plot_accuracy(run_dir.path)
  return summary


def replica_config(c: ExperimentConfig, i: int) -> tuple[ExperimentConfig, Seeds]:
  """Replica ``i`` of ``c`` as a single run, and the seeds of its parts."""
  return (dataclasses.replace(c, seed=c.seed + i, replicas=1, replica_fix=None),
          Seeds.of(c.seed, i, c.replica_parts))


def _run_replica(c: ExperimentConfig, i: int, sub, log, parts: dict[str, Any]) -> dict[str, Any]:
  one, seeds = replica_config(c, i)
  files = {'config.json': {**dataclasses.asdict(one), 'replica': i, 'seeds': seeds._asdict()}}
  return _run_one(one, sub, log, parts, seeds, files)


def _run_one(c: ExperimentConfig, run_dir, log, parts: dict[str, Any], seeds: Seeds | None,
             files: dict[str, Any]) -> dict[str, Any]:
  exp = build(c, **parts, seeds=seeds)
  return simulate.run(exp.protocol, exp.data, exp.evaluate, key=root_keys(c),
                      rounds=c.rounds, eval_every=c.eval_every, report=make_report(c, exp),
                      run_dir=run_dir, checkpoint_every=c.checkpoint_every, resume=c.resume,
                      log=log, mesh=sharding.make_mesh(c.devices) if c.devices != 1 else None,
                      files=files, tensorboard=c.tensorboard)
