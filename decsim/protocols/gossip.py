"""Gossip learning (Ormandi, Hegedus, Jelasity, "Gossip learning with linear models on
fully distributed data", Concurrency and Computation 2013; Hegedus, Danner,
Jelasity, "Gossip learning as a decentralized alternative to federated
learning", DAIS 2019, and "Decentralized learning works: an empirical comparison
of gossip learning and federated learning", JPDC 2021), with the all-neighbour
push and ``0.5 * self + 0.5 * mean(received)`` merge of Tian et al. (2024),
"Vanishing Variance Problem in Fully Decentralized Neural-Network Systems".

Two modes (``mode``, ``--gossip_mode``).

``dfl2`` (the default) follows the authors' simulator DFL2 (github.com/twoentartian/DFL2,
``bin/simulation/simulator_opti.cpp``: the tick loop; ``simulator_opti_model_update.hpp``:
``train_average_standard::get_output_model``), on decsim's simulated network. A node wakes
on its own timer (every ``period_seconds`` simulated seconds, jittered ``uniform`` 0.8-1.2x,
``exponential``, or ``fixed`` with every node starting at second 0 as DFL2's
``first_train_tick = 0``), trains one local update on its model (``batch /
samples_per_second_i`` seconds), and pushes the trained model to its peers (all its
neighbours, one neighbour, or one random node). A push of B bytes arrives after ``latency +
B / bandwidth``, the sender's concurrent pushes sharing its upload and a receiver's
concurrent arrivals its download (``Network.transfer_seconds``). Arrivals are buffered; a
node holding ``buffer_size`` (default 2) models merges them all at once, ``beta self +
(1 - beta) mean(buffer)`` (``half``: beta = 0.5, DFL2's ``beta`` argument), and empties
its buffer; it does not train after merging. The correction's target is DFL2's:
'received' the mean variance of the buffered models, own excluded (their ``others``);
'follow_beta' ``beta var(merged) + (1 - beta) others``; 'self' the own variance before
merging (their ``train_50_average_50_fix_variance_self``; their ``self`` *method* is a
no-op, i.e. no correction). Within a tick the order is DFL2's: wake-ups train and push,
arrivals join buffers, full buffers merge. Time is simulated seconds; a tick of
``tick_seconds`` is only the discretisation of the event times (an event at second s acts
in tick floor(s / tick_seconds)). Deviations: a node's trained model replaces its model at
its wake-up tick (DFL2 has no compute time); a node starts its next wake-up only once its
previous push has fully arrived (it keeps one outbox); a message reaching an offline node
is lost; sampling masks are drawn at delivery.

``merge_on_arrival`` is decsim's earlier gossip, in ticks (it ignores the network).
Asynchrony is simulated in ticks: one call of ``round`` is one tick of
``tick_seconds`` simulated seconds. Every node wakes every ``delta`` ticks with
jitter (``uniform``: an integer interval drawn from [0.8 delta, 1.2 delta], 8-12
ticks for delta = 10 as in the authors' simulator; ``exponential``: a rounded-up
exponential with mean delta) and pushes its current model to one peer drawn
uniformly from all nodes (``random``) or from its topology neighbours
(``neighbour``), or to all its neighbours (``all_neighbours``). Messages arrive
in the tick they are sent. A node that received something merges it with its own
model and then trains ``local_steps`` local minibatches; nodes that neither
received nor merged do no work and do not change (a node that only sends does
not train, as in the original protocol).

Merge rules, for a node with model w, age t (samples trained on) and the
models w_j, ages t_j that reached it in this tick:

* ``age``:     (t w + sum_j t_j w_j) / (t + sum_j t_j): the classic
  age-weighted merge (t1 w1 + t2 w2) / (t1 + t2) extended to simultaneous
  arrivals; it equals merging them one by one in any order when the merged
  weights accumulate, and its new age is max(t, t_j) as in Hegedus et al.;
* ``half``:    0.5 w + 0.5 mean_j w_j (Tian et al.'s default);
* ``beta``:    beta w + (1 - beta) mean_j w_j;
* ``replace``: mean_j w_j.

All simultaneous arrivals are summed per receiver in one vectorised pass: a
``segment_sum`` over receivers for single-peer pushes, and for the all-neighbour
push on an undirected graph the same sums in pull form (receiver i adds the
models of its neighbours that woke, slot by slot over the neighbour table, as
``decsim.mixing.mix_sparse`` does). ``buffer_size > 1`` holds received sums
until a node has ``buffer_size`` models, then merges them as one arrival set.

Hegedus et al.'s communication baselines: ``partitions = K`` splits every model
into K interleaved partitions (element e of the flattened model is in partition
e mod K); each message carries one random partition and its age, every node
keeps one age per partition, and merges act per element on the partitions that
arrived. ``keep_prob = p`` (sampling compression) sends each weight of a
message with probability p; merges use only the weights that arrived. Bytes per
message are model_bytes / K, or p * model_bytes in expectation
(``message_bytes``).

Cost of a tick. Wake-ups, peer choices and the per-receiver sums are O(N) masks
and one pass over the N models (O(N k P) for the all-neighbour push). Merging
and training run on a gathered set of ``max_active`` rows (0: all N, masked):
the acting nodes (receivers) are drawn into those rows, so with
``max_active ~ a few x N / delta`` a tick costs O(N / delta) model work
instead of O(N). If more nodes act than there are rows, the surplus are
dropped for that tick (counted in ``GossipState.dropped``; in buffer mode they
keep their buffer and act in a later tick).

Variance correction (``decsim.mixing.variance_correct``) in ``merge_on_arrival``: after
merging, each receiver's layers are rescaled to the mean variance of the models it merged,
its own included except under ``replace`` ('received'), or to their variance
weighted like the merge ('follow_beta'), or to its own ('self'). Each message
carries its sender's per-layer variances (a few floats).
"""

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from decsim import mixing
from decsim import network as network_lib
from decsim import topology as topology_lib
from decsim.config import Component, check, option
from decsim.data.sampler import NodeData
from decsim.network import MODEL, model_messages
from decsim.protocols import registry
from decsim.protocols.base import (Learner, Protocol, init_params, node_average, sample_available,
                                   train_nodes)
from decsim.rng import Stream, node_keys, round_key
from decsim.state import NodeState, RoundMetrics, SimState, init_sim_state
from decsim.topology import Topology
from decsim.types import Params, PRNGKey, Stacked

