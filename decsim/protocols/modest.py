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

Views. Per peer a node records the last round it saw the peer active, the last
round a ping to it timed out, and a membership counter (+1 per join or graceful
leave; odd = member). A peer is active in a view when it is a member, was seen
within ``inactivity_threshold`` rounds, and has not been found down since. Views
travel with every model and merge by element-wise max. Samples are drawn among
view-active nodes, so a freshly crashed node can still be sampled: it then
neither trains nor answers, which is what ``sf < 1`` and the ping timeout are for.

- ``views='global'`` (default, fast): one shared record per node stands for all
  views. An online node is seen active every round, a timed-out ping marks its
  target down at once for everybody, and membership changes are visible the next
  round.
- ``views='local'``: every node's own view, an ``[N, N]`` matrix (for N up to a
  few thousand). A node knows its own record; participants merge the views of
  the aggregates they receive, mark their own timed-out pings, and send their
  views with their models; aggregators merge those. That alone would let a
  healthy peer that is not sampled for ``inactivity_threshold`` rounds age out of
  every view for good, so every online node that is not a participant (and a
  node announcing a leave) sends the round's aggregators a heartbeat, a
  one-entry, ping-sized announcement (counted as a ping). The sample of round r
  is ranked by the view of the first aggregator of round r - 1 (it sends the
  model); each participant probes the ranking of its own view. When views
  disagree, the aggregators are those of the first live participant in sample
  order, and a model sent elsewhere is counted but lost (a stray aggregator
  never gathers ``ceil(sf * s)`` models). Without churn both modes give the same
  models, clock and model/view messages (tested).

Cost per round: O(s * a) model work — gather the sample, train s models, average
a times — never O(N) models; plus O(N) (global) or O((s + a) * N) (local) view
updates.
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

VIEWS = ('global', 'local')
NEVER = jnp.iinfo(jnp.int32).min // 2  # a round before every other; max-merge identity


@struct.dataclass
class Views:
  """Activity records as nodes see them: one row per view, ``[V, N]`` each, V = 1
  (global view) or N (per-node views; row i is node i's view). Every field
  merges by element-wise max, so merging is commutative and idempotent."""

  seen: jax.Array  # last round the peer was seen active
  down: jax.Array  # last round a ping to the peer timed out (NEVER: none)
  joins: jax.Array  # membership counter: +1 per join or leave; odd = member


@struct.dataclass
class ModestState:
  agg_params: Stacked  # [a, ...] models held by the last round's aggregators
  agg_ids: jax.Array  # [a] int32 node ids of those aggregators
  agg_done: jax.Array  # [a] float32 simulated time each aggregate was ready (inf: none)
  views: Views  # [V, N] activity records
  counter: jax.Array  # [N] int32 each node's own membership counter (the truth)


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


def active_in(views: Views, rows: jax.Array, round_: jax.Array, threshold: int) -> jax.Array:
  """Peers active in the views ``rows [...]`` at ``round_``: ``[..., N]`` bool.

  Active = a member, seen within the last ``threshold`` rounds, and not found
  down by a ping timeout since it was last seen.
  """
  seen = views.seen[rows]
  return (views.joins[rows] % 2 == 1) & (seen >= round_ - threshold) & (seen > views.down[rows])


