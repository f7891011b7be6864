"""MoDeST: decentralized sampling (de Vos et al., "MoDeST: Bridging the Gap between
Federated and Decentralized Learning with Decentralized Sampling", 2023).

Round r is run by a *sample* S_r of ``s`` nodes: the first ``s`` nodes of the
view's ranking by a keyed hash of (node id, r) that answer a ping, as in the
authors' code (``accdfl/dfl/sample_manager.py``, ``community.py``): every node
with the same view ranks alike without coordination, and the aggregators of
round r - 1 ping down the ranking ``s`` at a time, a dead node being replaced by
the next; each batch with a dead node costs the ping timeout, on the critical
path before the model is sent (``live_sample``, ``ping_batches``). Each
participant starts from the first aggregated model to reach it, trains, and
sends its model to the ``a`` aggregators of round r: the first ``a`` responsive
nodes of S_{r+1} in hash order, pinged ``a`` at a time. An aggregator averages
(unweighted) as soon as it holds ceil(sf * s) models, ignores later arrivals, and
sends the average to S_{r+1}, whose members train it in round r+1. The search
ranks the whole view up to 16,384 nodes (beyond, its first 64 s entries).

Views. Per peer a node records the last round it saw the peer active, the last
round a ping to it timed out, and a membership counter (+1 per join or graceful
leave; odd = member). A peer is active in a view when it is a member, was seen
within ``inactivity_threshold`` rounds (the reference's 1000 by default), and, with
``mark_down`` (not in the reference, off by default), has not been found down by a
timed-out ping since. Views travel with every model and merge by element-wise max.
A crashed node stays in the views until it ages out, and every search that reaches
it pays its timeout.

- ``views='global'`` (default, fast): one shared record per node stands for all
  views. An online node is seen active every round, a timed-out ping (with
  ``mark_down``) marks its target down at once for everybody, a graceful leave is
  seen at once (the reference's leaver tells 10 s peers) and a join from the next
  round on (the reference holds it pending until the receiver's next send).
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

Failures inside rounds. With a crash schedule every node has a crash time in
simulated seconds (``churn.Availability.crash_time``), and a node that is down
when it must act does not: a candidate down when a participant probes it does not
answer; a participant down before its model arrives loses it; an aggregator down
before it has its ``ceil(sf * s)`` models, or before its aggregate reaches a
participant, loses its aggregate (what it gathered is gone). The round goes on
from every aggregate that arrives, so with ``a > 1`` one aggregator's crash costs
nothing; when no aggregate arrives (``a = 1``: its aggregator crashed) the round
has failed. The recovery follows the authors' HEAD (``accdfl/dfl/community.py``,
``on_agg_ack`` with ``success=False`` -> ``forward_trained_model``): the failed
round's participants that are still up re-forward their trained models to the
first ``a`` live nodes of the next ranking, which aggregate them and go on. HEAD
starts the re-forwarding on a failure acknowledgement that ``go_offline`` sends
even for a crash (``graceful=False``); a crashed process cannot send, so here the
participants wait ``reforward_timeout`` seconds after their send for the
acknowledgement that never comes (0: as if acknowledged at once). The paper-era
code (``96f5273``, 2023-02) had no acknowledgement at all: a lost aggregate
stalled the run.

Every aggregator applies ``aggregate(models [s, ...], weights [s]) -> params`` to the
models it took (weight 1) and the rest (weight 0): the unweighted mean. ``modest_round``
takes any rule with that signature as ``aggregate_fn``.

Cost per round: O(s * a) model work — gather the sample, train s models, average
a times — never O(N) models; plus O(N) (global) or O((s + a) * N) (local) view
updates.

Memory (issue 16). A node needs a model only while it trains or aggregates, so the
state holds O((s + a) x model + N): the ``a`` aggregates that start the next round
(``ModestState.agg_params``) with their holders (``agg_ids``), and the ``s`` models the
last round's participants trained (``SimState.nodes.params``, leaves ``[s, ...]``, in
the order of ``ModestState.participants``), which is what failure handling needs: after
a failed round those participants re-forward exactly these models (``reforward``), and
evaluation scores them as ``client_accuracy`` (the models nodes hold). Per node there are
only small vectors: the global view's three ``[1, N]`` int32 records, the membership
counters, crash times, availability and byte counters (``--views=local`` adds ``[N, N]``
matrices and is refused above ``MAX_LOCAL_VIEW_NODES``). Checkpoints hold the same state.
``modest(..., node_rows='all')`` keeps the layout before issue 16, a model row per node
written at each participation; it gives the same metrics bitwise (tested).
"""

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct

from decsim import aggregation, mixing
from decsim.config import Component, check, option
from decsim.data.sampler import NodeData
from decsim.local import LocalResult
from decsim.network import MODEL, PING, VIEW, Network, uniform_network
from decsim.protocols import fedavg as fedavg_lib
from decsim.protocols import registry
from decsim.protocols.base import Learner, Protocol, broadcast, rows_of, train_nodes
from decsim.rng import Stream, node_keys, round_key
from decsim.state import NodeState, RoundMetrics, SimState, init_sim_state
from decsim.types import Params, PRNGKey, Stacked

VIEWS = ('global', 'local')
AGGREGATOR_ORDERS = ('rank', 'bandwidth')
STREAMS = ('shared', 'independent')
NODE_ROWS = ('in_flight', 'all')