PEERS = ('random', 'neighbour', 'all_neighbours')
MERGES = ('age', 'half', 'beta', 'replace')
WAKES = ('uniform', 'exponential', 'fixed')
MODES = ('dfl2', 'merge_on_arrival')


@dataclasses.dataclass(frozen=True)
class GossipConfig(Component):
  """Gossip learning (Ormandi et al. 2013)."""

  gossip_mode: str = option('dfl2', 'Gossip semantics: dfl2 (train on the timer, push, buffer, '
                            'merge at --gossip_buffer models, on the simulated network) or '
                            'merge_on_arrival (push on the timer, merge every arrival then '
                            'train, in ticks).', choices=MODES)
  gossip_period_seconds: float = option(10.0, "Gossip (dfl2): mean simulated seconds between "
                                        "a node's wake-ups.", low=0, low_open=True)
  gossip_delta: int = option(10, "Gossip (merge_on_arrival): mean ticks between a node's "
                             "wake-ups (Delta).", low=1)
  gossip_wake: str = option('uniform', 'Gossip wake-up jitter: uniform (0.8-1.2 x the period), '
                            'exponential (mean the period) or fixed (every period, all nodes '
                            'from time 0, as DFL2).', choices=WAKES)
  gossip_peers: str = option('random', 'Gossip push target: random (any node), neighbour (one '
                             '--topology neighbour) or all_neighbours.',
                             choices=PEERS)
  gossip_merge: str = option('half', 'Gossip merge: age (age-weighted), half (0.5 self + 0.5 '
                             'mean received), beta, replace (mean received).',
                             choices=MERGES)
  gossip_beta: float = option(0.5, 'Gossip --gossip_merge=beta: weight of the own model.',
                              low=0, high=1)
  gossip_buffer: int = option(0, 'Gossip: merge once this many models are held (1: on every '
                              'arrival; 0: 2 under dfl2, 1 under merge_on_arrival).', low=0)
  gossip_partitions: int = option(1, 'Gossip model partitioning: send one of K partitions '
                                  '(1: whole models).', low=1)
  gossip_keep: float = option(1.0, 'Gossip sampling compression: send each weight with this '
                              'probability (1: all).', low=0, high=1, low_open=True)
  gossip_max_active: int = option(0, 'Gossip: model rows merged and trained per tick (0: all '
                                  'N, masked).', low=0)
  tick_seconds: float = option(1.0, 'Gossip: simulated seconds per tick (round); under dfl2 '
                               'only the discretisation of the event times.', low=0,
                               low_open=True)


@struct.dataclass
class Inbox:
  """Per-receiver sums of what arrived (or is buffered); leaves [N, ...]."""

  num: Stacked  # leaves [N, ...]: sum_j c_j m_j w_j (c_j: age or 1, m_j: element mask)
  den: Stacked  # leaves [N, ...] (masked) or [N, 1, ...]: sum_j c_j m_j
  count: jax.Array  # [N] int32, models received
  var_sum: Stacked  # leaves [N]: sum_j var_j of the senders' layer variances
  var_wsum: Stacked  # leaves [N]: sum_j c_j var_j
  weight_sum: jax.Array  # [N] float32: sum_j c_j
  age_max: jax.Array  # [N, K] float32: max age received per partition (0 if none)


@struct.dataclass
class GossipState:
  next_wake: jax.Array  # [N] int32, tick of each node's next wake-up
  age: jax.Array  # [N, K] float32, samples trained on, per model partition
  dropped: jax.Array  # [] int32, acting nodes beyond max_active, summed over ticks
  buffer: Any = None  # Inbox in buffer mode (buffer_size > 1), else None


def message_bytes(model_bytes: int, partitions: int = 1, keep_prob: float = 1.0) -> int:
  """Bytes of one gossip message: a 1/K partition, or p of the weights in expectation
  (the receiver regenerates the sampling mask from a seed sent along)."""
  return max(1, math.ceil(model_bytes * keep_prob / partitions))


@dataclasses.dataclass(frozen=True)
class GossipSettings:
  """The static configuration of a gossip run; the fields are ``gossip``'s arguments."""

  nodes: int
  delta: int = 10
  wake: str = 'uniform'
  peers: str = 'random'
  merge: str = 'half'
  beta: float = 0.5
  buffer_size: int = 1
  partitions: int = 1
  keep_prob: float = 1.0
  max_active: int = 0
  tick_seconds: float = 1.0
  vc: mixing.VarianceCorrection | None = None
  mode: str = 'dfl2'
  period_seconds: float = 10.0

  @property
  def w_self(self) -> float | None:
    """The merge's fixed weight of the own model (None: age-weighted)."""
    return {'half': 0.5, 'beta': self.beta, 'replace': 0.0, 'age': None}[self.merge]

  @property
  def masked(self) -> bool:
    """Messages carry only some elements (partitions or sampling compression)."""
    return self.partitions > 1 or self.keep_prob < 1.0

  @property
  def rows(self) -> int:
    """Model rows merged and trained per tick: all N, or ``max_active``."""
    return self.nodes if self.max_active <= 0 else min(self.max_active, self.nodes)

  @property
  def pull(self) -> bool:
    """All-neighbour push, summed in pull form (receiver i reads its neighbour slots)."""
    return self.peers == 'all_neighbours'


def check_settings(settings: GossipSettings, topology: Topology | None) -> None:
  """Raises ValueError on an unknown option or an out-of-range number."""
  c = settings
  for name, value, choices in (('peers', c.peers, PEERS), ('merge', c.merge, MERGES),
                               ('wake', c.wake, WAKES), ('mode', c.mode, MODES)):
    if value not in choices:
      raise ValueError(f'unknown gossip {name} {value!r}: choose one of {", ".join(choices)}')
  if c.peers != 'random' and topology is None:
    raise ValueError(f'gossip peers={c.peers!r} needs a topology')
  if c.delta < 1 or c.buffer_size < 1 or c.partitions < 1 or not 0 < c.keep_prob <= 1:
    raise ValueError('gossip needs delta >= 1, buffer_size >= 1, partitions >= 1, '
                     '0 < keep_prob <= 1')
  if not c.period_seconds > 0 or not c.tick_seconds > 0:
    raise ValueError('gossip needs period_seconds > 0 and tick_seconds > 0')


