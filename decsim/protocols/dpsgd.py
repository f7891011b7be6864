"""Decentralized parallel SGD (Lian et al., "Can Decentralized Algorithms Outperform
Centralized Algorithms? A Case Study for Decentralized Parallel Stochastic Gradient
Descent", NeurIPS 2017).

Every online node takes its local steps, sends its model to its neighbours, and
replaces its model by the W-weighted average of what it holds (train, then mix:
the adapt-then-combine order decentralizepy runs). W is a fixed doubly
stochastic matrix (Metropolis-Hastings weights of a graph) or a time-varying one
such as the one-peer exponential graph of MoDeST's baseline. Offline nodes
neither train, send nor receive; live rows renormalise over live neighbours.
Optionally each mix is followed by variance correction (Tian et al. 2024, see
``decsim.mixing.variance_correct``). The merge step is an operator
(``decsim.aggregation.MergeFn``) that a caller may replace.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from decsim import mixing
from decsim import topology as topology_lib
from decsim.aggregation import MergeFn, mixing_merge
from decsim.data.sampler import NodeData
from decsim.network import MODEL, Network, model_messages, uniform_network
from decsim.protocols import registry
from decsim.protocols.base import Learner, Protocol, init_params, node_average, train_online
from decsim.rng import Stream
from decsim.state import NodeState, RoundMetrics, SimState, init_sim_state
from decsim.topology import Topology
from decsim.types import Params, PRNGKey

TopologyFn = Callable[[jax.Array], Topology]  # round -> graph of that round


def dpsgd(learner: Learner, *, nodes: int, topology: Topology | TopologyFn,
          mixing_mode: str = 'auto', network: Network | None = None,
          variance_correction: mixing.VarianceCorrection | None = None,
          merge: MergeFn | None = None) -> Protocol:
  """D-PSGD; ``merge(graph, params, alive)`` replaces the default merge, the W-mix
  ``mixing.mix_corrected`` with ``variance_correction`` and ``mixing_mode``. Messages
  and simulated time still follow ``topology`` whatever the merge does."""
  if merge is not None and variance_correction is not None:
    raise ValueError('dpsgd: pass variance_correction or merge, not both (the default merge '
                     'applies it; a custom merge must do its own)')
  merge = merge if merge is not None else mixing_merge(variance_correction, mixing_mode)
  topology_at = topology if callable(topology) else (lambda r: topology)
  network = network if network is not None else uniform_network(nodes)
  model_bytes = learner.model_bytes()

  def init(key: PRNGKey, data: NodeData) -> SimState:
    del data
    params = init_params(learner, jax.random.fold_in(key, Stream.INIT), nodes)
    opt_state = jax.vmap(learner.tx.init)(params)
    return init_sim_state(key, NodeState(params, opt_state))

  def round_(state: SimState, data: NodeData) -> tuple[SimState, RoundMetrics]:
    r, alive = state.round, state.available  # alive [N]
    params, opt_state, result = train_online(learner, state, data, nodes)

    graph = mixing.renormalize(topology_at(r), alive)
    # With variance_correction, each live node's layers are rescaled after mixing
    # to the (plain or W-weighted) mean variance of the models it averaged.
    params = merge(graph, params, alive)

    sent = _models_sent_per_node(graph)  # [N]
    steps = jnp.where(alive, result.steps, 0)  # [N]
    n_alive = jnp.sum(alive, dtype=jnp.int32)
    seconds = _barrier_seconds(network, graph, steps * learner.batch_size, alive, model_bytes)
    round_sent = jnp.sum(sent)
    state = state.replace(
        round=r + 1,
        nodes=NodeState(params, opt_state),
        clock=state.clock + seconds,
        sent=state.sent.at[:, MODEL].add(sent))
    metrics = RoundMetrics(
        train_loss=jnp.sum(jnp.where(alive, result.loss, 0.0)) / jnp.maximum(n_alive, 1),
        sim_seconds=seconds,
        messages=model_messages(round_sent),
        active_nodes=n_alive,
        node_steps=jnp.sum(steps))
    return state, metrics

  def model(state: SimState) -> Params:
    return node_average(state.nodes.params)

  return Protocol(init, round_, model)


def _barrier_seconds(network: Network, graph: Topology, samples: jax.Array, alive: jax.Array,
                     model_bytes: int) -> jax.Array:
  """Synchronous round: node i is done when it has trained and holds every neighbour's
  model, max(train_i, max_j train_j + transfer(j -> i)); the round waits for the last node.
  A node's sends share its upload, its receipts its download."""
  n = graph.idx.shape[0]
  train = network.compute_seconds(jnp.arange(n), samples)  # [N]
  receives = (graph.weights > 0) & (graph.idx != jnp.arange(n)[:, None])  # [N, k]
  sends = _models_sent_per_node(graph)  # [N] out-degree
  in_degree = jnp.sum(receives, axis=1)  # [N]
  arrival = train[graph.idx] + network.transfer_seconds(
      graph.idx, jnp.arange(n)[:, None], model_bytes, up_share=sends[graph.idx],
      down_share=in_degree[:, None])  # [N, k]
  done = jnp.maximum(train, jnp.max(jnp.where(receives, arrival, 0.0), axis=1))  # [N]
  return jnp.max(jnp.where(alive, done, 0.0))


def _models_sent_per_node(graph: Topology) -> jax.Array:
  """Node j sends one model to every other node whose row gives j a positive weight: [N]."""
  n = graph.idx.shape[0]
  receives = (graph.weights > 0) & (graph.idx != jnp.arange(n)[:, None])  # [N, k]
  return jax.ops.segment_sum(receives.astype(jnp.int32).ravel(), graph.idx.ravel(), num_segments=n)


def build(ctx: registry.BuildContext) -> Protocol:
  c = ctx.config
  graph = topology_lib.from_config(c, ctx.seeds.graph)
  protocol = dpsgd(ctx.learner, nodes=c.nodes, topology=graph, mixing_mode=c.mixing,
                   network=ctx.network,
                   variance_correction=ctx.variance_correction)
  return protocol._replace(node_models=lambda state: state.nodes.params)


registry.register(registry.ProtocolSpec(
    'dpsgd', build, 'D-PSGD (Lian et al., NeurIPS 2017)', topology_lib.check_graph))