@dataclasses.dataclass(frozen=True)
class ModestConfig(Component):
  """MoDeST (de Vos et al. 2023)."""

  aggregators: int = option(1, 'MoDeST: aggregators per round (a).', low=1)
  ping_timeout: float = option(5.0, 'MoDeST: simulated seconds a ping to a crashed candidate '
                               'costs (the reference: 5).', low=0)
  inactivity_threshold: int = option(1000, 'MoDeST: rounds without activity after which a '
                                     'node leaves the samples (the reference: 1000).', low=1)
  views: str = option('global', "MoDeST: one global view (fast) or every node's own view, an "
                      '[N, N] matrix merged on every transfer.', choices=VIEWS)
  mark_down: bool = option(False, 'MoDeST: a ping that times out marks its target down in the '
                           'views at once (not in the reference, where only '
                           '--inactivity_threshold removes a node).')
  aggregator_order: str = option('rank', "MoDeST: the order in which participants probe "
                                 "the next sample for aggregators: the hash ranking, or its "
                                 "first s by upload bandwidth, fastest first (the reference "
                                 "with capacity traces).", choices=AGGREGATOR_ORDERS)
  reforward_timeout: float = option(300.0, 'MoDeST: seconds a participant waits for its '
                                    "aggregator's acknowledgement before re-forwarding its model "
                                    'to the next live aggregator (a crashed aggregator sends '
                                    "none; 300 = the reference's aggregation timeout; 0: at once).",
                                    low=0)
  modest_stream: str = option('shared', "MoDeST: rank samples with FedAvg's random stream "
                              '(shared: without churn both draw the same clients, common random '
                              'numbers) or an independent one.', choices=STREAMS)
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
  participants: jax.Array  # [s] int32 the last round's nodes that trained (N: none)
  sent_at: jax.Array  # float32: when the last round's last model was sent (re-forward timer)


def hash_ranking(key: PRNGKey, round_: jax.Array, eligible: jax.Array, count: int,
                 stream: Stream = Stream.SAMPLE) -> tuple[jax.Array, jax.Array]:
  """The ``count`` eligible nodes ranked first by a keyed hash of (node, round).

  Returns ``(ids [count], valid [count])`` in rank order; ``valid`` is False for
  slots beyond the number of eligible nodes. Identical views give identical
  rankings; different rounds give independent ones. The ranking is FedAvg's client
  draw on the round's key (``fedavg.sample_clients``: with ``stream='shared'`` both
  protocols draw the same nodes without churn): up to ``SPARSE_SAMPLE_MIN_NODES``
  the top ``count`` of N uniform scores, O(N); beyond, the eligible ids among a
  prefix of uniform draws, O(count log count), whose shorter rankings are prefixes
  of the longer ones (the draws are counter-based). Only when fewer than ``count``
  eligible nodes come through (over 7/8 of the view inactive) does that ranking fall
  back to the O(N) draw, which then no longer extends the shorter ones.
  """
  return fedavg_lib.sample_clients(round_key(key, round_, stream), eligible, count)


def active_in(views: Views, rows: jax.Array, round_: jax.Array, threshold: int) -> jax.Array:
  """Peers active in the views ``rows [...]`` at ``round_``: ``[..., N]`` bool.

  Active = a member, seen within the last ``threshold`` rounds, and not found
  down by a ping timeout since it was last seen.
  """
  seen = views.seen[rows]
  return (views.joins[rows] % 2 == 1) & (seen >= round_ - threshold) & (seen > views.down[rows])


@dataclasses.dataclass(frozen=True)
class ModestSettings:
  """The static configuration of a MoDeST run (see ``modest``)."""

  nodes: int
  sample_size: int  # s
  aggregators: int  # a
  wait_for: int  # ceil(sf * s): models an aggregator waits for
  candidates: int  # C: length of every participant's probing list
  search: int  # K: length of the ranking the aggregators search for the next sample
  ping_timeout: float
  inactivity_threshold: int
  local: bool  # per-node views
  model_bytes: int
  mark_down: bool  # timed-out pings mark their targets down in the views
  stream: Stream  # the random stream of the hash ranking
  reforward_timeout: float = 300.0  # a participant's wait for an acknowledgement that never comes
  by_bandwidth: bool = False  # aggregators: the next sample's first s, fastest upload first
  all_rows: bool = False  # node_rows='all': a model row per node [N, ...], else the s in flight


@struct.dataclass
class Search:
  """The previous round's aggregators' search for this round's sample."""

  ranked: jax.Array  # [K] int32 the hash ranking of the view
  probed: jax.Array  # [K] bool pinged (by every searching aggregator)
  responsive: jax.Array  # [K] bool answered
  seconds: jax.Array  # [a] each aggregator's search time


@struct.dataclass
class RoundPlan:
  """Who takes part in a round and where their models go."""

  sample: jax.Array  # [s] int32 this round's sample
  live: jax.Array  # [s] bool participants that train (answered the aggregators' pings)
  search: Search  # how the previous aggregators found the sample
  cand: jax.Array  # [s, C] each participant's ranking of round r+1
  probed: jax.Array  # [s, C] candidates each participant pinged
  responsive: jax.Array  # [s, C] candidates that answered (or would have)
  chosen_ok: jax.Array  # [s, a] each participant found its k-th aggregator
  agg_ids: jax.Array  # [a] int32 the round's aggregators (the first live participant's)
  agg_valid: jax.Array  # [a] bool
  sends: jax.Array  # [s, a] participant -> aggregator slot
  part_vw: Views | None  # [s, N] participants' merged views (local mode), else None


FULL_SEARCH_NODES = 16_384  # up to here the sample search ranks the whole view; beyond, 64 s