def gossip(learner: Learner, *, nodes: int, topology: Topology | None = None,
           delta: int = 10, wake: str = 'uniform', peers: str = 'random', merge: str = 'half',
           beta: float = 0.5, buffer_size: int | None = None, partitions: int = 1,
           keep_prob: float = 1.0, max_active: int = 0, tick_seconds: float = 1.0,
           variance_correction: mixing.VarianceCorrection | None = None, mode: str = 'dfl2',
           period_seconds: float = 10.0, network: network_lib.Network | None = None) -> Protocol:
  """Gossip learning over ``nodes`` nodes (see the module docstring for the options).
  ``buffer_size=None``: 2 under ``mode='dfl2'``, 1 under ``merge_on_arrival``;
  ``network`` (dfl2 only; default: ``uniform_network``) times training and transfers."""
  if buffer_size is None:
    buffer_size = 2 if mode == 'dfl2' else 1
  settings = GossipSettings(nodes=nodes, delta=delta, wake=wake, peers=peers, merge=merge,
                            beta=beta, buffer_size=buffer_size, partitions=partitions,
                            keep_prob=keep_prob, max_active=max_active,
                            tick_seconds=tick_seconds, vc=variance_correction, mode=mode,
                            period_seconds=period_seconds)
  check_settings(settings, topology)
  if mode == 'dfl2':
    net = network if network is not None else network_lib.uniform_network(nodes)
    nbytes = message_bytes(learner.model_bytes(), partitions, keep_prob)

    def round_(state: SimState, data: NodeData) -> tuple[SimState, RoundMetrics]:
      return net_round(settings, learner, topology, net, nbytes, state, data)

    return Protocol(functools.partial(net_init, settings, learner, topology), round_,
                    gossip_model)

  def round_(state: SimState, data: NodeData) -> tuple[SimState, RoundMetrics]:
    return gossip_round(settings, learner, topology, state, data)  # a function (chex counts traces)

  return Protocol(functools.partial(gossip_init, settings, learner), round_, gossip_model)


def extra_metrics(state: SimState) -> dict[str, jax.Array]:
  """Gossip's own per-run counters for the metrics rows."""
  out = {'gossip_dropped': state.extra.dropped}
  if isinstance(state.extra, NetGossipState):
    out['gossip_merges'] = state.extra.merges
  return out


def gossip_model(state: SimState) -> Params:
  """The model gossip delivers: the average of the node models."""
  return node_average(state.nodes.params)


def gossip_init(settings: GossipSettings, learner: Learner, key: PRNGKey,
                data: NodeData) -> SimState:
  """N fresh models, age 0, each node's first wake-up drawn in [0, delta)."""
  del data
  nodes = settings.nodes
  params = init_params(learner, jax.random.fold_in(key, Stream.INIT), nodes)
  opt_state = jax.vmap(learner.tx.init)(params)
  first_key = jax.random.fold_in(round_key(key, 0, Stream.GOSSIP), 1)
  first = jax.random.randint(first_key, (nodes,), 0, settings.delta)  # [N] first wake-up ticks
  buffer = None
  if settings.buffer_size > 1:
    buffer = empty_inbox(params, nodes, settings.partitions, settings.masked)
  extra = GossipState(next_wake=first.astype(jnp.int32),
                      age=jnp.zeros((nodes, settings.partitions), jnp.float32),
                      dropped=jnp.zeros((), jnp.int32), buffer=buffer)
  return init_sim_state(key, NodeState(params, opt_state), extra)


# ------------------------------------------------------------------ messages


def partition_ids(params: Params, partitions: int) -> Params:
  """Partition of every element of one model: (flat offset) mod K, like params."""
  leaves, treedef = jax.tree.flatten(params)
  out, offset = [], 0
  for leaf in leaves:
    out.append(((offset + jnp.arange(leaf.size)) % partitions).reshape(leaf.shape))
    offset += leaf.size
  return jax.tree.unflatten(treedef, out)


def wake_interval(key: PRNGKey, settings: GossipSettings) -> jax.Array:
  """Ticks to each node's next wake-up: [N] int32 >= 1."""
  nodes, delta = settings.nodes, settings.delta
  if settings.wake == 'uniform':
    lo, hi = max(1, round(0.8 * delta)), max(1, round(1.2 * delta))
    return jax.random.randint(key, (nodes,), lo, hi + 1)
  if settings.wake == 'fixed':
    return jnp.full((nodes,), delta, jnp.int32)
  return jnp.maximum(1, jnp.ceil(delta * jax.random.exponential(key, (nodes,)))).astype(jnp.int32)


def wake_seconds(u: jax.Array, settings: GossipSettings) -> jax.Array:
  """Simulated seconds to each node's next wake-up (dfl2 mode) from uniforms ``u [N]`` in
  [0, 1): [N] float32 > 0."""
  period = settings.period_seconds
  if settings.wake == 'uniform':
    return period * (0.8 + 0.4 * u)
  if settings.wake == 'fixed':
    return jnp.full(u.shape, period, jnp.float32)
  return period * jnp.maximum(-jnp.log1p(-u), 1e-6)  # exponential, mean the period


def neighbour_mask(topology: Topology) -> jax.Array:
  """[N, k] bool: the slots of ``topology`` that hold a real neighbour (not the node itself)."""
  nodes = topology.idx.shape[0]
  return (topology.weights > 0) & (topology.idx != jnp.arange(nodes)[:, None])


