"""SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020).

FedAvg whose clients correct every local gradient by ``c - c_i``: ``c`` is the server
control variate, ``c_i`` client i's. The correction removes the client drift of
heterogeneous data, so that with full participation the fixed point is the global
optimum, not FedAvg's biased one. Each round the sampled clients get the global model
``x`` and ``c``, take K local steps on ``g - c_i + c`` from ``x`` to ``y_i``, and
compute their new variate by the paper's option II,

    c_i+ = c_i - c + (x - y_i) / (K * lr),

the average corrected gradient they followed (K: steps taken, lr: the local learning
rate). The server steps ``x <- x + lr_g * mean(y_i - x)`` and
``c <- c + (|S| / N) * mean(c_i+ - c_i)``, which keeps ``c`` the mean of all ``c_i``.

Memory: the client variates are explicit per-client state, leaves ``[N, ...]`` — one
model per client, O(N x model), the only per-client model state of the FedAvg family
(FedAvg's and FedProx's clients are stateless and keep only the ``s`` rows in flight,
as here: ``SimState.nodes`` holds the last round's ``[s, ...]`` client models). The
variates live in ``SimState.extra``, are split over devices by the node axis, and are
what a SCAFFOLD checkpoint is mostly made of.

Reused from FedAvg (``decsim.protocols.fedavg``): sampling among the available nodes
(churn), the server on the lowest-median-latency node, the simulated round time with
``--success_fraction``, the aggregation of the models (``--weighting``,
``--aggregator``, variance correction) and the server step (``--server_optimizer``,
``--server_lr``). lr_g is ``--server_lr``: with ``--server_optimizer=sgd`` the server
step ``x - lr * (x - mean y)`` is the paper's. Messages: one download of (x, c) and
one upload of (y_i, c_i+) per client, each priced at two models
(``Protocol.message_bytes``), and timed so on the simulated network.

The local correction is an optax transform (``correction``) chained before the local
optimiser, as FedProx's proximal term; its state holds the client's own ``c - c_i``,
which the round writes into each sampled client's fresh optimiser state.

Deviations from the paper:
- ``--weighting=data_size`` (FedAvg's default) generalises the uniform average to
  client weights p_i = n_i / n: the model aggregate is FedAvg's weighted mean and
  ``c <- c + sum_{i in S} p_i (c_i+ - c_i)``, which keeps ``c = sum_i p_i c_i`` and makes
  the fixed point the optimum of sum_i p_i f_i. ``--weighting=uniform`` is the paper's
  (p_i = 1/N: exactly ``|S|/N * mean``).
- Local SGD with momentum beta (``--momentum``, default 0.9) divides by the effective
  number of steps ``sum_{t=1..K} (1 - beta^t) / (1 - beta)`` instead of K: the
  displacement per unit of a constant corrected gradient, so option II still returns
  the average corrected gradient (beta = 0 gives K, the paper's). Dividing by K with
  momentum over-estimates c_i by about 1 / (1 - beta), and the variates oscillate.
  ``--optimizer=adam`` has no such estimate and is refused.
- With ``--success_fraction < 1`` only the accepted clients keep their new c_i (the
  server ignored the rest's upload), so ``c`` stays their weighted mean.
- Option I (c_i+ as the gradient at x, an extra pass) is not offered.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from decsim import aggregation, mixing
from decsim.aggregation import Aggregator, ServerOptimizer
from decsim.config import check
from decsim.data.sampler import NodeData
from decsim.network import (Network, message_bytes, model_messages,
                            uniform_network)
from decsim.protocols import fedavg, registry
from decsim.protocols.base import Learner, Protocol, broadcast, train_nodes
from decsim.rng import Stream, node_keys, round_key
from decsim.state import NodeState, RoundMetrics, SimState, init_sim_state
from decsim.types import Params, PRNGKey, Stacked

FIELD = 'scaffold_correction'  # the field of the correction's state the round sets


class CorrectionState(NamedTuple):
  scaffold_correction: Params  # c - c_i of this client, added to every local gradient


def correction() -> optax.GradientTransformation:
  """Adds the state's ``c - c_i`` to the gradient. ``init`` gives zeros; SCAFFOLD's round
  writes each sampled client's own correction into the state (``_client_opt_state``)."""

  def init(params: Params) -> CorrectionState:
    return CorrectionState(jax.tree.map(jnp.zeros_like, params))

  def update(updates, state: CorrectionState, params=None):
    del params
    return jax.tree.map(lambda g, d: g + d.astype(g.dtype), updates,
                        state.scaffold_correction), state

  return optax.GradientTransformation(init, update)


@struct.dataclass
class ScaffoldState:
  server: fedavg.FedAvgState  # the global model x and FedAvg's server-side state
  control: Params  # c, the server control variate
  client_controls: Stacked  # c_i, leaves [N, ...]: O(N x model)