def modest(learner: Learner, *, nodes: int, sample_size: int, aggregators: int = 1,
           success_fraction: float = 1.0, ping_timeout: float = 2.0,
           inactivity_threshold: int = 20, views: str = 'global', network: Network | None = None,
           availability=None,
           variance_correction: mixing.VarianceCorrection | None = None) -> Protocol:
  """MoDeST with ``s = sample_size``, ``a = aggregators`` and ``sf = success_fraction``.

  ``views`` is ``'global'`` or ``'local'`` (per-node views, see the module
  docstring). ``availability(key, round, clock) -> churn.Availability`` supplies
  membership (joins and graceful leaves); online status comes from
  ``state.available``.
  """
  s, a = sample_size, aggregators
  if not 1 <= s <= nodes:
    raise ValueError(f'sample size {s} must be in 1..{nodes} (the number of nodes)')
  if not 1 <= a <= nodes:
    raise ValueError(f'aggregators {a} must be in 1..{nodes}')
  if not 0 < success_fraction <= 1:
    raise ValueError(f'success fraction {success_fraction} must be in (0, 1]')
  if views not in VIEWS:
    raise ValueError(f'views {views!r} must be one of {", ".join(VIEWS)}')
  local = views == 'local'
  network = network if network is not None else uniform_network(nodes)
  model_bytes = learner.model_bytes()
  wait_for = math.ceil(success_fraction * s)
  candidates = min(nodes, 2 * s + a)  # probing list: the sample of r+1 and beyond
  node_ids = jnp.arange(nodes, dtype=jnp.int32)

  def init(key: PRNGKey, data: NodeData) -> SimState:
    del data
    model0 = learner.init_params(jax.random.fold_in(key, Stream.INIT))
    member = jnp.ones((nodes,), bool)
    if availability is not None:
      member = availability(key, jnp.int32(0), jnp.float32(0)).member
    counter = member.astype(jnp.int32)  # members have joined once
    rows = nodes if local else 1
    holders = jnp.argsort(~member, stable=True)[:a].astype(jnp.int32)  # first a members: model0
    extra = ModestState(
        agg_params=broadcast(model0, a), agg_ids=holders,
        agg_done=jnp.zeros((a,), jnp.float32),
        views=Views(seen=jnp.zeros((rows, nodes), jnp.int32),
                    down=jnp.full((rows, nodes), NEVER, jnp.int32),
                    joins=jnp.broadcast_to(counter, (rows, nodes))),
        counter=counter)
    return init_sim_state(key, NodeState(broadcast(model0, nodes), ()), extra)

  def probe(cand: jax.Array, cand_valid: jax.Array, sample: jax.Array, online: jax.Array):
    """Each participant probes its ranking ``cand [s, C]`` of round r+1 in order
    until ``a`` candidates answer. Returns (chosen [s, a], chosen_ok [s, a],
    probed [s, C], responsive [s, C], probe seconds [s])."""
    responsive = cand_valid & online[cand]  # [s, C]
    is_agg = responsive & (jnp.cumsum(responsive, axis=1) <= a)  # [s, C]
    last_probe = jnp.max(jnp.where(is_agg, jnp.arange(candidates), -1), axis=1)  # [s]
    probed = cand_valid & (jnp.arange(candidates) <= last_probe[:, None])  # [s, C]
    rtt = 2 * network.transfer_seconds(sample[:, None], cand, 0)  # [s, C]
    seconds = jnp.sum(jnp.where(probed, jnp.where(responsive, rtt, ping_timeout), 0.0), axis=1)
    positions = jnp.argsort(jnp.where(is_agg, 0, 1), axis=1, stable=True)[:, :a]  # [s, a]
    chosen = jnp.take_along_axis(cand, positions, axis=1)
    chosen_ok = jnp.take_along_axis(is_agg, positions, axis=1)
    return chosen, chosen_ok, probed, responsive, seconds

  def round_(state: SimState, data: NodeData) -> tuple[SimState, RoundMetrics]:
    r, ex, online = state.round, state.extra, state.available  # online [N]
    vw = ex.views

    def views_of(ids: jax.Array) -> Views:  # local: the views of nodes ids [k] -> [k, N]
      rows = jax.tree.map(lambda f: f[ids], vw)
      me = (node_ids[None, :] == ids[:, None]) & online[ids][:, None]  # a node knows itself
      return rows.replace(seen=jnp.where(me, r, rows.seen),
                          joins=jnp.where(me, ex.counter[None, :], rows.joins))

    if local:  # the first aggregator of round r-1 ranks the sample (it sends the model)
      ranking_view = active_in(views_of(ex.agg_ids[jnp.argmin(ex.agg_done)][None]), 0, r,
                               inactivity_threshold)
    else:
      ranking_view = active_in(vw, 0, r, inactivity_threshold)
    sample, in_view = hash_ranking(state.key, r, ranking_view, s)
    live = in_view & online[sample]  # [s] participants that train
    n_live = jnp.sum(live, dtype=jnp.int32)

    # Each participant trains the first aggregate to reach it.
    prev_ok = jnp.isfinite(ex.agg_done)  # [a]
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

    # Participants' views: their own merged with the aggregates' (local mode).
    if local:
      received = jax.tree.map(lambda f: jnp.max(jnp.where(prev_ok[:, None], f, NEVER), axis=0),
                              views_of(ex.agg_ids))  # [N] the aggregates' views
      part_vw = jax.tree.map(lambda f, g: jnp.maximum(f, g[None]), views_of(sample),
                             received)  # [s, N]
      cand, cand_valid = jax.vmap(lambda e: hash_ranking(state.key, r + 1, e, candidates))(
          active_in(part_vw, jnp.arange(s), r, inactivity_threshold))  # [s, C]
    else:
      cand, cand_valid = hash_ranking(state.key, r + 1, ranking_view, candidates)
      cand, cand_valid = (jnp.broadcast_to(x, (s, candidates)) for x in (cand, cand_valid))

    # Aggregators: the first a responsive nodes of the next sample, probed in hash order.
    chosen, chosen_ok, probed, responsive, probe_seconds = probe(cand, cand_valid, sample, online)
    lead = jnp.argmax(live)  # the first live participant's aggregators are the round's
    agg_ids, agg_valid = chosen[lead], chosen_ok[lead]  # [a]
    sends = jnp.any(chosen_ok[:, :, None] & (chosen[:, :, None] == agg_ids[None, None, :]), axis=1)
    sends &= live[:, None] & agg_valid[None, :]  # [s, a]: participant -> aggregator slot
    sent_at = trained + probe_seconds  # [s]

    # Each aggregator averages the first ceil(sf * s) models to arrive.
    arrival = sent_at[:, None] + network.transfer_seconds(sample[:, None], agg_ids[None, :],
                                                          model_bytes)  # [s, a]
    arrival = jnp.where(sends, arrival, jnp.inf)
    n_sent = jnp.sum(sends, axis=0, dtype=jnp.int32)  # [a]
    need = jnp.minimum(wait_for, n_sent)  # [a]
    take = jnp.argsort(jnp.argsort(arrival, axis=0), axis=0) < need[None, :]  # [s, a]
    take &= jnp.isfinite(arrival)
    done = jnp.max(jnp.where(take, arrival, -jnp.inf), axis=0)  # [a]
    done += jnp.where(n_sent < wait_for, ping_timeout, 0.0)  # waited in vain for the missing ones
    ok = agg_valid & (n_sent > 0)  # [a]
    weights = take / jnp.maximum(jnp.sum(take, axis=0, keepdims=True), 1)  # [s, a]
    averaged = jax.tree.map(lambda p: jnp.tensordot(weights.T.astype(p.dtype), p, axes=1),
                            result.params)  # [a, ...]
    if variance_correction is not None:  # Tian et al. 2024, at every aggregator
      averaged = _correct(variance_correction, averaged, ex.agg_params, result.params, weights)
    any_ok = jnp.any(ok)
    stalled_until = state.clock + ping_timeout

    # Membership changes of this round, then the views.
    member = ex.counter % 2 == 1
    if availability is not None:
      member = availability(state.key, r, state.clock).member
    changed = member != (ex.counter % 2 == 1)  # [N]
    counter = ex.counter + changed
    timed_out = probed & ~responsive & live[:, None]  # [s, C]
    part = jnp.where(live, sample, nodes)  # out-of-range ids are dropped
    agg_rows = jnp.where(agg_valid, agg_ids, nodes)  # [a]
    if local:
      is_agg = jnp.zeros((nodes,), bool).at[agg_rows].set(True, mode='drop')  # [N]
      is_part = jnp.zeros((nodes,), bool).at[part].set(True, mode='drop')  # [N]
      heartbeat = (online | changed) & ~is_part  # [N] nodes whose record no model carries
      vw = _merge_local_views(vw, part_vw, cand, timed_out, sends, part, agg_rows,
                              beat_seen=jnp.where(heartbeat & online, r, NEVER),
                              beat_joins=jnp.where(heartbeat, counter, NEVER), r=r)
    else:
      down_ids = jnp.where(jnp.any(timed_out, axis=0), cand[0], nodes)  # [C]
      vw = Views(seen=jnp.where(online, r, vw.seen),
                 down=vw.down.at[0, down_ids].set(r, mode='drop'), joins=counter[None])

    new_extra = ex.replace(
        agg_params=jax.tree.map(lambda new, old: jnp.where(any_ok, new, old), averaged,
                                ex.agg_params),
        agg_ids=jnp.where(any_ok, agg_ids, ex.agg_ids),
        agg_done=jnp.where(any_ok, jnp.where(ok, done, jnp.inf),
                           jnp.full((a,), stalled_until)),
        views=vw, counter=counter)
    clock = jnp.min(new_extra.agg_done)

    # Messages: uploads to every chosen aggregator (+ view), the previous aggregators'
    # downloads to the live sample (+ view), pings and the replies of live candidates,
    # and (local views) heartbeats to the aggregators.
    uploads = jnp.sum(chosen_ok, axis=1, dtype=jnp.int32) * live  # [s]
    sent = state.sent.at[part, MODEL].add(uploads, mode='drop')
    sent = sent.at[part, VIEW].add(uploads, mode='drop')
    prev = jnp.where(prev_ok, ex.agg_ids, nodes)
    sent = sent.at[prev, MODEL].add(n_live, mode='drop').at[prev, VIEW].add(n_live, mode='drop')
    probes = jnp.sum(probed, axis=1, dtype=jnp.int32) * live  # [s]
    replies = probed & responsive & live[:, None]  # [s, C]
    sent = sent.at[part, PING].add(probes, mode='drop')
    sent = sent.at[jnp.where(replies, cand, nodes), PING].add(1, mode='drop')
    pings = jnp.sum(probes) + jnp.sum(replies, dtype=jnp.int32)
    if local:
      beats = (jnp.sum(agg_valid, dtype=jnp.int32) - is_agg) * heartbeat  # [N] to the others
      sent = sent.at[:, PING].add(beats)
      pings += jnp.sum(beats)
    models = jnp.sum(uploads) + n_live * jnp.sum(prev_ok, dtype=jnp.int32)

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