def modest(learner: Learner, *, nodes: int, sample_size: int, aggregators: int = 1,
           success_fraction: float = 1.0, ping_timeout: float = 5.0,
           inactivity_threshold: int = 1000, views: str = 'global', mark_down: bool = False,
           stream: str = 'shared', reforward_timeout: float = 300.0,
           aggregator_order: str = 'rank', network: Network | None = None, availability=None,
           variance_correction: mixing.VarianceCorrection | None = None,
           aggregate_fn: Callable[[Stacked, jax.Array], Params] | None = None,
           node_rows: str = 'in_flight') -> Protocol:
  """MoDeST with ``s = sample_size``, ``a = aggregators`` and ``sf = success_fraction``.

  ``views`` is ``'global'`` or ``'local'`` (per-node views, see the module
  docstring). ``availability(key, round, clock) -> churn.Availability`` supplies
  membership (joins and graceful leaves); online status comes from
  ``state.available``. ``node_rows`` is where trained models are kept between rounds
  (see "Memory" in the module docstring): ``'in_flight'``, the last round's ``s``
  (the default), or ``'all'``, a row per node, indexed by node id (the layout before
  issue 16, kept as the reference its equivalence test compares against; the same
  metrics bitwise).
  """
  s, a = sample_size, aggregators
  if not 1 <= s <= nodes:
    raise ValueError(f'sample size {s} must be in 1..{nodes} (the number of nodes)')
  if not 1 <= a <= nodes:
    raise ValueError(f'aggregators {a} must be in 1..{nodes}')
  if not 0 < success_fraction <= 1:
    raise ValueError(f'success fraction {success_fraction} must be in (0, 1]')
  if aggregator_order not in AGGREGATOR_ORDERS:
    raise ValueError(f'aggregator order {aggregator_order!r} must be one of {AGGREGATOR_ORDERS}')
  if views not in VIEWS or stream not in STREAMS:
    raise ValueError(f'views {views!r} / stream {stream!r} must be one of {VIEWS} / {STREAMS}')
  if node_rows not in NODE_ROWS:
    raise ValueError(f'node rows {node_rows!r} must be one of {NODE_ROWS}')
  settings = ModestSettings(
      nodes=nodes, sample_size=s, aggregators=a, wait_for=math.ceil(success_fraction * s),
      candidates=min(nodes, 2 * s + a),  # probing list: the sample of r+1 and beyond
      search=nodes if nodes <= FULL_SEARCH_NODES else min(nodes, 64 * s),
      ping_timeout=ping_timeout, inactivity_threshold=inactivity_threshold,
      local=views == 'local', model_bytes=learner.model_bytes(), mark_down=mark_down,
      stream=Stream.SAMPLE if stream == 'shared' else Stream.MODEST,
      reforward_timeout=reforward_timeout, by_bandwidth=aggregator_order == 'bandwidth',
      all_rows=node_rows == 'all')
  network = network if network is not None else uniform_network(nodes)

  def round_(state: SimState, data: NodeData) -> tuple[SimState, RoundMetrics]:
    return modest_round(settings, learner, network, availability, state, data,
                        vc=variance_correction,  # a function (chex counts traces)
                        aggregate_fn=aggregate_fn or aggregate)

  return Protocol(functools.partial(modest_init, settings, learner, availability), round_,
                  modest_model, client_models=functools.partial(trained_models, settings))


def trained_models(settings: ModestSettings, state: SimState) -> tuple[Stacked, jax.Array]:
  """The models the last round's participants trained (leaves ``[s, ...]``, in the order
  of ``participants``) and which are real (``[s]``): what those nodes hold now."""
  ids = state.extra.participants  # [s]
  if settings.all_rows:
    return rows_of(state.nodes.params, ids)
  return state.nodes.params, ids < settings.nodes


def models_held(settings: ModestSettings, state: SimState, ids: jax.Array) -> Stacked:
  """The models that last round's participants ``ids [k]`` trained (leaves ``[k, ...]``),
  looked up by node id in either layout; every id must be a participant."""
  if not settings.all_rows:
    ids = jnp.argmax(state.extra.participants[None, :] == ids[:, None], axis=1)  # positions [k]
  return jax.tree.map(lambda rows: rows[ids], state.nodes.params)


def keep_trained(settings: ModestSettings, state: SimState, part: jax.Array,
                 trained: Stacked) -> Stacked:
  """The node rows after a round whose participants ``part [s]`` (N: none) trained
  ``trained [s, ...]``: those rows themselves, or (``all_rows``) written into ``[N, ...]``."""
  if not settings.all_rows:
    return trained
  return jax.tree.map(lambda all_, new: all_.at[part].set(new, mode='drop'),
                      state.nodes.params, trained)


def modest_model(state: SimState) -> Params:
  """The model MoDeST delivers: the first aggregate of the last round."""
  first = jnp.argmin(state.extra.agg_done)
  return jax.tree.map(lambda p: p[first], state.extra.agg_params)


def modest_init(settings: ModestSettings, learner: Learner, availability, key: PRNGKey,
                data: NodeData) -> SimState:
  """The first ``a`` members hold one model as round 0's aggregates; the node rows (``s``
  in flight, or one per node) start as that model."""
  del data
  nodes, a = settings.nodes, settings.aggregators
  model0 = learner.init_params(jax.random.fold_in(key, Stream.INIT))
  member = jnp.ones((nodes,), bool)
  if availability is not None:
    member = availability(key, jnp.int32(0), jnp.float32(0)).member
  counter = member.astype(jnp.int32)  # members have joined once
  rows = nodes if settings.local else 1
  holders = jnp.argsort(~member, stable=True)[:a].astype(jnp.int32)  # first a members: model0
  extra = ModestState(
      agg_params=broadcast(model0, a), agg_ids=holders,
      agg_done=jnp.zeros((a,), jnp.float32),
      views=Views(seen=jnp.zeros((rows, nodes), jnp.int32),
                  down=jnp.full((rows, nodes), NEVER, jnp.int32),
                  joins=jnp.broadcast_to(counter, (rows, nodes))),
      counter=counter, participants=jnp.full((settings.sample_size,), nodes, jnp.int32),
      sent_at=jnp.float32(0))
  kept = broadcast(model0, nodes if settings.all_rows else settings.sample_size)  # [s or N, ...]
  return init_sim_state(key, NodeState(kept, ()), extra, num_nodes=nodes)


# ------------------------------------------------------------------ views and sampling


