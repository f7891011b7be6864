"""Epidemic Learning (M. de Vos, S. Farhadkhani, R. Guerraoui, A.-M. Kermarrec,
R. Pires, R. Sharma, "Epidemic Learning: Boosting Decentralized Learning with
Randomized Communication", NeurIPS 2023).

Every round each online node takes its local steps, sends its model to ``s``
other nodes (``--el_fanout``) and averages its own model with the models it
received, as D-PSGD does (train, then mix); only the communication graph is
new, and it is drawn afresh every round:

* ``el_oracle``: the round's graph is a random s-regular graph over the nodes
  (an oracle builds it); node i averages its model and its s neighbours' with
  weight 1/(s+1) each. On a regular graph this is also the Metropolis-Hastings
  rule, so W is symmetric and doubly stochastic.
* ``el_local``: each node pushes its model to s distinct nodes drawn uniformly
  among the others; a node that received m models averages them with its own,
  weight 1/(m+1) each (m varies from node to node). The merge is a scatter-add
  of the sent models over their receivers, one pass per fanout slot: O(N s P)
  and no N x N matrix.

The authors' code (sacs-epfl/decentralizepy): ``node/EpidemicLearning/EL_Local.py``
(``EL_Local.get_neighbors`` samples s of the other nodes each round,
``run`` trains, sends and averages what arrived), ``EL_Oracle_Client`` /
``EL_Oracle_TopologyBuilder`` over ``node/PeerSamplerDynamic.py``
(``get_neighbors``: a fresh ``Regular`` graph of degree s per iteration), both
with ``sharing/PlainAverageSharing.py`` (``_averaging``: weight 1/(received+1)
for every model, own included) and s = ``graph_degree = 7`` in
``tutorial/EpidemicLearning/config_EL.ini``, the paper's s for 96 nodes.

Randomness: the round's graph and peers come from ``(run key, round,
Stream.TOPOLOGY)`` (``decsim.rng``), so runs are deterministic and resume
exactly. Messages and simulated time count every push: a node uploads one model
per receiver; its pushes share its upload and a receiver's arrivals its download
(see ``round_seconds``).

Deviations:

* EL-Oracle's graph of round r is a uniformly random relabelling of one random
  s-regular graph drawn on the host from the graph's seed (``--seed``, as D-PSGD's
  ``--topology=kregular``; ``topology.kregular``; a
  perfect matching for s = 1), not an independent draw per round: a random
  s-regular graph cannot be drawn exactly under jit. Each round's graph is
  still uniformly distributed over the s-regular graphs (a uniform graph
  relabelled uniformly is uniform), and E[W] and E[W^T W], which the paper's
  analysis of EL-Oracle uses, are exactly those of independent draws (they
  depend only on N and s under a uniform relabelling); only the rounds' graphs
  are isomorphic to each other.
* Churn (not in the paper): offline nodes neither train, send nor receive. In
  EL-Oracle an edge with an offline end is dropped and its weight goes to the
  node's own model (``mixing.renormalize``, W stays doubly stochastic); in
  EL-Local each online node draws its s peers among the other online nodes
  (all of them when fewer than s are online).
* Simulated time shares a sender's upload bandwidth among its s pushes (each
  takes latency + B / min(upload / pushes, download)); decsim's D-PSGD and
  gossip treat every link as unshared. With unlimited bandwidth (the default)
  the two agree.
* The local optimiser's state is kept across rounds as in D-PSGD; the authors
  reset it every round (``reset_optimizer = 1``), which makes no difference for
  their plain SGD (momentum 0).
* ``--variance_correction`` (Tian et al. 2024) applies to both, as for D-PSGD.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from decsim import mixing
from decsim import topology as topology_lib
from decsim.aggregation import mixing_merge
from decsim.config import Component, check, option
from decsim.data.sampler import NodeData
from decsim.network import MODEL, Network, model_messages, uniform_network
from decsim.protocols import registry
from decsim.protocols.base import Learner, Protocol, init_params, node_average, train_online
from decsim.rng import Stream, round_key
from decsim.state import NodeState, RoundMetrics, SimState, init_sim_state
from decsim.topology import Topology
from decsim.types import PRNGKey, Stacked

VARIANTS = ('oracle', 'local')
PAPER_FANOUT = 7  # s in the paper's experiments and the authors' config_EL.ini

# (key, round, trained params, alive [N]) -> (merged params, dst [N, k], valid [N, k])
Exchange = Callable[[PRNGKey, jax.Array, Stacked, jax.Array],
                    tuple[Stacked, jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class EpidemicConfig(Component):
  """Epidemic Learning (de Vos et al. 2023)."""

  el_fanout: int = option(PAPER_FANOUT, 'Epidemic Learning: s, the models each node sends per '
                          'round (el_local: to s random nodes; el_oracle: the degree of each '
                          "round's random regular graph).", low=1)


def check_fanout(nodes: int, fanout: int, variant: str) -> None:
  """The one-line ConfigErrors of a bad (nodes, fanout) pair for ``variant``."""
  check(variant in VARIANTS, f'epidemic variant {variant!r} is unknown: use one of '
        f'{", ".join(VARIANTS)}')
  check(nodes >= 2, f'--protocol=el_{variant} needs --nodes >= 2')
  check(fanout < nodes, f'--el_fanout={fanout} must be below --nodes={nodes} (each node sends '
        f'to s distinct other nodes): lower --el_fanout to at most {nodes - 1}')
  if variant == 'oracle':
    check(nodes * fanout % 2 == 0, f'--nodes={nodes} x --el_fanout={fanout} is odd: an s-regular '
          'graph needs an even product; change --el_fanout or --nodes')


# ------------------------------------------------------------------ EL-Oracle


def base_graph(nodes: int, fanout: int, seed: int) -> np.ndarray:
  """A random s-regular graph as a neighbour table ``[N, s]`` (host, from ``seed``):
  ``topology.kregular`` (connected), or a perfect matching for s = 1."""
  check_fanout(nodes, fanout, 'oracle')
  if fanout == 1:
    return (np.arange(nodes) ^ 1)[:, None].astype(np.int32)  # [N, 1] pairs (2i, 2i+1)
  return np.stack(topology_lib.kregular(nodes, fanout, seed)).astype(np.int32)  # [N, s]


def oracle_topology(base: jax.Array, key: PRNGKey, round_: jax.Array) -> Topology:
  """Round ``round_``'s graph: ``base`` ``[N, s]`` relabelled by a uniformly random
  permutation, weights 1/(s+1) on the node itself and on each neighbour; jittable."""
  n, s = base.shape
  perm = jax.random.permutation(round_key(key, round_, Stream.TOPOLOGY), n)  # [N] base -> label
  inv = jnp.argsort(perm)  # [N] label -> base node
  neighbours = perm[base[inv]]  # [N, s]
  idx = jnp.concatenate([jnp.arange(n)[:, None], neighbours], axis=1).astype(jnp.int32)
  return Topology(idx=idx, weights=jnp.full((n, s + 1), 1.0 / (s + 1), jnp.float32))  # [N, s+1]


def oracle_exchange(base: np.ndarray, variance_correction: mixing.VarianceCorrection | None,
                    mixing_mode: str) -> Exchange:
  """EL-Oracle's exchange: the round's graph on the live nodes, D-PSGD's W-mix."""
  base = jnp.asarray(base)
  merge = mixing_merge(variance_correction, mixing_mode)

  def exchange(key, round_, params, alive):
    graph = mixing.renormalize(oracle_topology(base, key, round_), alive)  # [N, s+1]
    dst = graph.idx[:, 1:]  # [N, s] node i sends to its neighbours
    return merge(graph, params, alive), dst, graph.weights[:, 1:] > 0

  return exchange