def push_targets(key: PRNGKey, settings: GossipSettings, topology: Topology | None,
                 u: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Each node's one peer, ``target [N]``, and whether it has one, ``ok [N]``: uniform
  over the other nodes (``random``) or over its topology neighbours (``neighbour``)."""
  nodes = settings.nodes
  ids = jnp.arange(nodes, dtype=jnp.int32)
  u = jax.random.uniform(key, (nodes,)) if u is None else u  # [N] in [0, 1)
  if settings.peers == 'random':
    target = (ids + 1 + jnp.floor(u * (nodes - 1)).astype(jnp.int32)) % nodes
    return target, jnp.full((nodes,), nodes > 1)
  nb_valid = neighbour_mask(topology)  # [N, k]
  count = jnp.sum(nb_valid, axis=1)  # [N]
  r = jnp.minimum(jnp.floor(u * count).astype(jnp.int32), jnp.maximum(count - 1, 0))
  rank = jnp.cumsum(nb_valid, axis=1) - 1  # [N, k]
  slot = jnp.argmax(nb_valid & (rank == r[:, None]), axis=1)  # [N]
  return topology.idx[ids, slot], count > 0


def messages(key: PRNGKey, send: jax.Array, alive: jax.Array, settings: GossipSettings,
             topology: Topology | None,
             u: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(src, dst, valid) of this tick's messages, each [N, S]; pull form has dst = row."""
  ids = jnp.arange(settings.nodes, dtype=jnp.int32)
  if settings.pull:  # row i receives from each neighbour that woke
    src = topology.idx  # [N, k]
    dst = jnp.broadcast_to(ids[:, None], src.shape)
    return src, dst, neighbour_mask(topology) & send[src] & alive[:, None]
  target, ok = push_targets(key, settings, topology, u)  # [N]
  valid = send & ok & alive[target]
  return ids[:, None], target[:, None], valid[:, None]


def message_counts(valid: jax.Array, src: jax.Array, nodes: int) -> jax.Array:
  """Messages each node sent this tick: [N] int32 from the valid [N, S] of senders src."""
  return jax.ops.segment_sum(valid.ravel().astype(jnp.int32), src.ravel(), num_segments=nodes)


def _keep_draw(key: PRNGKey, src: jax.Array, dst: jax.Array, leaf_index: int,
               keep_prob: float, shape: tuple[int, ...]) -> jax.Array:
  """Sampling mask of one message's leaf: a function of (sender, receiver, leaf)."""
  k = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, src), dst), leaf_index)
  return jax.random.bernoulli(k, keep_prob, shape)


def element_mask(key: PRNGKey, leaf_index: int, x: jax.Array, pid: jax.Array, src: jax.Array,
                 dst: jax.Array, part: jax.Array, settings: GossipSettings) -> jax.Array:
  """Which elements of leaf ``x [N, ...]`` each of N messages (one slot: senders ``src [N]``,
  receivers ``dst [N]``, partitions ``part [N]``) carries: [N, ...] bool."""
  m = jnp.ones(x.shape, bool)
  if settings.partitions > 1:
    m = m & (pid[None] == part.reshape((-1,) + (1,) * (x.ndim - 1)))
  if settings.keep_prob < 1.0:
    draw = functools.partial(_keep_draw, key, leaf_index=leaf_index,
                             keep_prob=settings.keep_prob, shape=x.shape[1:])
    m = m & jax.vmap(draw)(src, dst)
  return m


# ------------------------------------------------------------------ inboxes


def receiver_sum(v: jax.Array, dst: jax.Array, nodes: int, pull: bool) -> jax.Array:
  """Sums of per-message values ``v [N, S, ...]`` per receiver ``dst [N, S]``: [N, ...]."""
  if pull:
    return jnp.sum(v, axis=1)
  return jax.ops.segment_sum(v.reshape((-1,) + v.shape[2:]), dst.ravel(), num_segments=nodes)


def leaf_sums(x: jax.Array, leaf_index: int, pid: jax.Array, coef: jax.Array, src: jax.Array,
              dst: jax.Array, p_src: jax.Array, mask_key: PRNGKey,
              settings: GossipSettings) -> tuple[jax.Array, jax.Array]:
  """One leaf's inbox sums, slot by slot: ``sum_j c_j m_j x_j [N, ...]`` and ``sum_j c_j m_j``
  (``[N, ...]`` masked, else ``[N, 1, ...]``), for coefficients ``coef [N, S]``."""
  bcast = (-1,) + (1,) * (x.ndim - 1)
  acc_n = acc_d = None
  for s in range(src.shape[1]):
    c = coef[:, s].reshape(bcast).astype(x.dtype)
    term = x[src[:, s]] * c
    d = jnp.broadcast_to(c, (x.shape[0],) + (1,) * (x.ndim - 1))
    if settings.masked:
      m = element_mask(mask_key, leaf_index, x, pid, src[:, s], dst[:, s], p_src[:, s],
                       settings).astype(x.dtype)
      term, d = term * m, c * m
    if not settings.pull:  # one slot, scatter to the receivers
      term = jax.ops.segment_sum(term, dst[:, s], num_segments=settings.nodes)
      d = jax.ops.segment_sum(d, dst[:, s], num_segments=settings.nodes)
    acc_n = term if acc_n is None else acc_n + term
    acc_d = d if acc_d is None else acc_d + d
  return acc_n, acc_d


def inbox_of(params: Stacked, var: Stacked, age: jax.Array, src: jax.Array, dst: jax.Array,
             valid: jax.Array, p_src: jax.Array, pids: Params, mask_key: PRNGKey,
             settings: GossipSettings) -> Inbox:
  """Sums over receivers of this tick's messages ``[N, S]`` (see ``Inbox``); ``var``:
  the senders' layer variances ``[N]`` per leaf, ``age [N, K]``, ``p_src [N, S]``: the
  partition each message carries."""
  nodes, partitions = settings.nodes, settings.partitions
  a_src = jnp.take_along_axis(age[src.ravel()], p_src.ravel()[:, None], 1)[:, 0]  # [M]
  a_src = a_src.reshape(src.shape)  # [N, S]
  coef = jnp.where(valid, a_src if settings.merge == 'age' else 1.0, 0.0)  # [N, S]
  seg = functools.partial(receiver_sum, dst=dst, nodes=nodes, pull=settings.pull)
  leaves, treedef = jax.tree.flatten(params)
  sums = [leaf_sums(x, i, pid, coef, src, dst, p_src, mask_key, settings)
          for i, (x, pid) in enumerate(zip(leaves, jax.tree.leaves(pids)))]
  vsum = jax.tree.map(lambda v: seg(jnp.where(valid, v[src], 0.0)), var)
  vwsum = jax.tree.map(lambda v: seg(coef * v[src]), var)
  k_idx = dst.ravel() * partitions + p_src.ravel()  # [M] (receiver, partition)
  age_max = jax.ops.segment_max(jnp.where(valid, a_src, 0.0).ravel(), k_idx,
                                num_segments=nodes * partitions).reshape(nodes, partitions)
  return Inbox(num=jax.tree.unflatten(treedef, [n for n, _ in sums]),
               den=jax.tree.unflatten(treedef, [d for _, d in sums]),
               count=seg(valid.astype(jnp.int32)), var_sum=vsum, var_wsum=vwsum,
               weight_sum=seg(coef), age_max=jnp.maximum(age_max, 0.0))


