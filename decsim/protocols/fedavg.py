"""Federated averaging (McMahan et al., "Communication-Efficient Learning of Deep
Networks from Decentralized Data", AISTATS 2017).

Each round the server samples ``s`` of the available clients, sends them the
global model, each runs local SGD from it, and the server replaces the global
model by the average of the returned models, weighted by client data size
(``data_size``, the paper's n_k/n) or uniformly. Only the ``s`` sampled rows are
trained: a round costs O(s) model work, not O(N).
Clients start a fresh optimiser state every round (stateless clients).

Memory is O(s x model + N) too: the state holds the global model, the server's
optimiser and aggregator state, and only the rows in flight — the ``s`` models the
last round's clients trained (``SimState.nodes``, leaves ``[s, ...]``, scored as
``client_accuracy``) and their ids; per-node arrays are the small ones (bytes sent,
availability). No client keeps a model between rounds, so none is stored; a
checkpoint holds the same O(s) state. (Until issue 16 every client kept its last
model in an ``[N, ...]`` row that nothing read but ``client_accuracy``.)

The server runs on node ``server`` (MoDeST's FL baseline puts it on the node with
the lowest median latency). It waits for the slowest sampled client's download,
training and upload — or, with a success fraction ``sf < 1``, only for the
ceil(sf * s) fastest, and ignores the rest of that round's models.

Optionally the new global model is variance-corrected (Tian et al. 2024, see
``decsim.mixing.variance_correct``) to the mean variance of the accepted client models.

The aggregation rule and the server's update are pluggable (``decsim.aggregation``):
a robust aggregate (coordinate-wise median or trimmed mean, Yin et al., ICML 2018)
can replace the weighted mean, and a server optimizer (FedAvgM, FedAdam, FedYogi,
FedAdagrad; Reddi et al., ICLR 2021) can step the global model along the
pseudo-gradient ``global - aggregate`` instead of replacing it. The defaults are
plain FedAvg, bitwise. The order is aggregate, variance-correct, server step.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax
from flax import struct

from decsim import aggregation, mixing
from decsim.config import Component, check, option
from decsim.errors import ConfigError
from decsim.aggregation import AggState, Aggregator, ServerOptimizer
from decsim.data.sampler import NodeData
from decsim.network import (MODEL, Network, lowest_median_latency_node, model_messages,
                            uniform_network)
from decsim.protocols import registry
from decsim.protocols.base import Learner, Protocol, broadcast, sample_available, train_nodes
from decsim.rng import Stream, node_keys, round_key
from decsim.state import NodeState, RoundMetrics, SimState, init_sim_state
from decsim.types import Params, PRNGKey, Stacked

WEIGHTINGS = ('data_size', 'uniform')


@dataclasses.dataclass(frozen=True)
class FedAvgConfig(Component):
  """FedAvg and MoDeST: sampled clients."""

  sample_size: int = option(10, 'FedAvg and MoDeST: clients sampled per round (s).', low=1)
  weighting: str = option('data_size', 'FedAvg aggregation weights.',
                          choices=WEIGHTINGS)
  success_fraction: float = option(1.0, 'FedAvg/MoDeST: aggregate once ceil(sf * s) models '
                                   'arrived; later ones are ignored.', low=0, high=1,
                                   low_open=True)
  aggregator: str = option('mean', 'FedAvg server aggregation: mean (weighted), median '
                           '(coordinate-wise) or trimmed_mean (Yin et al. 2018).',
                           choices=aggregation.AGGREGATORS)
  trim_fraction: float = option(0.1, '--aggregator=trimmed_mean: fraction of the lowest and of '
                                'the highest values dropped per coordinate.', low=0, high=0.5,
                                high_open=True)
  server_optimizer: str = option('sgd', 'FedAvg server optimizer on the pseudo-gradient (Reddi '
                                 'et al. 2021); sgd with --server_lr=1 is plain FedAvg.',
                                 choices=aggregation.SERVER_OPTIMIZERS)
  server_lr: float = option(1.0, 'Server learning rate.', low=0, low_open=True)
  server_momentum: float = option(0.0, 'Server momentum (--server_optimizer=sgd or momentum).',
                                  low=0, high=1, high_open=True)

  def check(self):
    self.server()

  def server(self) -> aggregation.ServerOptimizer:
    try:
      return aggregation.ServerOptimizer(self.server_optimizer, self.server_lr,
                                         self.server_momentum)
    except ValueError as e:
      raise ConfigError(str(e)) from None


@struct.dataclass
class FedAvgState:
  global_params: Params  # the server model
  server_opt_state: optax.OptState = ()  # () when the aggregate replaces the global model
  aggregator_state: AggState = ()
  clients: jax.Array = ()  # [s] int32 ids of the last round's clients (N: no client)


@dataclasses.dataclass(frozen=True)
class ServerConfig:
  """The server's static configuration, closed over by the round."""

  aggregator: Aggregator
  optimizer: ServerOptimizer
  tx: optax.GradientTransformation  # optimizer.transformation(), built once
  variance_correction: mixing.VarianceCorrection | None


