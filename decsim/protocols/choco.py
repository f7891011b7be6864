"""CHOCO-SGD (Koloskova, Stich, Jaggi, "Decentralized Stochastic Optimization and Gossip
Algorithms with Compressed Communication", ICML 2019, Algorithm 2).

Every node i holds its model x_i and a public copy x̂_i that it and its neighbours
agree on (x̂_i = 0 at the start). Each round every online node

1. takes its local SGD step(s) on x_i (D-PSGD's local training, ``train_nodes``);
2. compresses the difference to its public copy, q_i = Q(x_i - x̂_i), and sends q_i
   to each neighbour (``decsim.compression``: none, topk, randk, qsgd);
3. updates x̂_j += q_j for itself and every neighbour j;
4. moves towards its neighbours' public copies: x_i += gamma * sum_j w_ij (x̂_j - x̂_i).

W is D-PSGD's graph (``--topology``, ``--degree``, Metropolis-Hastings weights),
renormalised over the live nodes each round; offline nodes neither train, send nor
receive (their row of W is e_i and their q_i is zero). Simulated time is D-PSGD's
barrier round with the compressed message size; each message is counted as one
``model`` message priced at the compressed size (``Protocol.message_bytes``).
With ``--compression=none`` and ``--choco_gamma=1`` a round is D-PSGD's round:
x̂ = x after step 3, so step 4 gives x_i = sum_j w_ij x_j.

``--choco_gamma`` (consensus step size): the paper tunes gamma per compressor and
data set by grid search (its appendix); the default 0.1 is a moderate value for
top-k/rand-k at 10%, not a value copied from the paper's tables (not verified
offline); tune it for other ratios (smaller ratios need smaller gamma).

Deviations from the paper:
* every node's copies x̂_j of a neighbour are one shared array [N, ...] (the paper's
  nodes each hold their neighbours' copies, which agree when no message is lost);
  a node returning from churn therefore finds its neighbours' copies current:
  the re-synchronisation a real deployment needs is neither simulated nor costed.
* compression is per leaf (k entries of every leaf; qsgd with each leaf's norm and
  tau from the leaf size), not over the flattened model.
* local training is D-PSGD's (``--local_steps``, the local optimiser), not only one
  plain SGD step; the paper's Algorithm 2 is the case of one SGD step.
* variance correction is not offered (``--variance_correction`` must be none).
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from decsim import compression as compression_lib
from decsim import mixing
from decsim import topology as topology_lib
from decsim.config import check, option
from decsim.data.sampler import NodeData
from decsim.network import (MODEL, Network, message_bytes, model_messages,
                            uniform_network)
from decsim.protocols import registry
from decsim.protocols.base import (Learner, Protocol, init_params, node_average, train_online,
                                  where_alive)
from decsim.protocols.dpsgd import _barrier_seconds, _models_sent_per_node
from decsim.rng import Stream, node_keys
from decsim.state import NodeState, RoundMetrics, SimState, init_sim_state
from decsim.topology import Topology
from decsim.types import Params, PRNGKey

TopologyFn = Callable[[jax.Array], Topology]  # round -> graph of that round


@dataclasses.dataclass(frozen=True)
class ChocoConfig(compression_lib.CompressionConfig):
  """CHOCO-SGD (Koloskova et al. 2019)."""

  choco_gamma: float = option(0.1, 'CHOCO-SGD: consensus step size gamma of x_i += gamma * '
                              'sum_j w_ij (x̂_j - x̂_i) (1 with --compression=none: D-PSGD).',
                              low=0, high=1, low_open=True)


def choco(learner: Learner, *, nodes: int, topology: Topology | TopologyFn,
          compressor: compression_lib.Compressor, gamma: float, mixing_mode: str = 'auto',
          network: Network | None = None) -> Protocol:
  """CHOCO-SGD; ``state.extra`` holds the public copies x̂ (leaves [N, ...])."""
  topology_at = topology if callable(topology) else (lambda r: topology)
  network = network if network is not None else uniform_network(nodes)
  compress = jax.vmap(compressor.apply)  # keys [N], models [N, ...] -> [N, ...]

  def init(key: PRNGKey, data: NodeData) -> SimState:
    del data
    params = init_params(learner, jax.random.fold_in(key, Stream.INIT), nodes)
    opt_state = jax.vmap(learner.tx.init)(params)
    public = jax.tree.map(jnp.zeros_like, params)  # x̂ = 0, [N, ...]
    return init_sim_state(key, NodeState(params, opt_state), extra=public)

  def round_(state: SimState, data: NodeData) -> tuple[SimState, RoundMetrics]:
    r, alive = state.round, state.available  # alive [N]
    params, opt_state, result = train_online(learner, state, data, nodes)

    graph = mixing.renormalize(topology_at(r), alive)
    params, public = _consensus(graph, params, state.extra, alive, compress, gamma,
                                node_keys(state.key, r, jnp.arange(nodes), Stream.COMPRESS),
                                mixing_mode)

    sent = _models_sent_per_node(graph)  # [N]
    steps = jnp.where(alive, result.steps, 0)  # [N]
    n_alive = jnp.sum(alive, dtype=jnp.int32)
    seconds = _barrier_seconds(network, graph, steps * learner.batch_size, alive,
                               compressor.nbytes)
    state = state.replace(
        round=r + 1, nodes=NodeState(params, opt_state), extra=public,
        clock=state.clock + seconds, sent=state.sent.at[:, MODEL].add(sent))
    metrics = RoundMetrics(
        train_loss=jnp.sum(jnp.where(alive, result.loss, 0.0)) / jnp.maximum(n_alive, 1),
        sim_seconds=seconds,
        messages=model_messages(jnp.sum(sent)),
        active_nodes=n_alive,
        node_steps=jnp.sum(steps))
    return state, metrics

  def model(state: SimState) -> Params:
    return node_average(state.nodes.params)

  return Protocol(init, round_, model, node_models=lambda state: state.nodes.params)


def _consensus(graph: Topology, params, public, alive: jax.Array, compress, gamma: float,
               keys: PRNGKey, mixing_mode: str):
  """Steps 2-4: q = Q(x - x̂) of the live nodes, x̂ += q, x += gamma (W x̂ - x̂).
  Returns ``(params, public)``, leaves [N, ...]."""
  diff = jax.tree.map(lambda x, h: x - h, params, public)  # [N, ...]
  q = where_alive(alive, compress(keys, diff), jax.tree.map(jnp.zeros_like, diff))  # [N, ...]
  public = jax.tree.map(lambda h, d: h + d, public, q)  # [N, ...]
  mixed = mixing.mix(graph, public, mixing_mode)  # [N, ...] sum_j w_ij x̂_j
  # Rows of W sum to 1, so sum_j w_ij (x̂_j - x̂_i) = (W x̂)_i - x̂_i; offline rows are e_i.
  params = jax.tree.map(lambda x, m, h: x + gamma * (m - h).astype(x.dtype), params, mixed,
                        public)
  return params, public


def check_choco(c) -> None:
  topology_lib.check_graph(c)
  check(c.variance_correction == 'none',
        f'--variance_correction={c.variance_correction} is not offered with --protocol=choco: '
        'set --variance_correction=none')


def build(ctx: registry.BuildContext) -> Protocol:
  c = ctx.config
  graph = topology_lib.from_config(c, ctx.seeds.graph)
  shapes = jax.eval_shape(ctx.learner.init_params, jax.random.key(0))
  compressor = compression_lib.from_config(c, shapes)
  protocol = choco(ctx.learner, nodes=c.nodes, topology=graph, compressor=compressor,
                   gamma=c.choco_gamma, mixing_mode=c.mixing, network=ctx.network)
  return protocol._replace(message_bytes=message_bytes(compressor.nbytes, c.nodes))


registry.register(registry.ProtocolSpec(
    'choco', build, 'CHOCO-SGD (Koloskova et al., ICML 2019), compressed D-PSGD', check_choco,
    ChocoConfig))