def views_of(vw: Views, ids: jax.Array, online: jax.Array, counter: jax.Array,
             r: jax.Array) -> Views:
  """Per-node views ``[N, N]``: the views of nodes ``ids [k]`` -> ``[k, N]``, where an
  online node knows its own record (seen now, its own membership counter)."""
  nodes = vw.seen.shape[1]
  rows = jax.tree.map(lambda f: f[ids], vw)
  me = (jnp.arange(nodes, dtype=jnp.int32)[None, :] == ids[:, None]) & online[ids][:, None]
  return rows.replace(seen=jnp.where(me, r, rows.seen),
                      joins=jnp.where(me, counter[None, :], rows.joins))


def merge_views(a: Views, b: Views) -> Views:
  """Element-wise max of two views (broadcasting): commutative, idempotent."""
  return jax.tree.map(jnp.maximum, a, b)


def ranking_view(settings: ModestSettings, state: SimState, counter: jax.Array) -> jax.Array:
  """``[N] bool``: the nodes active in the view that ranks round r's sample (global view,
  or the view of the first aggregator of round r - 1, which sends the model). In the
  global view a graceful leave (``counter [N]`` now even) is seen at once, as the
  reference's leaver tells 10 s random peers; a join only from the next round (the
  reference holds it pending until the receiver's next model send)."""
  r, ex = state.round, state.extra
  if settings.local:
    first = ex.agg_ids[jnp.argmin(ex.agg_done)][None]
    vw = views_of(ex.views, first, state.available, ex.counter, r)
  else:
    vw = ex.views.replace(joins=jnp.where(counter % 2 == 0, counter, ex.views.joins))
  return active_in(vw, 0, r, settings.inactivity_threshold)


def bandwidth_first(cand: jax.Array, cand_valid: jax.Array, bandwidth: jax.Array,
                    s: int) -> tuple[jax.Array, jax.Array]:
  """Each ranking ``[s, C]`` with its first ``s`` entries re-sorted by ``bandwidth [N]``,
  fastest first (the reference: ``determine_available_peers_for_sample`` with
  ``getting_aggregators``; it probes only those s, decsim goes on down the ranking)."""
  head, head_ok = cand[:, :s], cand_valid[:, :s]
  order = jnp.argsort(-jnp.where(head_ok, bandwidth[head], -jnp.inf), axis=1, stable=True)
  return (jnp.concatenate([jnp.take_along_axis(head, order, 1), cand[:, s:]], axis=1),
          jnp.concatenate([jnp.take_along_axis(head_ok, order, 1), cand_valid[:, s:]], axis=1))


def next_candidates(settings: ModestSettings, state: SimState, view: jax.Array,
                    sample: jax.Array, prev_ok: jax.Array):
  """Every participant's ranking of round r+1: (cand [s, C], cand_valid [s, C], the
  participants' views merged with the aggregates' [s, N] (local mode) or None)."""
  r, ex, s, c = state.round, state.extra, settings.sample_size, settings.candidates
  if not settings.local:
    cand, cand_valid = hash_ranking(state.key, r + 1, view, c, settings.stream)
    return jnp.broadcast_to(cand, (s, c)), jnp.broadcast_to(cand_valid, (s, c)), None
  of = functools.partial(views_of, ex.views, online=state.available, counter=ex.counter, r=r)
  received = jax.tree.map(lambda f: jnp.max(jnp.where(prev_ok[:, None], f, NEVER), axis=0),
                          of(ex.agg_ids))  # [N] the aggregates' views
  part_vw = jax.tree.map(lambda f, g: jnp.maximum(f, g[None]), of(sample), received)  # [s, N]
  rank = jax.vmap(functools.partial(hash_ranking, state.key, r + 1, count=c,
                                    stream=settings.stream))
  cand, cand_valid = rank(active_in(part_vw, jnp.arange(s), r, settings.inactivity_threshold))
  return cand, cand_valid, part_vw