def fedavg(learner: Learner, *, nodes: int, sample_size: int, weighting: str = 'data_size',
           network: Network | None = None, server: int = 0,
           success_fraction: float = 1.0,
           variance_correction: mixing.VarianceCorrection | None = None,
           aggregator: Aggregator | None = None,
           server_optimizer: ServerOptimizer | None = None) -> Protocol:
  """FedAvg; ``aggregator`` (default the weighted mean) combines the accepted client
  models and ``server_optimizer`` (default: the aggregate is the new global model)
  steps the global model towards it (see ``decsim.aggregation``)."""
  check_arguments(nodes, sample_size, weighting, success_fraction)
  network = network if network is not None else uniform_network(nodes)
  optimizer = server_optimizer if server_optimizer is not None else ServerOptimizer()
  config = ServerConfig(aggregator if aggregator is not None else aggregation.mean(), optimizer,
                        optimizer.transformation(), variance_correction)
  model_bytes = learner.model_bytes()
  wait_for = math.ceil(success_fraction * sample_size)

  def init(key: PRNGKey, data: NodeData) -> SimState:
    del data
    global_params = learner.init_params(jax.random.fold_in(key, Stream.INIT))
    # The rows in flight: the last round's s client models; they start as the global one.
    node_states = NodeState(params=broadcast(global_params, sample_size), opt_state=())
    return init_sim_state(key, node_states, init_server(config, global_params, nodes,
                                                        sample_size), num_nodes=nodes)

  def round_(state: SimState, data: NodeData) -> tuple[SimState, RoundMetrics]:
    r = state.round
    ids, valid = sample_clients(round_key(state.key, r, Stream.SAMPLE), state.available,
                                sample_size)  # [s], [s]
    params = broadcast(state.extra.global_params, sample_size)
    opt_state = jax.vmap(learner.tx.init)(params)
    keys = node_keys(state.key, r, ids, Stream.BATCH)  # [s]
    result = train_nodes(learner, params, opt_state, keys, data, rows=ids, round_=r)

    steps = jnp.where(valid, result.steps, 0)  # [s]
    n_valid = jnp.sum(valid, dtype=jnp.int32)
    finish = finish_seconds(network, server, ids, steps * learner.batch_size, model_bytes,
                            n_valid)
    accepted, seconds = accept_first(jnp.where(valid, finish, jnp.inf), valid, wait_for)
    weights = client_weights(data.sizes[ids], weighting, accepted)  # [s]
    state = state.replace(
        round=r + 1,
        nodes=state.nodes.replace(params=result.params),  # [s, ...]
        clock=state.clock + seconds,
        sent=count_sent(state.sent, ids, valid, server),
        extra=aggregate_clients(config, state.extra, result.params, weights, accepted).replace(
            clients=jnp.where(valid, ids, nodes)))
    metrics = RoundMetrics(
        train_loss=jnp.sum(result.loss * valid) / jnp.maximum(n_valid, 1),
        sim_seconds=seconds,
        messages=model_messages(2 * n_valid),
        active_nodes=n_valid,
        node_steps=jnp.sum(steps))
    return state, metrics

  def model(state: SimState) -> Params:
    return state.extra.global_params

  return Protocol(init, round_, model, client_models=in_flight)


SPARSE_SAMPLE_MIN_NODES = 65_536  # sample_clients: O(s) draws from here on