def _merge_local_views(vw: Views, part_vw: Views, cand: jax.Array, timed_out: jax.Array,
                       sends: jax.Array, part: jax.Array, agg_rows: jax.Array,
                       beat_seen: jax.Array, beat_joins: jax.Array, r: jax.Array) -> Views:
  """End of a round with per-node views ``[N, N]``.

  Participants (rows ``part [s]``; out-of-range ids are dropped) keep their merged
  views ``part_vw [s, N]`` plus their timed-out probes ``timed_out [s, C]`` of
  ``cand [s, C]``; aggregator ``k`` (row ``agg_rows[k]``) merges the views of the
  participants that sent to it (``sends [s, a]``) and the heartbeats
  (``beat_seen``, ``beat_joins [N]``). One scatter-max per matrix writes both: it
  depends on every read of the old views, so XLA updates them in place (two
  scatters made it copy each [N, N] matrix every round).
  """
  s = cand.shape[0]
  nodes = vw.seen.shape[0]
  part_vw = part_vw.replace(down=part_vw.down.at[jnp.arange(s)[:, None], jnp.where(
      timed_out, cand, nodes)].set(r, mode='drop'))
  beat = Views(seen=beat_seen, down=jnp.full((nodes,), NEVER), joins=beat_joins)
  into_agg = jax.tree.map(lambda p, b: jnp.maximum(
      jnp.max(jnp.where(sends.T[:, :, None], p[None], NEVER), axis=1), b[None]),
                          part_vw, beat)  # [a, N]
  rows = jnp.concatenate([part, agg_rows])  # [s + a]
  return jax.tree.map(lambda f, p, g: f.at[rows].max(jnp.concatenate([p, g]), mode='drop'),
                      vw, part_vw, into_agg)
