"""MoDeST: decentralized sampling (de Vos et al., "MoDeST: Bridging the Gap between
Federated and Decentralized Learning with Decentralized Sampling", 2023).

Round r is run by a *sample* S_r of ``s`` nodes: the nodes active in the view
ranked first by a keyed hash of (node id, r), so every node with the same view
computes the same sample without coordination. Each participant starts from the
first aggregated model to reach it, trains, and sends its model to the ``a``
aggregators of round r: the first ``a`` responsive nodes of S_{r+1} in hash
order (each probe of a crashed candidate costs a ping timeout before the
participant falls through to the next one). An aggregator averages (unweighted)
as soon as it holds ceil(sf * s) models, ignores later arrivals, and sends the
average to S_{r+1}, whose members train it in round r+1.

Views. The default *global view* is one shared record per node — the last round
it was seen active and whether it is a member (joined and not gracefully left) —
standing for the per-node views that travel with every model and are merged on
receipt. An online node is seen active every round; a crashed node stays in the
view until ``inactivity_threshold`` rounds have passed or until a participant's
ping to it times out, whichever is first. Joins become visible one round later
(after the joiner's first send). Samples are drawn among view-active nodes, so a
freshly crashed node can still be sampled: it then neither trains nor answers,
which is what ``sf < 1`` and the ping timeout are for.

Cost per round: hashing N scalars, then O(s * a) model work — gather the sample,
train s models, average a times — never O(N) models.
"""

import math

import jax
import jax.numpy as jnp
from flax import struct

from decsim import mixing
from decsim.data.sampler import NodeData
from decsim.network import MODEL, PING, VIEW, Network, uniform_network
from decsim.protocols.base import Learner, Protocol, broadcast, train_nodes
from decsim.rng import Stream, node_keys, round_key
from decsim.state import NodeState, RoundMetrics, SimState, init_sim_state
from decsim.types import Params, PRNGKey, Stacked


@struct.dataclass
class ModestState:
  agg_params: Stacked  # [a, ...] models held by the last round's aggregators
  agg_ids: jax.Array  # [a] int32 node ids of those aggregators
  agg_done: jax.Array  # [a] float32 simulated time each aggregate was ready (inf: none)
  last_active: jax.Array  # [N] int32 global view: last round each node was seen active
  member: jax.Array  # [N] bool global view: joined and not gracefully left


def hash_ranking(key: PRNGKey, round_: jax.Array, eligible: jax.Array,
                 count: int) -> tuple[jax.Array, jax.Array]:
  """The ``count`` eligible nodes ranked first by a keyed hash of (node, round).

  Returns ``(ids [count], valid [count])`` in rank order; ``valid`` is False for
  slots beyond the number of eligible nodes. Identical views give identical
  rankings; different rounds give independent ones.
  """
  scores = jax.random.uniform(round_key(key, round_, Stream.SAMPLE), eligible.shape)  # [N]
  top, ids = jax.lax.top_k(jnp.where(eligible, scores, -1.0), count)
  return ids.astype(jnp.int32), top >= 0.0