def sample_clients(key: PRNGKey, available: jax.Array, s: int) -> tuple[jax.Array, jax.Array]:
  """``s`` distinct clients drawn uniformly among the available ones: ``(ids [s], valid [s])``.

  Up to ``SPARSE_SAMPLE_MIN_NODES`` nodes this is ``base.sample_available`` (top s of N
  uniform scores, O(N)). Beyond, it draws ``8 s + 64`` ids uniformly with replacement,
  keeps the available ones at their first occurrence, and takes the first s: a uniform
  s-subset of the available nodes (sequential sampling without replacement by
  rejection) in O(s log s). When too few come through (most nodes offline) the round
  falls back to the O(N) draw.
  """
  nodes = available.shape[0]
  if nodes < SPARSE_SAMPLE_MIN_NODES:
    return sample_available(key, available, s)
  k_draw, k_dense = jax.random.split(key)
  ids = jax.random.randint(k_draw, (8 * s + 64,), 0, nodes, jnp.int32)  # [k]
  order = jnp.argsort(ids, stable=True)  # [k]
  repeat = jnp.zeros(ids.shape, bool).at[order[1:]].set(ids[order[1:]] == ids[order[:-1]])
  keep = available[ids] & ~repeat  # [k]
  slot = jnp.where(keep, jnp.cumsum(keep) - 1, s)  # [k] position among the kept
  picked = jnp.zeros((s,), jnp.int32).at[slot].set(ids, mode='drop')  # [s]
  return jax.lax.cond(jnp.sum(keep) >= s, lambda: (picked, jnp.ones((s,), bool)),
                      lambda: sample_available(k_dense, available, s))


def in_flight(state: SimState) -> tuple[Stacked, jax.Array]:
  """The last round's client models (leaves ``[s, ...]``) and which were real draws ([s])."""
  return state.nodes.params, state.extra.clients < state.available.shape[0]


# The server's steps below are public: SCAFFOLD (``scaffold.py``) composes the same round.
def check_arguments(nodes: int, sample_size: int, weighting: str, success_fraction: float) -> None:
  if not 1 <= sample_size <= nodes:
    raise ValueError(f'sample size {sample_size} must be in 1..{nodes} (the number of nodes)')
  if weighting not in WEIGHTINGS:
    raise ValueError(f'unknown weighting {weighting!r}: choose one of {", ".join(WEIGHTINGS)}')
  if not 0 < success_fraction <= 1:
    raise ValueError(f'success fraction {success_fraction} must be in (0, 1]')


def init_server(config: ServerConfig, global_params: Params, nodes: int,
                sample_size: int) -> FedAvgState:
  opt_state = () if config.optimizer.replaces_global else config.tx.init(global_params)
  return FedAvgState(global_params, opt_state, config.aggregator.init(global_params),
                     clients=jnp.full((sample_size,), nodes, jnp.int32))


def finish_seconds(network: Network, server: int, ids: jax.Array, samples: jax.Array,
                   model_bytes: int, clients: jax.Array) -> jax.Array:
  """When each client's model reaches the server: download, training, upload [s]; the
  server's bandwidth is shared by its ``clients`` downloads, then uploads."""
  return (network.transfer_seconds(server, ids, model_bytes, up_share=clients)
          + network.compute_seconds(ids, samples)
          + network.transfer_seconds(ids, server, model_bytes, down_share=clients))  # [s]


def accept_first(finish: jax.Array, valid: jax.Array, wait_for: int) -> tuple[jax.Array, jax.Array]:
  """The server aggregates the first ceil(sf * s) models to arrive (all, if fewer came).

  ``finish`` [s] is each client's arrival time (inf for invalid draws); returns the
  accepted mask [s] and the round's duration, the last accepted arrival.
  """
  n_valid = jnp.sum(valid, dtype=jnp.int32)
  arrival_rank = jnp.argsort(jnp.argsort(finish))  # [s]
  accepted = valid & (arrival_rank < jnp.minimum(wait_for, n_valid))
  return accepted, jnp.max(jnp.where(accepted, finish, 0.0))


def client_weights(sizes: jax.Array, weighting: str, accepted: jax.Array) -> jax.Array:
  """Aggregation weights [s]: data size n_k or 1 for accepted clients, 0 for the rest."""
  sizes = sizes.astype(jnp.float32)  # [s]
  return (sizes if weighting == 'data_size' else jnp.ones_like(sizes)) * accepted