def ping_batches(responsive: jax.Array, valid: jax.Array, rtt: jax.Array, need: int,
                 width: int, ping_timeout: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Pings down a ranking ``[..., C]``, ``width`` at a time in rank order, until ``need``
  entries answered; a batch lasts its slowest reply (``rtt``), or ``ping_timeout`` when one
  of its pings goes unanswered. A search that finds fewer than ``need`` has pinged every
  valid entry. Returns (probed ``[..., C]``, found ``[..., C]``: the first ``need``
  responsive, seconds ``[...]``)."""
  c = responsive.shape[-1]
  responsive &= valid
  found = responsive & (jnp.cumsum(responsive, axis=-1) <= need)
  found_all = jnp.sum(found, axis=-1) >= need
  last = jnp.where(found_all, jnp.max(jnp.where(found, jnp.arange(c), -1), axis=-1), c - 1)
  batch = jnp.arange(c) // width  # [C]
  probed = valid & (batch <= (last // width)[..., None])
  cost = jnp.where(probed, jnp.where(responsive, rtt, ping_timeout), 0.0)  # [..., C]
  pad = (-c) % width
  cost = jnp.pad(cost, [(0, 0)] * (cost.ndim - 1) + [(0, pad)])
  per_batch = jnp.max(cost.reshape(*cost.shape[:-1], -1, width), axis=-1)  # [..., C / width]
  return probed, found, jnp.sum(per_batch, axis=-1)


def probe(cand: jax.Array, cand_valid: jax.Array, sample: jax.Array, up: jax.Array,
          network: Network, aggregators: int, ping_timeout: float):
  """Each participant ``sample [s]`` pings its ranking ``cand [s, C]`` of round r+1,
  ``aggregators`` at a time (``ping_batches``), until ``aggregators`` candidates answer
  (``up [s, C]``: the candidate is up when that participant probes). Returns
  (chosen [s, a], chosen_ok [s, a], probed [s, C], responsive [s, C], probe seconds [s])."""
  a = aggregators
  responsive = cand_valid & up  # [s, C]
  rtt = 2 * network.transfer_seconds(sample[:, None], cand, 0)  # [s, C]
  probed, is_agg, seconds = ping_batches(responsive, cand_valid, rtt, a, a, ping_timeout)
  positions = jnp.argsort(jnp.where(is_agg, 0, 1), axis=1, stable=True)[:, :a]  # [s, a]
  chosen = jnp.take_along_axis(cand, positions, axis=1)
  chosen_ok = jnp.take_along_axis(is_agg, positions, axis=1)
  return chosen, chosen_ok, probed, responsive, seconds


def live_sample(settings: ModestSettings, network: Network, state: SimState,
                view: jax.Array) -> tuple[jax.Array, jax.Array, Search]:
  """Round r's participants: the first s nodes of the hash ranking of ``view [N]`` that
  answer the pings of the previous round's aggregators, sent s at a time (a dead node
  is replaced by the next in the ranking). Returns (sample [s], live [s], Search)."""
  s, ex = settings.sample_size, state.extra
  ranked, valid = hash_ranking(state.key, state.round, view, settings.search,
                               settings.stream)  # [K]
  responsive = valid & state.available[ranked]
  rtt = 2 * network.transfer_seconds(ex.agg_ids[:, None], ranked[None, :], 0)  # [a, K]
  probed, found, seconds = ping_batches(responsive[None], valid[None], rtt, s, s,
                                        settings.ping_timeout)  # [a, K], [a, K], [a]
  positions = jnp.argsort(~found[0], stable=True)[:s]  # [s] the found ones first, in order
  search = Search(ranked=ranked, probed=probed[0], responsive=responsive, seconds=seconds)
  return ranked[positions], found[0][positions], search


def plan_round(settings: ModestSettings, network: Network, state: SimState, view: jax.Array,
               sample: jax.Array, live: jax.Array, search: Search, prev_ok: jax.Array,
               crash: jax.Array, trained: jax.Array):
  """The aggregators each participant finds (probing once it ``trained [s]``; a candidate
  whose ``crash [N]`` time has passed does not answer) and where it sends. Returns
  (RoundPlan, probe seconds [s])."""
  cand, cand_valid, part_vw = next_candidates(settings, state, view, sample, prev_ok)
  if settings.by_bandwidth:
    cand, cand_valid = bandwidth_first(cand, cand_valid, network.upload, settings.sample_size)
  up = state.available[cand] & (crash[cand] > trained[:, None])  # [s, C]
  chosen, chosen_ok, probed, responsive, seconds = probe(
      cand, cand_valid, sample, up, network, settings.aggregators, settings.ping_timeout)
  lead = jnp.argmax(live)  # the first live participant's aggregators are the round's
  agg_ids, agg_valid = chosen[lead], chosen_ok[lead]  # [a]
  sends = jnp.any(chosen_ok[:, :, None] & (chosen[:, :, None] == agg_ids[None, None, :]), axis=1)
  sends &= live[:, None] & agg_valid[None, :]  # [s, a]: participant -> aggregator slot
  plan = RoundPlan(sample=sample, live=live, search=search, cand=cand, probed=probed, responsive=responsive,
                   chosen_ok=chosen_ok, agg_ids=agg_ids, agg_valid=agg_valid, sends=sends,
                   part_vw=part_vw)
  return plan, seconds


# ------------------------------------------------------------------ training and aggregation


def deliveries(settings: ModestSettings, network: Network, ex: ModestState, sample: jax.Array,
               live: jax.Array, search_seconds: jax.Array, crash: jax.Array) -> jax.Array:
  """When each aggregate reaches each participant ``[s, a]`` (each aggregator sends once
  its search, ``search_seconds [a]``, found the sample, to every live participant at
  once); inf where it does not: no aggregate, or the aggregator or the participant is
  down (``crash [N]``) before the transfer ends."""
  arrive = ex.agg_done[None, :] + search_seconds[None, :] + network.transfer_seconds(
      ex.agg_ids[None, :], sample[:, None], settings.model_bytes,
      up_share=jnp.sum(live))  # [s, a]
  up = (crash[ex.agg_ids][None, :] > arrive) & (crash[sample][:, None] > arrive)
  return jnp.where(up & live[:, None], arrive, jnp.inf)


def train_sample(settings: ModestSettings, learner: Learner, network: Network, state: SimState,
                 data: NodeData, sample: jax.Array, arrive: jax.Array,
                 crash: jax.Array) -> tuple[LocalResult, jax.Array, jax.Array, jax.Array]:
  """Each participant trains the first aggregate to reach it (``arrive [s, a]``, inf:
  never). Returns (the local result, steps [s] (0 if it got no model or went down while
  training), the time each finished training [s], which finished [s])."""
  r, ex = state.round, state.extra
  first = jnp.argmin(arrive, axis=1)  # [s]
  start = jnp.min(arrive, axis=1)  # [s]
  params = jax.tree.map(lambda p: p[first], ex.agg_params)  # [s, ...]
  opt_state = jax.vmap(learner.tx.init)(params)
  result = train_nodes(learner, params, opt_state, node_keys(state.key, r, sample, Stream.BATCH),
                       data, rows=sample, round_=r)
  trained = start + network.compute_seconds(sample, result.steps * learner.batch_size)  # [s]
  finished = jnp.isfinite(start) & (crash[sample] > trained)
  return result, jnp.where(finished, result.steps, 0), trained, finished


def collect(settings: ModestSettings, network: Network, plan: RoundPlan, sent_at: jax.Array,
            crash: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Each aggregator takes the first ceil(sf * s) models to arrive (sent at
  ``sent_at [s]``; a model is lost when its sender or the aggregator is down, by
  ``crash [N]``, before it arrives). Returns (take [s, a] bool, done [a] time it had
  them, or waited a ping timeout in vain for the missing ones; inf when it got none or
  went down before that, n_sent [a] models sent to it)."""
  n_sent = jnp.sum(plan.sends, axis=0, dtype=jnp.int32)  # [a]
  uploads = jnp.sum(plan.chosen_ok, axis=1)  # [s] a participant sends to all it found
  arrival = sent_at[:, None] + network.transfer_seconds(
      plan.sample[:, None], plan.agg_ids[None, :], settings.model_bytes,
      up_share=uploads[:, None], down_share=n_sent[None, :])  # [s, a]
  up = (crash[plan.sample][:, None] > arrival) & (crash[plan.agg_ids][None, :] > arrival)
  arrival = jnp.where(plan.sends & up, arrival, jnp.inf)
  n_in = jnp.sum(jnp.isfinite(arrival), axis=0, dtype=jnp.int32)  # [a] models that arrived
  need = jnp.minimum(settings.wait_for, n_in)  # [a]
  take = jnp.argsort(jnp.argsort(arrival, axis=0), axis=0) < need[None, :]  # [s, a]
  take &= jnp.isfinite(arrival)
  done = jnp.max(jnp.where(take, arrival, -jnp.inf), axis=0)  # [a]
  done += jnp.where(n_in < settings.wait_for, settings.ping_timeout, 0.0)
  done = jnp.where((n_in > 0) & (crash[plan.agg_ids] > done), done, jnp.inf)
  return take, done, n_sent


