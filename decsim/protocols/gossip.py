"""Gossip learning (Ormandi, Hegedus, Jelasity, "Gossip learning with linear models on
fully distributed data", Concurrency and Computation 2013; Hegedus, Danner,
Jelasity, "Gossip learning as a decentralized alternative to federated
learning", DAIS 2019, and "Decentralized learning works: an empirical comparison
of gossip learning and federated learning", JPDC 2021), with the all-neighbour
push and ``0.5 * self + 0.5 * mean(received)`` merge of Tian et al. (2024),
"Vanishing Variance Problem in Fully Decentralized Neural-Network Systems".

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

Variance correction (``decsim.mixing.variance_correct``): after merging, each
receiver's layers are rescaled to the mean variance of the models it merged,
its own included except under ``replace`` ('received'), or to their variance
weighted like the merge ('follow_beta'), or to its own ('self'). Each message
carries its sender's per-layer variances (a few floats).
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from decsim import mixing
from decsim.data.sampler import NodeData
from decsim.network import MODEL, model_messages
from decsim.protocols.base import (Learner, Protocol, init_params, node_average, sample_available,
                                   train_nodes)
from decsim.rng import Stream, node_keys, round_key
from decsim.state import NodeState, RoundMetrics, SimState, init_sim_state
from decsim.topology import Topology
from decsim.types import Params, PRNGKey, Stacked

PEERS = ('random', 'neighbour', 'all_neighbours')
MERGES = ('age', 'half', 'beta', 'replace')
WAKES = ('uniform', 'exponential')


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


def gossip(learner: Learner, *, nodes: int, topology: Topology | None = None,
           delta: int = 10, wake: str = 'uniform', peers: str = 'random', merge: str = 'half',
           beta: float = 0.5, buffer_size: int = 1, partitions: int = 1, keep_prob: float = 1.0,
           max_active: int = 0, tick_seconds: float = 1.0,
           variance_correction: mixing.VarianceCorrection | None = None) -> Protocol:
  if peers not in PEERS:
    raise ValueError(f'unknown gossip peers {peers!r}: choose one of {", ".join(PEERS)}')
  if merge not in MERGES:
    raise ValueError(f'unknown gossip merge {merge!r}: choose one of {", ".join(MERGES)}')
  if wake not in WAKES:
    raise ValueError(f'unknown gossip wake {wake!r}: choose one of {", ".join(WAKES)}')
  if peers != 'random' and topology is None:
    raise ValueError(f'gossip peers={peers!r} needs a topology')
  if delta < 1 or buffer_size < 1 or partitions < 1 or not 0 < keep_prob <= 1:
    raise ValueError('gossip needs delta >= 1, buffer_size >= 1, partitions >= 1, '
                     '0 < keep_prob <= 1')
  w_self = {'half': 0.5, 'beta': beta, 'replace': 0.0, 'age': None}[merge]
  masked = partitions > 1 or keep_prob < 1.0
  rows_n = nodes if max_active <= 0 else min(max_active, nodes)
  vc = variance_correction

  # Static layout of the messages: [N, S] arrays; pull (all_neighbours) has dst = row.
  pull = peers == 'all_neighbours'
  if topology is not None:
    k = topology.idx.shape[1]
    nb_valid = (topology.weights > 0) & (topology.idx != jnp.arange(nodes)[:, None])  # [N, k]

  def part_ids(params: Params) -> Params:
    """Partition of every element of one model: (flat offset) mod K, like params."""
    leaves, treedef = jax.tree.flatten(params)
    out, offset = [], 0
    for leaf in leaves:
      out.append(((offset + jnp.arange(leaf.size)) % partitions).reshape(leaf.shape))
      offset += leaf.size
    return jax.tree.unflatten(treedef, out)

  def init(key: PRNGKey, data: NodeData) -> SimState:
    del data
    params = init_params(learner, jax.random.fold_in(key, Stream.INIT), nodes)
    opt_state = jax.vmap(learner.tx.init)(params)
    first_key = jax.random.fold_in(round_key(key, 0, Stream.GOSSIP), 1)
    first = jax.random.randint(first_key, (nodes,), 0, delta)  # [N] first wake-up ticks
    buffer = _empty_inbox(params, nodes, partitions, masked) if buffer_size > 1 else None
    extra = GossipState(next_wake=first.astype(jnp.int32),
                        age=jnp.zeros((nodes, partitions), jnp.float32),
                        dropped=jnp.zeros((), jnp.int32), buffer=buffer)
    return init_sim_state(key, NodeState(params, opt_state), extra)

  def interval(key: PRNGKey) -> jax.Array:
    """Ticks to each node's next wake-up: [N] int32 >= 1."""
    if wake == 'uniform':
      lo, hi = max(1, round(0.8 * delta)), max(1, round(1.2 * delta))
      return jax.random.randint(key, (nodes,), lo, hi + 1)
    return jnp.maximum(1, jnp.ceil(delta * jax.random.exponential(key, (nodes,)))).astype(jnp.int32)

  def messages(key: PRNGKey, send: jax.Array, alive: jax.Array):
    """(src, dst, valid) of this tick's messages, each [N, S]."""
    ids = jnp.arange(nodes, dtype=jnp.int32)
    if pull:  # row i receives from each neighbour that woke
      src = topology.idx
      dst = jnp.broadcast_to(ids[:, None], src.shape)
      valid = nb_valid & send[src] & alive[:, None]
      return src, dst, valid
    u = jax.random.uniform(key, (nodes,))  # [N]
    if peers == 'random':
      target = (ids + 1 + jnp.floor(u * (nodes - 1)).astype(jnp.int32)) % nodes
      ok = jnp.full((nodes,), nodes > 1)
    else:
      count = jnp.sum(nb_valid, axis=1)  # [N]
      r = jnp.minimum(jnp.floor(u * count).astype(jnp.int32), jnp.maximum(count - 1, 0))
      rank = jnp.cumsum(nb_valid, axis=1) - 1  # [N, k]
      slot = jnp.argmax(nb_valid & (rank == r[:, None]), axis=1)  # [N]
      target = topology.idx[ids, slot]
      ok = count > 0
    valid = send & ok & alive[target]
    return ids[:, None], target[:, None], valid[:, None]

  def element_masks(key: PRNGKey, src, dst, p_src, params: Stacked, pids: Params):
    """Per-message per-element masks, a function of slot -> leaves [N, ...]; None if unmasked."""
    if not masked:
      return None
    leaf_pids = jax.tree.leaves(pids)

    def at(s):
      leaves, treedef = jax.tree.flatten(params)
      out = []
      for i, (x, pid) in enumerate(zip(leaves, leaf_pids)):
        m = jnp.ones(x.shape, bool)
        if partitions > 1:
          m = m & (pid[None] == p_src[:, s].reshape((-1,) + (1,) * (x.ndim - 1)))
        if keep_prob < 1.0:
          def one(a, b):
            return jax.random.bernoulli(jax.random.fold_in(jax.random.fold_in(
                jax.random.fold_in(key, a), b), i), keep_prob, x.shape[1:])
          m = m & jax.vmap(one)(src[:, s], dst[:, s])
        out.append(m)
      return jax.tree.unflatten(treedef, out)

    return at

  def inbox_of(params: Stacked, var: Stacked, age: jax.Array, src, dst, valid, p_src,
               masks) -> Inbox:
    """Sums over receivers of this tick's messages (see ``Inbox``)."""
    n_slots = src.shape[1]
    a_src = jnp.take_along_axis(age[src.ravel()], p_src.ravel()[:, None], 1)[:, 0]  # [M]
    a_src = a_src.reshape(src.shape)  # [N, S]
    coef = jnp.where(valid, a_src if merge == 'age' else 1.0, 0.0)  # [N, S]
    flat_dst = dst.ravel()

    def seg(v):  # [N, S, ...] -> sums per receiver [N, ...]
      if pull:
        return jnp.sum(v, axis=1)
      return jax.ops.segment_sum(v.reshape((-1,) + v.shape[2:]), flat_dst, num_segments=nodes)

    num, den = [], []
    leaves, treedef = jax.tree.flatten(params)
    for i, x in enumerate(leaves):
      bcast = (-1,) + (1,) * (x.ndim - 1)
      acc_n = acc_d = None
      for s in range(n_slots):
        c = coef[:, s].reshape(bcast).astype(x.dtype)
        term = x[src[:, s]] * c
        d = jnp.broadcast_to(c, (x.shape[0],) + (1,) * (x.ndim - 1))
        if masks is not None:
          m = jax.tree.leaves(masks(s))[i].astype(x.dtype)
          term, d = term * m, c * m
        if not pull:  # one slot, scatter to the receivers
          term = jax.ops.segment_sum(term, dst[:, s], num_segments=nodes)
          d = jax.ops.segment_sum(d, dst[:, s], num_segments=nodes)
        acc_n = term if acc_n is None else acc_n + term
        acc_d = d if acc_d is None else acc_d + d
      num.append(acc_n)
      den.append(acc_d)
    vsum = jax.tree.map(lambda v: seg(jnp.where(valid, v[src], 0.0)), var)
    vwsum = jax.tree.map(lambda v: seg(coef * v[src]), var)
    k_idx = flat_dst * partitions + p_src.ravel()  # [M] (receiver, partition)
    age_max = jax.ops.segment_max(jnp.where(valid, a_src, 0.0).ravel(), k_idx,
                                  num_segments=nodes * partitions).reshape(nodes, partitions)
    return Inbox(num=jax.tree.unflatten(treedef, num), den=jax.tree.unflatten(treedef, den),
                 count=seg(valid.astype(jnp.int32)), var_sum=vsum, var_wsum=vwsum,
                 weight_sum=seg(coef), age_max=jnp.maximum(age_max, 0.0))

  def merge_rows(own: Stacked, inbox: Inbox, age: jax.Array, own_var: Stacked, pids: Params):
    """Merged models of some rows (leaves [R, ...]), their new ages [R, K] and VC targets."""
    got = inbox.count > 0  # [R]

    def one(x, num, den, pid):
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

    merged = jax.tree.map(one, own, inbox.num, inbox.den, pids)
    new_age = jnp.where(got[:, None], jnp.maximum(age, inbox.age_max), age)
    target = None
    if vc is not None:
      cnt = jnp.maximum(inbox.count, 1).astype(jnp.float32)
      a = jnp.mean(age, axis=1)  # [R]
      if merge == 'replace':
        plain = jax.tree.map(lambda s: s / cnt, inbox.var_sum)
        weighted = plain
      else:
        plain = jax.tree.map(lambda v, s: (v + s) / (1.0 + cnt), own_var, inbox.var_sum)
        if merge == 'age':
          total = a + inbox.weight_sum
          weighted = jax.tree.map(
              lambda v, s, p: jnp.where(total > 0, (a * v + s) / jnp.where(total > 0, total, 1.0), p),
              own_var, inbox.var_wsum, plain)
        else:
          weighted = jax.tree.map(lambda v, s: w_self * v + (1 - w_self) * s / cnt, own_var,
                                  inbox.var_sum)
      target = mixing.correction_target(vc, own_var, plain, weighted)
    return merged, new_age, target

  def round_(state: SimState, data: NodeData) -> tuple[SimState, RoundMetrics]:
    t, alive, g = state.round, state.available, state.extra  # alive [N]
    params, opt_state = state.nodes.params, state.nodes.opt_state
    awake = g.next_wake <= t  # [N]
    send = awake & alive
    next_wake = jnp.where(awake, t + interval(round_key(state.key, t, Stream.GOSSIP)),
                          g.next_wake)
    kt = round_key(state.key, t, Stream.TOPOLOGY)
    src, dst, valid = messages(kt, send, alive)  # [N, S]
    p_node = jax.random.randint(jax.random.fold_in(kt, 1), (nodes,), 0, partitions)  # [N]
    p_src = p_node[src]  # [N, S]
    pids = part_ids(jax.tree.map(lambda x: x[0], params))
    masks = element_masks(jax.random.fold_in(kt, 2), src, dst, p_src, params, pids)
    var = mixing.layer_variance(params, vc.unbiased if vc else False)  # [N] per leaf
    inbox = inbox_of(params, var, g.age, src, dst, valid, p_src, masks)
    if buffer_size > 1:
      inbox = jax.tree.map(jnp.add, g.buffer, inbox).replace(
          age_max=jnp.maximum(g.buffer.age_max, inbox.age_max))
      acts = (inbox.count >= buffer_size) & alive
    else:
      acts = (inbox.count > 0) & alive  # [N]

    # The acting rows: all N (masked) or max_active of them, drawn among the acting.
    if rows_n == nodes:
      ids, row_ok = jnp.arange(nodes, dtype=jnp.int32), acts
    else:
      ids, row_ok = sample_available(jax.random.fold_in(kt, 3), acts, rows_n)  # [R]
    take = lambda tree: jax.tree.map(lambda x: x[ids], tree)
    merged, new_age, target = merge_rows(take(params), take(inbox), g.age[ids], take(var), pids)
    if vc is not None:
      merged = mixing.variance_correct(merged, target, vc, where=row_ok)

    keys = node_keys(state.key, t, ids, Stream.BATCH)  # [R]
    result = train_nodes(learner, merged, take(opt_state), keys, data, rows=ids)
    steps = jnp.where(row_ok, result.steps, 0)  # [R]
    new_age = new_age + (steps * learner.batch_size).astype(jnp.float32)[:, None]
    scatter = jnp.where(row_ok, ids, nodes)  # non-acting rows are dropped
    put = lambda all_, new: jax.tree.map(lambda a, b: a.at[scatter].set(b, mode='drop'), all_, new)
    params = put(params, result.params)
    opt_state = put(opt_state, result.opt_state)
    age = g.age.at[scatter].set(new_age, mode='drop')
    buffer = None
    if buffer_size > 1:  # the rows that merged start an empty buffer
      done = jnp.zeros((nodes,), bool).at[scatter].set(True, mode='drop')
      keep = lambda x: jnp.where(done.reshape((-1,) + (1,) * (x.ndim - 1)), 0, x).astype(x.dtype)
      buffer = jax.tree.map(keep, inbox)

    sent_msgs = jax.ops.segment_sum(valid.ravel().astype(jnp.int32), src.ravel(),
                                    num_segments=nodes)  # [N]
    round_sent = jnp.sum(sent_msgs)
    n_act = jnp.sum(row_ok, dtype=jnp.int32)
    dropped = jnp.sum(acts, dtype=jnp.int32) - n_act
    state = state.replace(
        round=t + 1,
        nodes=NodeState(params, opt_state),
        clock=state.clock + jnp.float32(tick_seconds),
        sent=state.sent.at[:, MODEL].add(sent_msgs),
        extra=GossipState(next_wake=next_wake, age=age, dropped=g.dropped + dropped,
                          buffer=buffer))
    metrics = RoundMetrics(
        train_loss=jnp.sum(jnp.where(row_ok, result.loss, 0.0)) / jnp.maximum(n_act, 1),
        sim_seconds=jnp.float32(tick_seconds),
        messages=model_messages(round_sent),
        active_nodes=n_act,
        node_steps=jnp.sum(steps))
    return state, metrics

  def model(state: SimState) -> Params:
    return node_average(state.nodes.params)

  return Protocol(init, round_, model)


def _empty_inbox(params: Stacked, nodes: int, partitions: int, masked: bool) -> Inbox:
  zeros = lambda x: jnp.zeros(x.shape, x.dtype)
  den = jax.tree.map(lambda x: jnp.zeros(x.shape if masked else (nodes,) + (1,) * (x.ndim - 1),
                                         x.dtype), params)
  var = jax.tree.map(lambda x: jnp.zeros((nodes,), jnp.float32), params)
  return Inbox(num=jax.tree.map(zeros, params), den=den, count=jnp.zeros((nodes,), jnp.int32),
               var_sum=var, var_wsum=var, weight_sum=jnp.zeros((nodes,), jnp.float32),
               age_max=jnp.zeros((nodes, partitions), jnp.float32))