def aggregate_clients(config: ServerConfig, server: FedAvgState, clients: Stacked,
                      weights: jax.Array, accepted: jax.Array) -> FedAvgState:
  """The next server state from the client models [s, ...]; unchanged when no
  model was accepted (the aggregate of nothing is then computed over all rows and
  discarded, so that it stays finite)."""
  any_accepted = jnp.any(accepted)
  weights = jnp.where(any_accepted, weights, 1.0)  # [s]
  aggregate, agg_state = config.aggregator.apply(clients, weights, server.aggregator_state)
  if config.variance_correction is not None:
    aggregate = _correct(config.variance_correction, aggregate, server.global_params, clients,
                         weights, jnp.where(any_accepted, accepted, True))
  if config.optimizer.replaces_global:
    new_global, opt_state = aggregate, server.server_opt_state
  else:
    new_global, opt_state = aggregation.server_step(config.tx, server.server_opt_state,
                                                    server.global_params, aggregate)
  new = server.replace(global_params=new_global, server_opt_state=opt_state,
                       aggregator_state=agg_state)
  return jax.tree.map(lambda n, o: jnp.where(any_accepted, n, o), new, server)


def scatter_clients(node_params: Stacked, clients: Stacked, ids: jax.Array,
                    valid: jax.Array) -> Stacked:
  """Node rows [N, ...] with the valid clients' models [s, ...] written to rows ``ids``."""
  nodes = jax.tree.leaves(node_params)[0].shape[0]
  scatter_ids = jnp.where(valid, ids, nodes)  # invalid draws are dropped
  return jax.tree.map(lambda all_, new: all_.at[scatter_ids].set(new, mode='drop'),
                      node_params, clients)


def count_sent(sent: jax.Array, ids: jax.Array, valid: jax.Array, server: int) -> jax.Array:
  """One upload per valid client, and the server's download to each: sent [N, K]."""
  scatter_ids = jnp.where(valid, ids, sent.shape[0])  # invalid draws are dropped
  return (sent.at[scatter_ids, MODEL].add(1, mode='drop')  # uploads
          .at[server, MODEL].add(jnp.sum(valid, dtype=jnp.int32)))  # the server's downloads


def _correct(vc: mixing.VarianceCorrection, averaged: Params, old_global: Params,
             clients: Params, weights: jax.Array, valid: jax.Array) -> Params:
  """Variance correction of the server average; the target is the plain or weighted
  mean of the valid client models' per-layer variances, or the old global's ('self')."""
  var = mixing.layer_variance(clients, vc.unbiased)  # [s] per leaf
  own = mixing.layer_variance(broadcast(old_global, 1), vc.unbiased)  # [1] per leaf
  plain_sum = jax.tree.map(lambda v: jnp.sum(v * valid)[None], var)  # [1] per leaf
  weighted_sum = jax.tree.map(lambda v: jnp.sum(v * weights)[None], var)  # [1] per leaf
  target = mixing.received_target(vc, own, plain_sum, jnp.sum(valid)[None], weighted=weighted_sum,
                                  weight=jnp.sum(weights)[None])
  corrected = mixing.variance_correct(broadcast(averaged, 1), target, vc)
  return jax.tree.map(lambda x: x[0], corrected)


def check_sampled(c) -> None:
  """Checks of the sampled protocols (FedAvg, FedProx, MoDeST) on the whole config."""
  check(c.sample_size <= c.nodes,
        f'--sample_size={c.sample_size} must be in 1..--nodes={c.nodes}: lower --sample_size')
  check(c.init == 'shared', f'--init=independent has no meaning for --protocol={c.protocol} '
        '(one model travels between clients); drop --init or use a decentralized protocol')


def server_options(ctx: registry.BuildContext) -> dict:
  """FedAvg's keyword arguments from an experiment config, shared by the protocols built
  on its server (FedProx, SCAFFOLD); the server sits on the lowest-median-latency node."""
  c = ctx.config
  return dict(nodes=c.nodes, sample_size=c.sample_size, weighting=c.weighting,
              network=ctx.network, server=lowest_median_latency_node(ctx.network),
              success_fraction=c.success_fraction, variance_correction=ctx.variance_correction,
              aggregator=aggregation.make_aggregator(c.aggregator, c.trim_fraction),
              server_optimizer=c.server())


def build(ctx: registry.BuildContext, learner: Learner | None = None) -> Protocol:
  """FedAvg from an experiment config."""
  return fedavg(learner or ctx.learner, **server_options(ctx))


registry.register(registry.ProtocolSpec(
    'fedavg', build, 'FedAvg (McMahan et al., AISTATS 2017)', check_sampled, FedAvgConfig))