def aggregate(models: Stacked, weights: jax.Array) -> Params:
  """One aggregator's model: the mean of ``models`` (leaves ``[s, ...]``) weighted by
  ``weights [s]`` (0: not received); all zero gives zeros. MoDeST's weights are 0/1,
  so this is the unweighted mean of the models received."""
  total = jnp.sum(weights)
  w = weights / jnp.where(total > 0, total, 1)  # [s]
  return jax.tree.map(lambda p: jnp.tensordot(w.astype(p.dtype), p, axes=1), models)


def take_weights(take: jax.Array) -> jax.Array:
  """Normalised weights ``[s, a]`` of each aggregator's averaging: 1/count per taken model."""
  return take / jnp.maximum(jnp.sum(take, axis=0, keepdims=True), 1)


# ------------------------------------------------------------------ views and messages


def membership(availability, state: SimState) -> tuple[jax.Array, jax.Array]:
  """This round's membership counters ``[N]`` and which nodes joined or left ``[N]``."""
  ex = state.extra
  member = ex.counter % 2 == 1
  if availability is not None:
    member = availability(state.key, state.round, state.clock).member
  changed = member != (ex.counter % 2 == 1)  # [N]
  return ex.counter + changed, changed


def global_views(vw: Views, online: jax.Array, counter: jax.Array, cand: jax.Array,
                 timed_out: jax.Array, search_down: jax.Array, r: jax.Array) -> Views:
  """The shared view ``[1, N]`` after round r: online nodes seen, timed-out probes
  (``timed_out [s, C]`` of ``cand``) and sample-search pings (ids ``search_down [K]``,
  N: none) down, membership counters current."""
  down_ids = jnp.where(jnp.any(timed_out, axis=0), cand[0], online.shape[0])  # [C]
  down = vw.down.at[0, down_ids].set(r, mode='drop').at[0, search_down].set(r, mode='drop')
  return Views(seen=jnp.where(online, r, vw.seen), down=down, joins=counter[None])


def node_flags(ids: jax.Array, nodes: int) -> jax.Array:
  """``[N] bool``: True at ``ids`` (out-of-range ids are dropped)."""
  return jnp.zeros((nodes,), bool).at[ids].set(True, mode='drop')


def new_views(settings: ModestSettings, state: SimState, plan: RoundPlan, counter: jax.Array,
              changed: jax.Array) -> tuple[Views, jax.Array | None]:
  """Views after the round, and (local views) the nodes that send heartbeats ``[N]``."""
  r, online, nodes = state.round, state.available, settings.nodes
  timed_out = plan.probed & ~plan.responsive & plan.live[:, None] & settings.mark_down  # [s, C]
  if not settings.local:
    search = plan.search
    search_down = search.probed & ~search.responsive & settings.mark_down  # [K]
    return global_views(state.extra.views, online, counter, plan.cand, timed_out,
                        jnp.where(search_down, search.ranked, nodes), r), None
  part = jnp.where(plan.live, plan.sample, nodes)  # out-of-range ids are dropped
  agg_rows = jnp.where(plan.agg_valid, plan.agg_ids, nodes)  # [a]
  heartbeat = (online | changed) & ~node_flags(part, nodes)  # [N] no model carries their record
  vw = _merge_local_views(state.extra.views, plan.part_vw, plan.cand, timed_out, plan.sends,
                          part, agg_rows, beat_seen=jnp.where(heartbeat & online, r, NEVER),
                          beat_joins=jnp.where(heartbeat, counter, NEVER), r=r)
  return vw, heartbeat