# ------------------------------------------------------------------- EL-Local


def local_targets(key: PRNGKey, alive: jax.Array, fanout: int) -> tuple[jax.Array, jax.Array]:
  """Each online node's pushes: ``(dst [N, s], valid [N, s])``, s distinct targets
  uniform among the other online nodes (all of them when fewer than s).

  Floyd's algorithm on offsets in the ranks of the online nodes, vectorised over
  nodes: O(N s^2). Invalid slots have ``dst = N`` (dropped by scatters).
  """
  n = alive.shape[0]
  online = jnp.sum(alive, dtype=jnp.int32)  # []
  others = online - 1  # [] candidates of each online node
  rank = jnp.cumsum(alive, dtype=jnp.int32) - 1  # [N] rank among the online nodes
  by_rank = jnp.argsort(~alive, stable=True).astype(jnp.int32)  # [N] online ids first

  def step(k, chosen):  # chosen [N, s], -1: empty
    j = others - fanout + k  # [] Floyd: draw in [0, j]; if taken, take j
    t = jax.random.randint(jax.random.fold_in(key, k), (n,), 0, jnp.maximum(j + 1, 1))  # [N]
    taken = jnp.any(chosen == t[:, None], axis=1)  # [N]
    return chosen.at[:, k].set(jnp.where(j >= 0, jnp.where(taken, j, t), -1))

  chosen = jax.lax.fori_loop(0, fanout, step, jnp.full((n, fanout), -1, jnp.int32))
  valid = (chosen >= 0) & alive[:, None]  # [N, s]
  target = by_rank[(rank[:, None] + 1 + chosen) % jnp.maximum(online, 1)]  # [N, s]
  return jnp.where(valid, target, n), valid