def modest(learner: Learner, *, nodes: int, sample_size: int, aggregators: int = 1,
           success_fraction: float = 1.0, ping_timeout: float = 2.0,
           inactivity_threshold: int = 20, network: Network | None = None,
           availability=None,
           variance_correction: mixing.VarianceCorrection | None = None) -> Protocol:
  """MoDeST with ``s = sample_size``, ``a = aggregators`` and ``sf = success_fraction``.

  ``availability(key, round, clock) -> churn.Availability`` supplies membership
  (joins and graceful leaves); online status comes from ``state.available``.
  """
  s, a = sample_size, aggregators
  if not 1 <= s <= nodes:
    raise ValueError(f'sample size {s} must be in 1..{nodes} (the number of nodes)')
  if not 1 <= a <= nodes:
    raise ValueError(f'aggregators {a} must be in 1..{nodes}')
  if not 0 < success_fraction <= 1:
    raise ValueError(f'success fraction {success_fraction} must be in (0, 1]')
  network = network if network is not None else uniform_network(nodes)
  model_bytes = learner.model_bytes()
  wait_for = math.ceil(success_fraction * s)
  candidates = min(nodes, 2 * s + a)  # probing list: the sample of r+1 and beyond

  def init(key: PRNGKey, data: NodeData) -> SimState:
    del data
    model0 = learner.init_params(jax.random.fold_in(key, Stream.INIT))
    extra = ModestState(agg_params=broadcast(model0, a), agg_ids=jnp.arange(a, dtype=jnp.int32),
                        agg_done=jnp.zeros((a,), jnp.float32),
                        last_active=jnp.zeros((nodes,), jnp.int32),
                        member=jnp.ones((nodes,), bool))
    if availability is not None:
      extra = extra.replace(member=availability(key, jnp.int32(0), jnp.float32(0)).member)
    return init_sim_state(key, NodeState(broadcast(model0, nodes), ()), extra)

  def round_(state: SimState, data: NodeData) -> tuple[SimState, RoundMetrics]:
    r, ex, online = state.round, state.extra, state.available  # online [N]
    view_active = ex.member & (ex.last_active >= r - inactivity_threshold)  # [N]
    sample, in_view = hash_ranking(state.key, r, view_active, s)  # [s]
    live = in_view & online[sample]  # [s] participants that train
    n_live = jnp.sum(live, dtype=jnp.int32)

    # Each participant trains the first aggregate to reach it.
    arrive = ex.agg_done[None, :] + network.transfer_seconds(
        ex.agg_ids[None, :], sample[:, None], model_bytes)  # [s, a]
    first = jnp.argmin(arrive, axis=1)  # [s]
    start = jnp.min(arrive, axis=1)  # [s]
    params = jax.tree.map(lambda p: p[first], ex.agg_params)  # [s, ...]
    opt_state = jax.vmap(learner.tx.init)(params)
    result = train_nodes(learner, params, opt_state, node_keys(state.key, r, sample, Stream.BATCH),
                         data, rows=sample)
    steps = jnp.where(live, result.steps, 0)
    trained = start + network.compute_seconds(sample, steps * learner.batch_size)  # [s]

    # Aggregators: the first a responsive nodes of the next sample, probed in hash order.
    cand, cand_valid = hash_ranking(state.key, r + 1, view_active, candidates)  # [C]
    responsive = cand_valid & online[cand]  # [C]
    is_agg = responsive & (jnp.cumsum(responsive) <= a)  # [C]
    positions = jnp.argsort(jnp.where(is_agg, 0, 1), stable=True)[:a]  # [a] first a aggregators
    agg_ids = cand[positions]  # [a]
    agg_valid = is_agg[positions]  # [a]
    last_probe = jnp.max(jnp.where(is_agg, jnp.arange(candidates), -1))
    probed = cand_valid & (jnp.arange(candidates) <= last_probe)  # [C]
    rtt = 2 * network.transfer_seconds(sample[:, None], cand[None, :], 0)  # [s, C]
    probe_cost = jnp.sum(jnp.where(probed, jnp.where(responsive, rtt, ping_timeout), 0.0), 1)
    sent_at = trained + probe_cost  # [s]

    # Each aggregator averages the first ceil(sf * s) models to arrive.
    arrival = sent_at[:, None] + network.transfer_seconds(sample[:, None], agg_ids[None, :],
                                                          model_bytes)  # [s, a]
    arrival = jnp.where(live[:, None] & agg_valid[None, :], arrival, jnp.inf)
    need = jnp.minimum(wait_for, n_live)
    take = jnp.argsort(jnp.argsort(arrival, axis=0), axis=0) < need  # [s, a]
    take &= jnp.isfinite(arrival)
    done = jnp.max(jnp.where(take, arrival, -jnp.inf), axis=0)  # [a]
    done += jnp.where(n_live < wait_for, ping_timeout, 0.0)  # waited in vain for the missing ones
    ok = agg_valid & (n_live > 0)  # [a]
    weights = take / jnp.maximum(jnp.sum(take, axis=0, keepdims=True), 1)  # [s, a]
    averaged = jax.tree.map(lambda p: jnp.tensordot(weights.T.astype(p.dtype), p, axes=1),
                            result.params)  # [a, ...]
    if variance_correction is not None:  # Tian et al. 2024, at every aggregator
      averaged = _correct(variance_correction, averaged, ex.agg_params, result.params, weights)
    any_ok = jnp.any(ok)
    stalled_until = state.clock + ping_timeout
    new_extra = ex.replace(
        agg_params=jax.tree.map(lambda new, old: jnp.where(any_ok, new, old), averaged,
                                ex.agg_params),
        agg_ids=jnp.where(any_ok, agg_ids, ex.agg_ids),
        agg_done=jnp.where(any_ok, jnp.where(ok, done, jnp.inf),
                           jnp.full((a,), stalled_until)),
        last_active=_update_view(ex.last_active, online, cand, probed & ~responsive, r),
        member=ex.member if availability is None else availability(
            state.key, r, state.clock).member)
    clock = jnp.min(new_extra.agg_done)

    # Messages: uploads to every aggregator (+ view), the previous aggregators'
    # downloads to the live sample (+ view), pings and the replies of live candidates.
    n_agg = jnp.sum(agg_valid, dtype=jnp.int32)
    prev_ok = jnp.isfinite(ex.agg_done)
    part = jnp.where(live, sample, nodes)  # out-of-range ids are dropped
    sent = state.sent.at[part, MODEL].add(n_agg, mode='drop').at[part, VIEW].add(n_agg, mode='drop')
    prev = jnp.where(prev_ok, ex.agg_ids, nodes)
    sent = sent.at[prev, MODEL].add(n_live, mode='drop').at[prev, VIEW].add(n_live, mode='drop')
    n_probed = jnp.sum(probed, dtype=jnp.int32)
    sent = sent.at[part, PING].add(n_probed, mode='drop')
    sent = sent.at[jnp.where(probed & responsive, cand, nodes), PING].add(n_live, mode='drop')
    models = n_live * n_agg + n_live * jnp.sum(prev_ok, dtype=jnp.int32)
    pings = n_live * (n_probed + jnp.sum(probed & responsive, dtype=jnp.int32))

    node_params = jax.tree.map(lambda all_, new: all_.at[part].set(new, mode='drop'),
                               state.nodes.params, result.params)
    new_state = state.replace(round=r + 1, nodes=state.nodes.replace(params=node_params),
                              clock=clock, sent=sent, extra=new_extra)
    metrics = RoundMetrics(
        train_loss=jnp.sum(result.loss * live) / jnp.maximum(n_live, 1),
        sim_seconds=clock - state.clock,
        messages=jnp.stack([models, models, pings]).astype(jnp.int32),
        active_nodes=n_live,
        node_steps=jnp.sum(steps))
    return new_state, metrics

  def model(state: SimState) -> Params:
    first = jnp.argmin(state.extra.agg_done)
    return jax.tree.map(lambda p: p[first], state.extra.agg_params)

  return Protocol(init, round_, model)


def _correct(vc: mixing.VarianceCorrection, averaged: Stacked, previous: Stacked,
             trained: Stacked, weights: jax.Array) -> Stacked:
  """Rescales each aggregate's layers to the mean variance of the models it averaged
  (weights ``[s, a]``; unweighted, so 'received' and 'follow_beta' agree), or to the
  aggregator's previous model ('self')."""
  var = mixing.layer_variance(trained, vc.unbiased)  # [s] per leaf
  received = jax.tree.map(lambda v: weights.T @ v, var)  # [a] per leaf
  own = mixing.layer_variance(previous, vc.unbiased)  # [a] per leaf
  return mixing.variance_correct(averaged, mixing.correction_target(vc, own, received, received),
                                 vc)


def _update_view(last_active: jax.Array, online: jax.Array, cand: jax.Array,
                 timed_out: jax.Array, r: jax.Array) -> jax.Array:
  """Online nodes are seen active in round r; a candidate whose ping timed out is
  known to be down at once (its entry drops below any threshold)."""
  seen = jnp.where(online, r, last_active)  # [N]
  return seen.at[jnp.where(timed_out, cand, last_active.shape[0])].set(
      jnp.iinfo(jnp.int32).min // 2, mode='drop')