def message_counts(settings: ModestSettings, state: SimState, plan: RoundPlan,
                   prev_ok: jax.Array, heartbeat: jax.Array | None,
                   resent: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Messages of the round: uploads to every chosen aggregator (+ view), the previous
  aggregators' downloads to the live sample (+ view), re-forwarded models after a
  failed round (``resent [s]``: the last round's participants that sent to ``a``
  aggregators), pings and the replies of live candidates, and (local views) heartbeats
  to the aggregators. Returns (per-node counts ``sent [N, K]`` so far, this round's
  ``[K]``)."""
  nodes, live = settings.nodes, plan.live
  n_live = jnp.sum(live, dtype=jnp.int32)
  part = jnp.where(live, plan.sample, nodes)
  uploads = jnp.sum(plan.chosen_ok, axis=1, dtype=jnp.int32) * live  # [s]
  again = resent.astype(jnp.int32) * settings.aggregators  # [s]
  senders = jnp.where(resent, state.extra.participants, nodes)
  sent = state.sent.at[senders, MODEL].add(again, mode='drop').at[senders, VIEW].add(
      again, mode='drop')
  sent = sent.at[part, MODEL].add(uploads, mode='drop')
  sent = sent.at[part, VIEW].add(uploads, mode='drop')
  prev = jnp.where(prev_ok, state.extra.agg_ids, nodes)
  sent = sent.at[prev, MODEL].add(n_live, mode='drop').at[prev, VIEW].add(n_live, mode='drop')
  probes = jnp.sum(plan.probed, axis=1, dtype=jnp.int32) * live  # [s]
  replies = plan.probed & plan.responsive & live[:, None]  # [s, C]
  sent = sent.at[part, PING].add(probes, mode='drop')
  sent = sent.at[jnp.where(replies, plan.cand, nodes), PING].add(1, mode='drop')
  pings = jnp.sum(probes) + jnp.sum(replies, dtype=jnp.int32)
  sent, search_pings = _search_pings(sent, plan.search, prev, nodes)
  pings += search_pings
  if heartbeat is not None:
    is_agg = node_flags(jnp.where(plan.agg_valid, plan.agg_ids, nodes), nodes)  # [N]
    beats = (jnp.sum(plan.agg_valid, dtype=jnp.int32) - is_agg) * heartbeat  # [N] to the others
    sent = sent.at[:, PING].add(beats)
    pings += jnp.sum(beats)
  models = jnp.sum(uploads) + n_live * jnp.sum(prev_ok, dtype=jnp.int32) + jnp.sum(again)
  return sent, jnp.stack([models, models, pings]).astype(jnp.int32)


def _search_pings(sent: jax.Array, search: Search, searchers: jax.Array,
                  nodes: int) -> tuple[jax.Array, jax.Array]:
  """Every searching aggregator (``searchers [a]``, N: none) pings the probed entries of
  the sample search, and each responsive one answers each of them. Returns (``sent``,
  the number of pings and replies)."""
  n_searchers = jnp.sum(searchers < nodes, dtype=jnp.int32)
  n_probed = jnp.sum(search.probed, dtype=jnp.int32)
  answered = search.probed & search.responsive  # [K]
  sent = sent.at[searchers, PING].add(n_probed, mode='drop')
  sent = sent.at[jnp.where(answered, search.ranked, nodes), PING].add(n_searchers, mode='drop')
  return sent, n_searchers * (n_probed + jnp.sum(answered, dtype=jnp.int32))


# ------------------------------------------------------------------ a round


def next_aggregates(settings: ModestSettings, state: SimState, plan: RoundPlan, averaged: Stacked,
                    done: jax.Array, n_sent: jax.Array) -> ModestState:
  """The aggregates that start round r+1 (``done [a]``, inf: lost). If models were sent
  but every aggregator went down, the aggregates are lost (all inf; the next round
  re-forwards, see ``reforward``); if no model was sent at all, the old ones stay and
  are resent after a ping timeout."""
  ex = state.extra
  ok = plan.agg_valid & jnp.isfinite(done)  # [a]
  any_ok = jnp.any(ok)
  lost = ~any_ok & jnp.any(plan.agg_valid & (n_sent > 0))
  stalled_until = state.clock + settings.ping_timeout
  return ex.replace(
      agg_params=jax.tree.map(lambda new, old: jnp.where(any_ok, new, old), averaged,
                              ex.agg_params),
      agg_ids=jnp.where(any_ok | lost, plan.agg_ids, ex.agg_ids),
      agg_done=jnp.where(any_ok | lost, jnp.where(ok, done, jnp.inf),
                         jnp.full((settings.aggregators,), stalled_until)))


def reforward(settings: ModestSettings, network: Network, aggregate_fn, state: SimState,
              crash: jax.Array, sample: jax.Array, live: jax.Array) -> tuple[ModestState, jax.Array]:
  """After a failed round (no aggregate arrives): its participants that are still up
  wait ``reforward_timeout`` after their send, then re-forward their trained models
  (node rows) to the first ``a`` live nodes of this round's sample (``live [s]``, rank
  order) still up then, which average them (HEAD: ``on_agg_ack(success=False)`` ->
  ``forward_trained_model``). With none up, the last aggregate stays, now held there.
  Returns (the replaced aggregates, senders [s] bool)."""
  ex, nodes, a = state.extra, settings.nodes, settings.aggregators
  t0 = ex.sent_at + settings.reforward_timeout
  ids = jnp.minimum(ex.participants, nodes - 1)  # [s]
  models, _ = trained_models(settings, state)  # [s, ...]
  up = (ex.participants < nodes) & state.available[ids] & (crash[ids] > t0)  # [s]
  ready = live & (crash[sample] > t0)  # [s] answers the re-forwarders' pings at t0
  slots = jnp.argsort(~ready, stable=True)[:a]  # [a] the first such participants
  new_ids, valid = sample[slots], ready[slots]
  transfer = network.transfer_seconds(ids[:, None], new_ids[None, :], settings.model_bytes,
                                      up_share=a, down_share=jnp.sum(up))  # [s, a]
  done = t0 + jnp.max(jnp.where(up[:, None], transfer, 0.0), axis=0)  # [a]
  mean = aggregate_fn(models, up.astype(jnp.float32))
  any_up = jnp.any(up)
  params = jax.tree.map(lambda m, old: jnp.where(any_up, jnp.broadcast_to(m, old.shape), old),
                        mean, ex.agg_params)
  return ex.replace(agg_params=params, agg_ids=new_ids,
                    agg_done=jnp.where(valid, done, jnp.inf)), up


def crash_times_of(availability, state: SimState, nodes: int) -> jax.Array:
  """``[N]`` each node's crash time in simulated seconds (inf: never)."""
  if availability is None:
    return jnp.full((nodes,), jnp.inf, jnp.float32)
  return availability(state.key, state.round, state.clock).crash_time