def local_merge(params: Stacked, dst: jax.Array, valid: jax.Array, alive: jax.Array,
                vc: mixing.VarianceCorrection | None = None) -> Stacked:
  """Every node that received m >= 1 models: (own + sum received) / (m + 1); the
  others are returned bitwise. ``dst``/``valid`` ``[N, s]``: node i sent to dst[i, k]."""
  n, s = dst.shape
  dst = jnp.where(valid, dst, n)  # [N, s] invalid -> dropped
  count = jnp.zeros((n,), jnp.int32).at[dst.ravel()].add(1, mode='drop')  # [N] models received
  merged = count > 0  # [N]

  def received(x):  # sum of the models sent to each node: [N, ...] in float32 or wider
    acc = jnp.zeros(x.shape, jnp.promote_types(x.dtype, jnp.float32))
    add = lambda k, a: a.at[jax.lax.dynamic_index_in_dim(dst, k, 1, False)].add(x, mode='drop')
    return jax.lax.fori_loop(0, s, add, acc)

  def one(x):
    rows = (-1,) + (1,) * (x.ndim - 1)
    mean = (x + received(x)) / (1 + count).reshape(rows).astype(jnp.float32)
    return jnp.where(merged.reshape(rows), mean.astype(x.dtype), x)

  out = jax.tree.map(one, params)
  if vc is None:
    return out
  var = mixing.layer_variance(params, vc.unbiased)  # [N] per leaf
  var_in = jax.tree.map(received, var)  # [N] per leaf, summed over the models received
  target = mixing.received_target(vc, var, var_in, count, own_weight=jnp.ones((n,)))
  return mixing.variance_correct(out, target, vc, where=merged & alive)


def local_exchange(fanout: int, variance_correction: mixing.VarianceCorrection | None) -> Exchange:
  """EL-Local's exchange: s random pushes per online node, scatter-add merge."""

  def exchange(key, round_, params, alive):
    dst, valid = local_targets(round_key(key, round_, Stream.TOPOLOGY), alive, fanout)
    return local_merge(params, dst, valid, alive, variance_correction), dst, valid

  return exchange


# ------------------------------------------------------------------- a round