def empty_inbox(params: Stacked, nodes: int, partitions: int, masked: bool) -> Inbox:
  """An inbox holding nothing, shaped for ``params`` (leaves [N, ...])."""
  zeros = lambda x: jnp.zeros(x.shape, x.dtype)
  den = jax.tree.map(lambda x: jnp.zeros(x.shape if masked else (nodes,) + (1,) * (x.ndim - 1),
                                         x.dtype), params)
  var = jax.tree.map(lambda x: jnp.zeros((nodes,), jnp.float32), params)
  return Inbox(num=jax.tree.map(zeros, params), den=den, count=jnp.zeros((nodes,), jnp.int32),
               var_sum=var, var_wsum=var, weight_sum=jnp.zeros((nodes,), jnp.float32),
               age_max=jnp.zeros((nodes, partitions), jnp.float32))



def held_inbox(settings: GossipSettings, buffer: Inbox | None, inbox: Inbox,
               alive: jax.Array) -> tuple[Inbox, jax.Array]:
  """What each node holds after this tick's arrivals, and which nodes act ``[N]``: any
  arrival, or (buffer mode) at least ``buffer_size`` models held; offline nodes never."""
  if settings.buffer_size > 1:
    inbox = jax.tree.map(jnp.add, buffer, inbox).replace(
        age_max=jnp.maximum(buffer.age_max, inbox.age_max))
    return inbox, (inbox.count >= settings.buffer_size) & alive
  return inbox, (inbox.count > 0) & alive  # [N]


def emptied_buffer(inbox: Inbox, scatter: jax.Array, nodes: int) -> Inbox:
  """The held inbox with the rows that merged (``scatter`` ids; ``nodes``: none) emptied."""
  done = jnp.zeros((nodes,), bool).at[scatter].set(True, mode='drop')
  keep = lambda x: jnp.where(done.reshape((-1,) + (1,) * (x.ndim - 1)), 0, x).astype(x.dtype)
  return jax.tree.map(keep, inbox)


# ------------------------------------------------------------------ merges


def merge_leaf(x: jax.Array, num: jax.Array, den: jax.Array, pid: jax.Array, age: jax.Array,
               got: jax.Array, merge: str, w_self: float | None, partitions: int) -> jax.Array:
  """One leaf ``x [R, ...]`` merged with its inbox sums by the ``merge`` rule (module
  docstring); rows that got nothing (``got [R]``) or elements that no message carried
  keep ``x``."""
  bcast = (-1,) + (1,) * (x.ndim - 1)
  has = den > 0
  if merge == 'age':
    a = age[:, pid] if partitions > 1 else age[:, 0].reshape(bcast)  # [R, ...]
    total = a + den
    new = jnp.where(total > 0, (a * x + num) / jnp.where(total > 0, total, 1.0), x)
  else:
    mean = num / jnp.where(has, den, 1.0)
    new = w_self * x + (1.0 - w_self) * mean if w_self else mean
    new = jnp.where(has, new, x)
  return jnp.where(got.reshape(bcast), new, x).astype(x.dtype)


def merge_target(settings: GossipSettings, inbox: Inbox, age: jax.Array,
                 own_var: Stacked) -> Stacked:
  """Variance-correction target ``[R]`` per leaf of the merged rows: the variances
  averaged like the merge averaged the models (own included except under ``replace``)."""
  vc, merge = settings.vc, settings.merge
  if merge == 'replace':
    return mixing.received_target(vc, own_var, inbox.var_sum, inbox.count)
  if merge == 'age':
    return mixing.received_target(vc, own_var, inbox.var_sum, inbox.count,
                                  weighted=inbox.var_wsum, weight=inbox.weight_sum,
                                  own_weight=jnp.mean(age, axis=1))
  return mixing.received_target(vc, own_var, inbox.var_sum, inbox.count,
                                own_share=settings.w_self)


def merge_rows(own: Stacked, inbox: Inbox, age: jax.Array, own_var: Stacked, pids: Params,
               settings: GossipSettings) -> tuple[Stacked, jax.Array, Stacked | None]:
  """Merged models of some rows (leaves [R, ...]), their new ages [R, K] and VC targets."""
  got = inbox.count > 0  # [R]
  one = functools.partial(merge_leaf, age=age, got=got, merge=settings.merge,
                          w_self=settings.w_self, partitions=settings.partitions)
  merged = jax.tree.map(one, own, inbox.num, inbox.den, pids)
  new_age = jnp.where(got[:, None], jnp.maximum(age, inbox.age_max), age)
  target = None if settings.vc is None else merge_target(settings, inbox, age, own_var)
  return merged, new_age, target


# ------------------------------------------------------------------ a tick


def take_rows(tree: Any, ids: jax.Array) -> Any:
  """Rows ``ids [R]`` of every leaf: leaves [R, ...]."""
  return jax.tree.map(lambda x: x[ids], tree)


def put_rows(tree: Any, rows: Any, scatter: jax.Array) -> Any:
  """``tree`` with rows ``scatter [R]`` replaced by ``rows``; out-of-range ids are dropped."""
  return jax.tree.map(lambda a, b: a.at[scatter].set(b, mode='drop'), tree, rows)


def acting_rows(key: PRNGKey, acts: jax.Array,
                settings: GossipSettings) -> tuple[jax.Array, jax.Array]:
  """The rows that merge and train: all N (masked by ``acts [N]``) or ``max_active``
  drawn among the acting nodes. Returns (ids [R], row_ok [R])."""
  if settings.rows == settings.nodes:
    return jnp.arange(settings.nodes, dtype=jnp.int32), acts
  return sample_available(key, acts, settings.rows)  # [R]