def effective_steps(steps: jax.Array, momentum: float) -> jax.Array:
  """sum_{t=1..K} (1 - beta^t) / (1 - beta): how far K SGD steps with momentum beta
  (from a zero trace) move per unit of a constant gradient, in units of lr. K at beta=0."""
  k = steps.astype(jnp.float32)  # [s]
  if momentum == 0:
    return k
  return (k - momentum * (1 - momentum ** k) / (1 - momentum)) / (1 - momentum)  # [s]


def scaffold(learner: Learner, *, nodes: int, sample_size: int, lr: float, momentum: float = 0.0,
             weighting: str = 'data_size', network: Network | None = None, server: int = 0,
             success_fraction: float = 1.0,
             variance_correction: mixing.VarianceCorrection | None = None,
             aggregator: Aggregator | None = None,
             server_optimizer: ServerOptimizer | None = None) -> Protocol:
  """SCAFFOLD; ``learner.tx`` must chain ``correction()`` before the local optimiser
  (SGD of learning rate ``lr`` and ``momentum``). The server side is FedAvg's."""
  fedavg.check_arguments(nodes, sample_size, weighting, success_fraction)
  _check_learner(learner, lr, momentum)
  network = network if network is not None else uniform_network(nodes)
  config = _server(aggregator, server_optimizer, variance_correction)
  model_bytes = learner.model_bytes()
  wait_for = math.ceil(success_fraction * sample_size)

  def init(key: PRNGKey, data: NodeData) -> SimState:
    del data
    return _init_state(learner, config, nodes, sample_size, key)

  def round_(state: SimState, data: NodeData) -> tuple[SimState, RoundMetrics]:
    r, extra = state.round, state.extra
    ids, valid = fedavg.sample_clients(round_key(state.key, r, Stream.SAMPLE), state.available,
                                       sample_size)  # [s], [s]
    x = extra.server.global_params
    params = broadcast(x, sample_size)  # [s, ...]
    c_i = jax.tree.map(lambda v: v[ids], extra.client_controls)  # [s, ...]
    opt_state = _client_opt_state(learner.tx, params, extra.control, c_i)
    keys = node_keys(state.key, r, ids, Stream.BATCH)  # [s]
    result = train_nodes(learner, params, opt_state, keys, data, rows=ids, round_=r)

    steps = jnp.where(valid, result.steps, 0)  # [s]
    finish = fedavg.finish_seconds(network, server, ids, steps * learner.batch_size,
                                   2 * model_bytes, jnp.sum(valid))  # model and variate
    accepted, seconds = fedavg.accept_first(jnp.where(valid, finish, jnp.inf), valid, wait_for)
    weights = fedavg.client_weights(data.sizes[ids], weighting, accepted)  # [s]
    new_c_i = _option_two(c_i, extra.control, x, result.params,
                          effective_steps(steps, momentum) * _lr_at(learner, lr, r))  # [s, ...]
    extra = ScaffoldState(
        server=fedavg.aggregate_clients(
            config, extra.server, result.params, weights, accepted).replace(
                clients=jnp.where(valid, ids, nodes)),
        control=_server_control(extra.control, c_i, new_c_i,
                                weights / _population_weight(data.sizes, weighting)),
        client_controls=fedavg.scatter_clients(extra.client_controls, new_c_i, ids, accepted))
    state = state.replace(
        round=r + 1,
        nodes=state.nodes.replace(params=result.params),  # [s, ...] in flight
        clock=state.clock + seconds,
        sent=fedavg.count_sent(state.sent, ids, valid, server),
        extra=extra)
    return state, _metrics(result.loss, valid, steps, seconds)

  def model(state: SimState) -> Params:
    return state.extra.server.global_params

  return Protocol(init, round_, model, message_bytes=message_bytes(2 * model_bytes, nodes),
                  client_models=lambda state: (state.nodes.params,
                                               state.extra.server.clients < nodes))


def _server(aggregator: Aggregator | None, optimizer: ServerOptimizer | None,
            variance_correction: mixing.VarianceCorrection | None) -> fedavg.ServerConfig:
  """FedAvg's server: the weighted mean and the aggregate as the new model by default."""
  optimizer = optimizer if optimizer is not None else ServerOptimizer()
  aggregator = aggregator if aggregator is not None else aggregation.mean()
  return fedavg.ServerConfig(aggregator, optimizer, optimizer.transformation(),
                             variance_correction)


def _init_state(learner: Learner, config: fedavg.ServerConfig, nodes: int, sample_size: int,
                key: PRNGKey) -> SimState:
  """Round 0: the s rows in flight hold the global model; c and every c_i are zero."""
  global_params = learner.init_params(jax.random.fold_in(key, Stream.INIT))
  zeros = jax.tree.map(jnp.zeros_like, global_params)
  node_states = NodeState(params=broadcast(global_params, sample_size), opt_state=())
  extra = ScaffoldState(fedavg.init_server(config, global_params, nodes, sample_size),
                        control=zeros,
                        client_controls=broadcast(zeros, nodes))  # [N, ...]
  return init_sim_state(key, node_states, extra, num_nodes=nodes)