def round_seconds(network: Network, dst: jax.Array, valid: jax.Array, samples: jax.Array,
                  alive: jax.Array, model_bytes: int) -> jax.Array:
  """Synchronous round: the last of the live nodes' training and of the pushes' arrivals.

  Push ``i -> dst[i, k]`` arrives at train_i + transfer(i -> dst), node i's upload
  shared by its pushes and the receiver's download by the pushes it receives.
  """
  n = dst.shape[0]
  src = jnp.broadcast_to(jnp.arange(n)[:, None], dst.shape)  # [N, k]
  to = jnp.where(valid, dst, src)  # [N, k] in range
  train = network.compute_seconds(jnp.arange(n), samples)  # [N]
  pushes = jnp.sum(valid, axis=1)  # [N]
  received = jax.ops.segment_sum(valid.astype(jnp.int32).ravel(), to.ravel(),
                                 num_segments=n)  # [N]
  arrival = train[:, None] + network.transfer_seconds(
      src, to, model_bytes, up_share=pushes[:, None], down_share=received[to])  # [N, k]
  last = jnp.max(jnp.where(valid, arrival, 0.0), initial=0.0)
  return jnp.maximum(jnp.max(jnp.where(alive, train, 0.0)), last)


def epidemic(learner: Learner, *, nodes: int, fanout: int = PAPER_FANOUT, variant: str = 'local',
             network: Network | None = None, seed: int = 0, mixing_mode: str = 'auto',
             variance_correction: mixing.VarianceCorrection | None = None) -> Protocol:
  """EL-Oracle (``variant='oracle'``, base graph from ``seed``) or EL-Local
  (``'local'``); the nodes' own models are ``node_models``."""
  check_fanout(nodes, fanout, variant)
  exchange = (oracle_exchange(base_graph(nodes, fanout, seed), variance_correction, mixing_mode)
              if variant == 'oracle' else local_exchange(fanout, variance_correction))
  network = network if network is not None else uniform_network(nodes)
  model_bytes = learner.model_bytes()

  def init(key: PRNGKey, data: NodeData) -> SimState:
    del data
    params = init_params(learner, jax.random.fold_in(key, Stream.INIT), nodes)
    return init_sim_state(key, NodeState(params, jax.vmap(learner.tx.init)(params)))

  def round_(state: SimState, data: NodeData) -> tuple[SimState, RoundMetrics]:
    r, alive = state.round, state.available  # alive [N]
    params, opt_state, result = train_online(learner, state, data, nodes)
    params, dst, valid = exchange(state.key, r, params, alive)  # dst, valid [N, k]
    sent = jnp.sum(valid, axis=1, dtype=jnp.int32)  # [N] models each node uploaded
    steps = jnp.where(alive, result.steps, 0)  # [N]
    n_alive = jnp.sum(alive, dtype=jnp.int32)
    seconds = round_seconds(network, dst, valid, steps * learner.batch_size, alive, model_bytes)
    state = state.replace(round=r + 1, nodes=NodeState(params, opt_state),
                          clock=state.clock + seconds, sent=state.sent.at[:, MODEL].add(sent))
    metrics = RoundMetrics(
        train_loss=jnp.sum(jnp.where(alive, result.loss, 0.0)) / jnp.maximum(n_alive, 1),
        sim_seconds=seconds, messages=model_messages(jnp.sum(sent)), active_nodes=n_alive,
        node_steps=jnp.sum(steps))
    return state, metrics

  return Protocol(init, round_, lambda state: node_average(state.nodes.params),
                  node_models=lambda state: state.nodes.params)


def _spec(variant: str) -> registry.ProtocolSpec:
  def build(ctx: registry.BuildContext) -> Protocol:
    c = ctx.config
    return epidemic(ctx.learner, nodes=c.nodes, fanout=c.el_fanout, variant=variant,
                    network=ctx.network, seed=ctx.seeds.graph, mixing_mode=c.mixing,
                    variance_correction=ctx.variance_correction)

  title = {'oracle': 'a fresh random s-regular graph per round',
           'local': 'each node pushes to s random nodes'}[variant]
  return registry.ProtocolSpec(
      f'el_{variant}', build, f'Epidemic Learning, EL-{variant.capitalize()} (de Vos et al., '
      f'NeurIPS 2023): {title}', lambda c: check_fanout(c.nodes, c.el_fanout, variant),
      EpidemicConfig)


for _variant in VARIANTS:
  registry.register(_spec(_variant))
