"""Federated averaging (McMahan et al., "Communication-Efficient Learning of Deep
Networks from Decentralized Data", AISTATS 2017).

Each round the server samples ``s`` of the available clients, sends them the
global model, each runs local SGD from it, and the server replaces the global
model by the average of the returned models, weighted by client data size
(``data_size``, the paper's n_k/n) or uniformly. Only the ``s`` sampled rows are
gathered, trained and scattered back: a round costs O(s) model work, not O(N).
Clients start a fresh optimiser state every round (stateless clients).

The server runs on node ``server`` (MoDeST's FL baseline puts it on the node with
the lowest median latency). It waits for the slowest sampled client's download,
training and upload — or, with a success fraction ``sf < 1``, only for the
ceil(sf * s) fastest, and ignores the rest of that round's models.

Optionally the new global model is variance-corrected (Tian et al. 2024, see
``decsim.mixing.variance_correct``) to the mean variance of the accepted client models.
"""

import math

import jax
import jax.numpy as jnp
from flax import struct

from decsim import mixing
from decsim.data.sampler import NodeData
from decsim.network import MODEL, Network, model_messages, uniform_network
from decsim.protocols.base import (Learner, Protocol, broadcast, sample_available, train_nodes,
                                   weighted_average)
from decsim.rng import Stream, node_keys, round_key
from decsim.state import NodeState, RoundMetrics, SimState, init_sim_state
from decsim.types import Params, PRNGKey

WEIGHTINGS = ('data_size', 'uniform')


@struct.dataclass
class FedAvgState:
  global_params: Params  # the server model


def fedavg(learner: Learner, *, nodes: int, sample_size: int, weighting: str = 'data_size',
           network: Network | None = None, server: int = 0,
           success_fraction: float = 1.0,
           variance_correction: mixing.VarianceCorrection | None = None) -> Protocol:
  if not 1 <= sample_size <= nodes:
    raise ValueError(f'sample size {sample_size} must be in 1..{nodes} (the number of nodes)')
  if weighting not in WEIGHTINGS:
    raise ValueError(f'unknown weighting {weighting!r}: choose one of {", ".join(WEIGHTINGS)}')
  if not 0 < success_fraction <= 1:
    raise ValueError(f'success fraction {success_fraction} must be in (0, 1]')
  network = network if network is not None else uniform_network(nodes)
  model_bytes = learner.model_bytes()
  wait_for = math.ceil(success_fraction * sample_size)

  def init(key: PRNGKey, data: NodeData) -> SimState:
    del data
    global_params = learner.init_params(jax.random.fold_in(key, Stream.INIT))
    # Node rows hold each client's last local model; they start as the global one.
    node_states = NodeState(params=broadcast(global_params, nodes), opt_state=())
    return init_sim_state(key, node_states, FedAvgState(global_params))

  def round_(state: SimState, data: NodeData) -> tuple[SimState, RoundMetrics]:
    r = state.round
    ids, valid = sample_available(round_key(state.key, r, Stream.SAMPLE), state.available,
                                  sample_size)  # [s], [s]
    params = broadcast(state.extra.global_params, sample_size)
    opt_state = jax.vmap(learner.tx.init)(params)
    keys = node_keys(state.key, r, ids, Stream.BATCH)  # [s]
    result = train_nodes(learner, params, opt_state, keys, data, rows=ids)

    steps = jnp.where(valid, result.steps, 0)  # [s]
    finish = (network.transfer_seconds(server, ids, model_bytes)
              + network.compute_seconds(ids, steps * learner.batch_size)
              + network.transfer_seconds(ids, server, model_bytes))  # [s]
    finish = jnp.where(valid, finish, jnp.inf)
    n_valid = jnp.sum(valid, dtype=jnp.int32)
    # The server aggregates the first ceil(sf * s) models to arrive (all, if fewer came).
    arrival_rank = jnp.argsort(jnp.argsort(finish))  # [s]
    accepted = valid & (arrival_rank < jnp.minimum(wait_for, n_valid))
    seconds = jnp.max(jnp.where(accepted, finish, 0.0))

    sizes = data.sizes[ids].astype(jnp.float32)  # [s]
    weights = (sizes if weighting == 'data_size' else jnp.ones_like(sizes)) * accepted
    any_accepted = jnp.any(accepted)
    averaged = weighted_average(result.params, jnp.where(any_accepted, weights, 1.0))
    if variance_correction is not None:
      averaged = _correct(variance_correction, averaged, state.extra.global_params,
                          result.params, jnp.where(any_accepted, weights, 1.0),
                          jnp.where(any_accepted, accepted, True))
    new_global = jax.tree.map(
        lambda new, old: jnp.where(any_accepted, new, old), averaged, state.extra.global_params)

    scatter_ids = jnp.where(valid, ids, nodes)  # invalid draws are dropped
    node_params = jax.tree.map(lambda all_, new: all_.at[scatter_ids].set(new, mode='drop'),
                               state.nodes.params, result.params)
    sent = (state.sent.at[scatter_ids, MODEL].add(1, mode='drop')  # uploads
            .at[server, MODEL].add(n_valid))  # the server's downloads
    state = state.replace(
        round=r + 1,
        nodes=state.nodes.replace(params=node_params),
        clock=state.clock + seconds,
        sent=sent,
        extra=FedAvgState(new_global))
    metrics = RoundMetrics(
        train_loss=jnp.sum(result.loss * valid) / jnp.maximum(n_valid, 1),
        sim_seconds=seconds,
        messages=model_messages(2 * n_valid),
        active_nodes=n_valid,
        node_steps=jnp.sum(steps))
    return state, metrics

  def model(state: SimState) -> Params:
    return state.extra.global_params

  return Protocol(init, round_, model)


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