def _check_learner(learner: Learner, lr: float, momentum: float) -> None:
  """Refuses what would silently train without the correction or divide by zero."""
  if not lr > 0 or not 0 <= momentum < 1:
    raise ValueError(f'SCAFFOLD needs a local lr > 0 and 0 <= momentum < 1, got lr={lr}, '
                     f'momentum={momentum}')
  state = jax.eval_shape(lambda key: learner.tx.init(learner.init_params(key)),
                         jax.random.key(0))
  if optax.tree_utils.tree_get(state, FIELD) is None:
    raise ValueError('SCAFFOLD: learner.tx has no control-variate correction: build it as '
                     'optax.chain(scaffold.correction(), local optimiser)')


def _client_opt_state(tx: optax.GradientTransformation, params: Stacked, c: Params,
                      c_i: Stacked) -> optax.OptState:
  """Fresh optimiser states [s, ...] whose correction is each client's ``c - c_i``."""
  opt_state = jax.vmap(tx.init)(params)
  shift = jax.tree.map(lambda ci, cs: (cs[None] - ci).astype(ci.dtype), c_i, c)  # [s, ...]
  return optax.tree_utils.tree_set(opt_state, **{FIELD: shift})


def _option_two(c_i: Stacked, c: Params, x: Params, y: Stacked, lr_steps: jax.Array) -> Stacked:
  """c_i+ = c_i - c + (x - y_i) / (K lr) [s, ...]; ``lr_steps`` [s] is K lr (with momentum,
  the effective K). Clients that took no step (invalid draws) keep c_i."""
  took = lr_steps > 0  # [s]
  inverse = jnp.where(took, 1.0 / jnp.where(took, lr_steps, 1.0), 0.0)  # [s]

  def one(ci, cs, xs, ys):
    per = (slice(None),) + (None,) * (ys.ndim - 1)  # [s] broadcast over the leaf
    new = (ci.astype(jnp.float32) - cs.astype(jnp.float32)
           + (xs.astype(jnp.float32) - ys.astype(jnp.float32)) * inverse[per])
    return jnp.where(took[per], new, ci).astype(ci.dtype)

  return jax.tree.map(one, c_i, c, x, y)


def _lr_at(learner: Learner, lr: float, round_: jax.Array) -> jax.Array:
  """The local learning rate of ``round_`` (``--lr_schedule``), which option II divides by."""
  return jnp.float32(lr) if learner.lr_scale is None else lr * learner.lr_scale(round_)


def _metrics(loss: jax.Array, valid: jax.Array, steps: jax.Array,
             seconds: jax.Array) -> RoundMetrics:
  """FedAvg's metrics: one download and one upload per valid client (each two models)."""
  n_valid = jnp.sum(valid, dtype=jnp.int32)
  return RoundMetrics(train_loss=jnp.sum(loss * valid) / jnp.maximum(n_valid, 1),
                      sim_seconds=seconds, messages=model_messages(2 * n_valid),
                      active_nodes=n_valid, node_steps=jnp.sum(steps))


def _population_weight(sizes: jax.Array, weighting: str) -> jax.Array:
  """sum over all N clients of the weights ``fedavg.client_weights`` gives: n or N."""
  if weighting == 'data_size':
    return jnp.sum(sizes.astype(jnp.float32))
  return jnp.float32(sizes.shape[0])


def _server_control(c: Params, c_i: Stacked, new_c_i: Stacked, shares: jax.Array) -> Params:
  """c + sum_s p_s (c_s+ - c_s); ``shares`` [s] is p_s (0 for clients not accepted)."""

  def one(cs, ci, ni):
    delta = ni.astype(jnp.float32) - ci.astype(jnp.float32)  # [s, ...]
    return (cs.astype(jnp.float32) + jnp.tensordot(shares, delta, axes=1)).astype(cs.dtype)

  return jax.tree.map(one, c, c_i, new_c_i)


def check_config(c) -> None:
  """FedAvg's checks, and plain SGD (option II reads the average gradient off the SGD path)."""
  fedavg.check_sampled(c)
  check(c.optimizer == 'sgd', f'--optimizer={c.optimizer} cannot run --protocol=scaffold: its '
        'control variates are read off SGD steps ((x - y_i) / (K lr)); use --optimizer=sgd')


def build(ctx: registry.BuildContext) -> Protocol:
  """SCAFFOLD from an experiment config: FedAvg's server and options, the correction
  chained before the local optimiser."""
  c = ctx.config
  return scaffold(ctx.learner_with(correction()), lr=c.lr, momentum=c.momentum,
                  **fedavg.server_options(ctx))


registry.register(registry.ProtocolSpec(
    'scaffold', build, 'SCAFFOLD (Karimireddy et al., ICML 2020; 2x bytes per message)',
    check_config, fedavg.FedAvgConfig))