def merge_and_train(settings: GossipSettings, learner: Learner, state: SimState, data: NodeData,
                    inbox: Inbox, var: Stacked, pids: Params, ids: jax.Array, row_ok: jax.Array):
  """Rows ``ids [R]`` merge their inbox, are variance-corrected and train; only the
  ``row_ok`` rows are written back. Returns (NodeState, age [N, K], scatter ids [R],
  loss [R], steps [R])."""
  params, opt_state = state.nodes.params, state.nodes.opt_state
  age = state.extra.age
  merged, new_age, target = merge_rows(take_rows(params, ids), take_rows(inbox, ids), age[ids],
                                       take_rows(var, ids), pids, settings)
  if settings.vc is not None:
    merged = mixing.variance_correct(merged, target, settings.vc, where=row_ok)
  keys = node_keys(state.key, state.round, ids, Stream.BATCH)  # [R]
  result = train_nodes(learner, merged, take_rows(opt_state, ids), keys, data, rows=ids,
                       round_=state.round)
  steps = jnp.where(row_ok, result.steps, 0)  # [R]
  new_age = new_age + (steps * learner.batch_size).astype(jnp.float32)[:, None]
  scatter = jnp.where(row_ok, ids, settings.nodes)  # non-acting rows are dropped
  nodes = NodeState(put_rows(params, result.params, scatter),
                    put_rows(opt_state, result.opt_state, scatter))
  return nodes, age.at[scatter].set(new_age, mode='drop'), scatter, result.loss, steps


def exchange(settings: GossipSettings, topology: Topology | None, state: SimState):
  """This tick's wake-ups and messages. Returns (next_wake [N], src [N, S],
  valid [N, S], acts [N], held inbox, layer variances [N] per leaf, partition ids)."""
  t, alive, g = state.round, state.available, state.extra  # alive [N]
  params, vc = state.nodes.params, settings.vc
  awake = g.next_wake <= t  # [N]
  next_wake = jnp.where(awake, t + wake_interval(round_key(state.key, t, Stream.GOSSIP), settings),
                        g.next_wake)
  kt = round_key(state.key, t, Stream.TOPOLOGY)
  src, dst, valid = messages(kt, awake & alive, alive, settings, topology)  # [N, S]
  p_node = jax.random.randint(jax.random.fold_in(kt, 1), (settings.nodes,), 0,
                              settings.partitions)  # [N]
  pids = partition_ids(jax.tree.map(lambda x: x[0], params), settings.partitions)
  var = mixing.layer_variance(params, vc.unbiased if vc else False)  # [N] per leaf
  inbox = inbox_of(params, var, g.age, src, dst, valid, p_node[src], pids,
                   jax.random.fold_in(kt, 2), settings)
  inbox, acts = held_inbox(settings, g.buffer, inbox, alive)
  return next_wake, src, valid, acts, inbox, var, pids


def gossip_round(settings: GossipSettings, learner: Learner, topology: Topology | None,
                 state: SimState, data: NodeData) -> tuple[SimState, RoundMetrics]:
  """One tick: wake-ups and pushes, merges of the nodes that received, their training."""
  t, g, nodes = state.round, state.extra, settings.nodes
  next_wake, src, valid, acts, inbox, var, pids = exchange(settings, topology, state)
  ids, row_ok = acting_rows(jax.random.fold_in(round_key(state.key, t, Stream.TOPOLOGY), 3),
                            acts, settings)  # [R]
  node_state, age, scatter, loss, steps = merge_and_train(settings, learner, state, data, inbox,
                                                          var, pids, ids, row_ok)
  buffer = emptied_buffer(inbox, scatter, nodes) if settings.buffer_size > 1 else None
  sent_msgs = message_counts(valid, src, nodes)  # [N]
  n_act = jnp.sum(row_ok, dtype=jnp.int32)
  dropped = jnp.sum(acts, dtype=jnp.int32) - n_act
  state = state.replace(
      round=t + 1, nodes=node_state,
      clock=state.clock + jnp.float32(settings.tick_seconds),
      sent=state.sent.at[:, MODEL].add(sent_msgs),
      extra=GossipState(next_wake=next_wake, age=age, dropped=g.dropped + dropped,
                        buffer=buffer))
  metrics = RoundMetrics(
      train_loss=jnp.sum(jnp.where(row_ok, loss, 0.0)) / jnp.maximum(n_act, 1),
      sim_seconds=jnp.float32(settings.tick_seconds),
      messages=model_messages(jnp.sum(sent_msgs)),
      active_nodes=n_act,
      node_steps=jnp.sum(steps))
  return state, metrics


# ------------------------------------------------------------------ dfl2 mode: the network


@struct.dataclass
class Outbox:
  """The model each node pushed last and its messages in flight (dfl2 mode)."""

  params: Stacked  # leaves [N, ...]: the model each node last pushed
  var: Stacked  # leaves [N]: its layer variances
  age: jax.Array  # [N, K] float32: its ages
  part: jax.Array  # [N] int32: the partition it carries
  dst: jax.Array  # [N, S] int32: receivers (push form: row = sender; pull form: row = receiver)
  arrival: jax.Array  # [N, S] float32: simulated second each message arrives (inf: none)
  busy_until: jax.Array  # [N] float32: when the node's last push has fully arrived


@struct.dataclass
class NetGossipState:
  next_wake: jax.Array  # [N] float32, simulated second of each node's next wake-up
  age: jax.Array  # [N, K] float32, samples trained on, per model partition
  dropped: jax.Array  # [] int32, wake-ups beyond max_active postponed by a tick, summed
  merges: jax.Array  # [] int32, merges summed over ticks
  wakes: jax.Array  # [N] int32, wake-ups (trainings) of each node so far
  buffer: Inbox  # models received and not merged yet
  out: Outbox


def event_keys(key: PRNGKey, wakes: jax.Array, ids: jax.Array, stream: Stream) -> PRNGKey:
  """Keys ``[R]`` of nodes ``ids`` for their wake-up number ``wakes [R]``: dfl2 mode draws
  by event, not by tick, so a node's batches, intervals and peers do not depend on the
  tick length."""
  return jax.vmap(lambda n, w: jax.random.fold_in(round_key(key, w, stream), n))(ids, wakes)


def event_uniform(key: PRNGKey, wakes: jax.Array, stream: Stream, salt: int) -> jax.Array:
  """One uniform draw in [0, 1) per node ``[N]`` for its wake-up number ``wakes [N]``."""
  keys = event_keys(jax.random.fold_in(key, salt), wakes, jnp.arange(wakes.shape[0]), stream)
  return jax.vmap(jax.random.uniform)(keys)