def start_round(settings: ModestSettings, network: Network, availability, aggregate_fn,
                state: SimState):
  """The sample and the aggregates that reach it; after a failed round, the re-forwarded
  ones. Returns (state with the aggregates in use, view, sample [s], live [s], Search,
  arrive [s, a], crash [N], re-forward senders [s])."""
  crash = crash_times_of(availability, state, settings.nodes)
  view = ranking_view(settings, state, membership(availability, state)[0])
  sample, live, search = live_sample(settings, network, state, view)  # [s], [s] that answered
  arrive = deliveries(settings, network, state.extra, sample, live, search.seconds, crash)
  failed = jnp.any(live) & ~jnp.any(jnp.isfinite(arrive))
  recovered, senders = reforward(settings, network, aggregate_fn, state, crash, sample, live)
  ex = jax.tree.map(lambda r, e: jnp.where(failed, r, e), recovered, state.extra)
  arrive = jnp.where(failed, deliveries(settings, network, recovered, sample, live,
                                        jnp.zeros_like(search.seconds), crash), arrive)
  return (state.replace(extra=ex), view, sample, live, search, arrive, crash,
          senders & failed)


def modest_round(settings: ModestSettings, learner: Learner, network: Network, availability,
                 state: SimState, data: NodeData, *,
                 vc: mixing.VarianceCorrection | None = None,
                 aggregate_fn: Callable[[Stacked, jax.Array], Params] = aggregate,
                 ) -> tuple[SimState, RoundMetrics]:
  """One MoDeST round: sample, train, probe for aggregators, aggregate, update views.
  ``aggregate_fn(models [s, ...], weights [s]) -> params`` is every aggregator's rule."""
  r, clock0 = state.round, state.clock
  state, view, sample, live, search, arrive, crash, resent = start_round(
      settings, network, availability, aggregate_fn, state)
  ex = state.extra
  prev_ok = jnp.isfinite(ex.agg_done)  # [a]
  result, steps, trained, finished = train_sample(settings, learner, network, state, data,
                                                  sample, arrive, crash)
  plan, probe_seconds = plan_round(settings, network, state, view, sample, finished, search,
                                   prev_ok, crash, trained)
  n_live = jnp.sum(plan.live, dtype=jnp.int32)
  sent_at = trained + probe_seconds  # [s]
  take, done, n_sent = collect(settings, network, plan, sent_at, crash)
  averaged = jax.vmap(aggregate_fn, in_axes=(None, 1))(result.params, take)  # [a, ...]
  if vc is not None:  # Tian et al. 2024, at every aggregator
    averaged = _correct(vc, averaged, ex.agg_params, result.params, take_weights(take))
  counter, changed = membership(availability, state)
  vw, heartbeat = new_views(settings, state, plan, counter, changed)
  part = jnp.where(plan.live, sample, settings.nodes)  # [s]
  last_send = jnp.max(jnp.where(plan.live, sent_at, clock0))
  new_extra = next_aggregates(settings, state, plan, averaged, done, n_sent).replace(
      views=vw, counter=counter, participants=part, sent_at=last_send)
  end = jnp.min(new_extra.agg_done)
  clock = jnp.where(jnp.isfinite(end), end, last_send)  # a lost round ends with its last send
  sent, messages = message_counts(settings, state, plan, prev_ok, heartbeat, resent)
  node_params = keep_trained(settings, state, part, result.params)  # [s or N, ...]
  new_state = state.replace(round=r + 1, nodes=state.nodes.replace(params=node_params),
                            clock=clock, sent=sent, extra=new_extra)
  metrics = RoundMetrics(
      train_loss=jnp.sum(result.loss * plan.live) / jnp.maximum(n_live, 1),
      sim_seconds=clock - clock0, messages=messages, active_nodes=n_live,
      node_steps=jnp.sum(steps))
  return new_state, metrics


def _correct(vc: mixing.VarianceCorrection, averaged: Stacked, previous: Stacked,
             trained: Stacked, weights: jax.Array) -> Stacked:
  """Rescales each aggregate's layers to the mean variance of the models it averaged
  (weights ``[s, a]``; unweighted, so 'received' and 'follow_beta' agree), or to the
  aggregator's previous model ('self')."""
  var = mixing.layer_variance(trained, vc.unbiased)  # [s] per leaf
  received = jax.tree.map(lambda v: weights.T @ v, var)  # [a] per leaf
  own = mixing.layer_variance(previous, vc.unbiased)  # [a] per leaf
  return mixing.variance_correct(averaged, mixing.received_target(vc, own, received), vc)


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


MAX_LOCAL_VIEW_NODES = 10_000  # --views=local: three [N, N] int32 matrices


def check_config(c) -> None:
  """MoDeST's checks on the whole experiment config."""
  fedavg_lib.check_sampled(c)
  check(c.aggregators <= c.nodes, f'--aggregators={c.aggregators} must be in 1..--nodes={c.nodes}')
  check(c.views != 'local' or c.nodes <= MAX_LOCAL_VIEW_NODES,
        f'--views=local keeps an [N, N] view matrix ({12 * c.nodes ** 2 / 2 ** 30:.1f} GiB at '
        f'--nodes={c.nodes}); use --views=global or at most {MAX_LOCAL_VIEW_NODES} nodes')


def build(ctx: registry.BuildContext) -> Protocol:
  c = ctx.config
  aggregator = aggregation.make_aggregator(c.aggregator, c.trim_fraction)
  return modest(ctx.learner, nodes=c.nodes, sample_size=c.sample_size,
                aggregators=c.aggregators, success_fraction=c.success_fraction,
                ping_timeout=c.ping_timeout, inactivity_threshold=c.inactivity_threshold,
                views=c.views, mark_down=c.mark_down, stream=c.modest_stream,
                reforward_timeout=c.reforward_timeout, aggregator_order=c.aggregator_order,
                network=ctx.network, availability=ctx.availability,
                variance_correction=ctx.variance_correction,
                aggregate_fn=lambda models, weights: aggregator.apply(models, weights, ())[0])


registry.register(registry.ProtocolSpec(
    'modest', build, 'MoDeST (de Vos et al., 2023)', check_config, ModestConfig))