def slots(settings: GossipSettings, topology: Topology | None) -> int:
  """Message slots per row: the neighbour table's width (pull form) or 1."""
  return topology.idx.shape[1] if settings.pull else 1


def net_init(settings: GossipSettings, learner: Learner, topology: Topology | None,
             key: PRNGKey, data: NodeData) -> SimState:
  """N fresh models, age 0, nothing in flight; first wake-ups at 0 (``fixed``, as DFL2's
  synchronous start) or uniform in [0, period)."""
  base = gossip_init(settings, learner, key, data)
  nodes, parts, s = settings.nodes, settings.partitions, slots(settings, topology)
  params = base.nodes.params
  first = jax.random.uniform(jax.random.fold_in(round_key(key, 0, Stream.GOSSIP), 1), (nodes,),
                             maxval=settings.period_seconds)  # [N]
  if settings.wake == 'fixed':
    first = jnp.zeros((nodes,), jnp.float32)
  age = jnp.zeros((nodes, parts), jnp.float32)
  out = Outbox(params=params, var=mixing.layer_variance(params), age=age,
               part=jnp.zeros((nodes,), jnp.int32), dst=jnp.zeros((nodes, s), jnp.int32),
               arrival=jnp.full((nodes, s), jnp.inf, jnp.float32),
               busy_until=jnp.zeros((nodes,), jnp.float32))
  extra = NetGossipState(next_wake=first, age=age, dropped=jnp.zeros((), jnp.int32),
                         merges=jnp.zeros((), jnp.int32), wakes=jnp.zeros((nodes,), jnp.int32),
                         buffer=empty_inbox(params, nodes, parts, settings.masked), out=out)
  return base.replace(extra=extra)


def train_wakers(settings: GossipSettings, learner: Learner, state: SimState, data: NodeData,
                 end: jax.Array):
  """The nodes whose timer fires before ``end`` train one local update on their model.
  Returns (params, opt_state, woke [N], steps [N], loss sum, wakers that wanted to)."""
  g, nodes = state.extra, settings.nodes
  wants = (g.next_wake < end) & state.available  # [N]
  ids, row_ok = acting_rows(jax.random.fold_in(round_key(state.key, state.round, Stream.TOPOLOGY),
                                               3), wants, settings)  # [R]
  params, opt_state = state.nodes.params, state.nodes.opt_state
  keys = event_keys(state.key, g.wakes[ids], ids, Stream.BATCH)  # [R]
  result = train_nodes(learner, take_rows(params, ids), take_rows(opt_state, ids), keys, data,
                       rows=ids, round_=state.round)
  scatter = jnp.where(row_ok, ids, nodes)  # [R]
  woke = jnp.zeros((nodes,), bool).at[scatter].set(True, mode='drop')  # [N]
  steps = jnp.zeros((nodes,), jnp.int32).at[scatter].set(result.steps, mode='drop')  # [N]
  loss = jnp.sum(jnp.where(row_ok, result.loss, 0.0))
  return (put_rows(params, result.params, scatter), put_rows(opt_state, result.opt_state, scatter),
          woke, steps, loss, wants)


def push(settings: GossipSettings, topology: Topology | None, network: network_lib.Network,
         state: SimState, params: Stacked, age: jax.Array, woke: jax.Array, send_time: jax.Array,
         model_bytes: int) -> tuple[Outbox, jax.Array]:
  """The nodes that woke push their trained ``params`` at ``send_time [N]``; a message of
  ``model_bytes`` arrives after latency + bytes / shared bandwidth (a sender's k pushes share
  its upload, a receiver's concurrent arrivals its download). Returns (outbox, sent [N])."""
  out, alive, nodes = state.extra.out, state.available, settings.nodes
  kt = round_key(state.key, state.round, Stream.TOPOLOGY)
  wakes = state.extra.wakes
  u = event_uniform(state.key, wakes, Stream.TOPOLOGY, 0)  # [N]
  src, dst, valid = messages(kt, woke, alive, settings, topology, u)  # [N, S]
  sent = message_counts(valid, src, nodes)  # [N]
  incoming = receiver_sum(valid.astype(jnp.int32), dst, nodes, settings.pull)  # [N]
  transfer = network.transfer_seconds(src, dst, model_bytes, sent[src], incoming[dst])  # [N, S]
  arrival = jnp.where(valid, send_time[src] + transfer, out.arrival)  # [N, S]
  last = jax.ops.segment_max(jnp.where(valid, arrival, -jnp.inf).ravel(), src.ravel(),
                             num_segments=nodes)  # [N]
  new = lambda a, b: jnp.where(woke.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)
  part = jnp.minimum(event_uniform(state.key, wakes, Stream.TOPOLOGY, 1) * settings.partitions,
                     settings.partitions - 1).astype(jnp.int32)  # [N]
  var = mixing.layer_variance(params, settings.vc.unbiased if settings.vc else False)
  return Outbox(params=jax.tree.map(new, params, out.params), var=jax.tree.map(new, var, out.var),
                age=new(age, out.age), part=new(part, out.part),
                dst=jnp.where(valid, dst, out.dst), arrival=arrival,
                busy_until=new(jnp.maximum(send_time, last), out.busy_until)), sent


def deliver(settings: GossipSettings, topology: Topology | None, state: SimState, out: Outbox,
            end: jax.Array, pids: Params) -> tuple[Inbox, Outbox]:
  """Messages arriving before ``end`` join their receivers' buffers (lost if the receiver
  is offline). Returns (held buffer, outbox without them)."""
  alive, nodes = state.available, settings.nodes
  src = topology.idx if settings.pull else jnp.broadcast_to(
      jnp.arange(nodes, dtype=jnp.int32)[:, None], out.dst.shape)  # [N, S]
  arrive = out.arrival < end  # [N, S] (inf: nothing in flight)
  valid = arrive & alive[out.dst]
  key = jax.random.fold_in(round_key(state.key, state.round, Stream.TOPOLOGY), 2)
  inbox = inbox_of(out.params, out.var, out.age, src, out.dst, valid, out.part[src], pids, key,
                   settings)
  buffer = state.extra.buffer
  held = jax.tree.map(jnp.add, buffer, inbox).replace(
      age_max=jnp.maximum(buffer.age_max, inbox.age_max))
  return held, out.replace(arrival=jnp.where(arrive, jnp.inf, out.arrival))


def merge_full_buffers(settings: GossipSettings, params: Stacked, held: Inbox, age: jax.Array,
                       alive: jax.Array, pids: Params):
  """Online nodes holding ``buffer_size`` models merge them into their model (DFL2's
  ``get_output_model``) and are variance-corrected. Returns (params, age, acts [N])."""
  acts = (held.count >= settings.buffer_size) & alive  # [N]
  own_var = mixing.layer_variance(params, settings.vc.unbiased if settings.vc else False)
  one = functools.partial(merge_leaf, age=age, got=acts, merge=settings.merge,
                          w_self=settings.w_self, partitions=settings.partitions)
  merged = jax.tree.map(one, params, held.num, held.den, pids)
  new_age = jnp.where(acts[:, None], jnp.maximum(age, held.age_max), age)
  if settings.vc is not None:
    target = dfl2_target(settings, held, age, own_var, merged)
    merged = mixing.variance_correct(merged, target, settings.vc, where=acts)
  return merged, new_age, acts


def dfl2_target(settings: GossipSettings, held: Inbox, age: jax.Array, own_var: Stacked,
                merged: Stacked) -> Stacked:
  """DFL2's correction target ``[N]`` per leaf: the mean variance of the received models,
  own excluded ('received' = DFL2 ``others``), blended with the merged model's own variance
  by the self weight ('follow_beta'), or the own variance before merging ('self', DFL2's
  ``train_50_average_50_fix_variance_self``). The age merge has no fixed self weight: its
  'follow_beta' weights the variances like the models."""
  if settings.merge == 'age' and settings.vc.target == 'follow_beta':
    return merge_target(settings, held, age, own_var)
  merged_var = mixing.layer_variance(merged, settings.vc.unbiased)
  return mixing.received_only_target(settings.vc, own_var, merged_var, held.var_sum, held.count,
                                     settings.w_self or 0.0)


def net_round(settings: GossipSettings, learner: Learner, topology: Topology | None,
              network: network_lib.Network, model_bytes: int, state: SimState,
              data: NodeData) -> tuple[SimState, RoundMetrics]:
  """One tick of ``tick_seconds`` in dfl2 mode: wake-ups train and push, arrivals are
  buffered, full buffers merge (DFL2's order within a tick)."""
  g, nodes, dt = state.extra, settings.nodes, settings.tick_seconds
  end = (state.round + 1).astype(jnp.float32) * dt
  params, opt_state, woke, steps, loss, wants = train_wakers(settings, learner, state, data, end)
  age = g.age + (steps * learner.batch_size).astype(jnp.float32)[:, None]  # [N, K]
  wake_at = jnp.maximum(g.next_wake, state.round.astype(jnp.float32) * dt)  # [N]
  send_time = wake_at + network.compute_seconds(jnp.arange(nodes), steps * learner.batch_size)
  out, sent = push(settings, topology, network, state, params, age, woke, send_time,
                   model_bytes)
  interval = wake_seconds(event_uniform(state.key, g.wakes, Stream.GOSSIP, 0), settings)  # [N]
  due = g.next_wake < end
  next_wake = jnp.where(woke, jnp.maximum(wake_at + interval, out.busy_until),
                        jnp.where(due & ~state.available, g.next_wake + interval, g.next_wake))
  pids = partition_ids(jax.tree.map(lambda x: x[0], params), settings.partitions)
  held, out = deliver(settings, topology, state, out, end, pids)
  params, age, acts = merge_full_buffers(settings, params, held, age, state.available, pids)
  buffer = emptied_buffer(held, jnp.where(acts, jnp.arange(nodes), nodes), nodes)
  n_woke = jnp.sum(woke, dtype=jnp.int32)
  state = state.replace(
      round=state.round + 1, nodes=NodeState(params, opt_state),
      clock=state.clock + jnp.float32(dt),
      sent=state.sent.at[:, MODEL].add(sent),
      extra=NetGossipState(next_wake=next_wake, age=age,
                           dropped=g.dropped + jnp.sum(wants & ~woke, dtype=jnp.int32),
                           merges=g.merges + jnp.sum(acts, dtype=jnp.int32),
                           wakes=g.wakes + woke.astype(jnp.int32), buffer=buffer, out=out))
  return state, RoundMetrics(train_loss=loss / jnp.maximum(n_woke, 1),
                             sim_seconds=jnp.float32(dt), messages=model_messages(jnp.sum(sent)),
                             active_nodes=n_woke, node_steps=jnp.sum(steps))


def check_config(c) -> None:
  """Gossip's checks on the whole experiment config."""
  topology_lib.check_graph(c)
  check(c.gossip_peers == 'random' or c.topology != 'one_peer_exponential',
        f'--gossip_peers={c.gossip_peers} needs a static --topology, not one_peer_exponential')


def build(ctx: registry.BuildContext) -> Protocol:
  c = ctx.config
  shapes = jax.eval_shape(ctx.learner.init_params, jax.random.key(0))
  params = sum(leaf.size for leaf in jax.tree.leaves(shapes))
  check(c.gossip_partitions <= params,
        f'--gossip_partitions={c.gossip_partitions} exceeds the model\'s {params} parameters: '
        'use at most one partition per parameter')
  graph = None if c.gossip_peers == 'random' else topology_lib.from_config(c, ctx.seeds.graph)
  protocol = gossip(
      ctx.learner, nodes=c.nodes, topology=graph, delta=c.gossip_delta, wake=c.gossip_wake,
      peers=c.gossip_peers, merge=c.gossip_merge, beta=c.gossip_beta,
      buffer_size=c.gossip_buffer or None, partitions=c.gossip_partitions, keep_prob=c.gossip_keep,
      max_active=c.gossip_max_active, tick_seconds=c.tick_seconds,
      variance_correction=ctx.variance_correction, mode=c.gossip_mode,
      period_seconds=c.gossip_period_seconds, network=ctx.network)
  model = message_bytes(ctx.learner.model_bytes(), c.gossip_partitions, c.gossip_keep)
  return protocol._replace(node_models=lambda state: state.nodes.params,
                           message_bytes=network_lib.message_bytes(model, c.nodes),
                           extra_metrics=extra_metrics)


registry.register(registry.ProtocolSpec(
    'gossip', build, 'Gossip learning (Ormandi et al. 2013; DFL2 semantics by default)',
    check_config,
    GossipConfig))
