"""Splitting a train set over N nodes: IID, Dirichlet label skew, shards, natural.

Every scheme assigns each train sample to exactly one node and returns a
``Partition`` of padded index rows, the form the jitted samplers gather from.

* ``iid``: shuffle, then split as evenly as possible.
* ``dirichlet``: label skew, per class proportions ~ Dir(alpha) over the nodes
  (Yurochkin et al., 2019; Hsu et al., 2019, arXiv:1909.06335), in the form
  NIID-Bench made common (Li et al., 2022, "Federated Learning on Non-IID Data
  Silos: An Experimental Study", ICDE), which Tian et al. (2024) use with
  alpha = 0.5. Small alpha: few classes per node; large alpha: close to IID.
* ``shards``: the pathological non-IID split of McMahan et al. (2017,
  "Communication-Efficient Learning of Deep Networks from Decentralized Data",
  AISTATS): sort by label, cut into N * k shards, deal k shards to every node.
* ``natural``: by the writer or user that produced each sample (LEAF-style).

Construction is host-side numpy, done once; only the result goes to the device.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from decsim.data.sources import DataError

SCHEMES = ('iid', 'dirichlet', 'shards', 'natural')

_DIRICHLET_TRIES = 100


@struct.dataclass
class Partition:
  """Node n owns samples ``idx[n, :sizes[n]]``.

  Padding repeats the row's first index (0 for an empty row), so a gather with
  any column index in ``[0, L)`` stays in range; ``L = max(sizes)`` (at least 1).
  """

  idx: jax.Array  # [N, L] int32, row n lists node n's sample indices, padded
  sizes: jax.Array  # [N] int32

  @property
  def num_nodes(self) -> int:
    return self.idx.shape[0]


def from_lists(lists: list[np.ndarray]) -> Partition:
  """Packs one index array per node into a padded ``Partition`` (row order kept)."""
  lists = [np.asarray(row, np.int64).reshape(-1) for row in lists]
  sizes = np.array([len(row) for row in lists], np.int32)  # [N]
  width = max(1, int(sizes.max(initial=0)))
  idx = np.zeros((len(lists), width), np.int32)  # [N, L]
  for n, row in enumerate(lists):
    if len(row):
      idx[n, :] = row[0]
      idx[n, :len(row)] = row
  return Partition(idx=jnp.asarray(idx), sizes=jnp.asarray(sizes))


def to_lists(partition: Partition) -> list[np.ndarray]:
  """The inverse of ``from_lists``: node n's indices without padding."""
  idx, sizes = np.asarray(partition.idx), np.asarray(partition.sizes)
  return [idx[n, :sizes[n]] for n in range(len(sizes))]


def hold_out(partition: Partition, fraction: float, seed: int) -> tuple[Partition, Partition]:
  """Each node's samples split at random into (train, local test): ``floor(fraction *
  size)`` test samples, at most ``size - 1`` so every node keeps one to train on."""
  rng = np.random.default_rng([seed, 0x7E57])
  train, test = [], []
  for row in to_lists(partition):
    row = row[rng.permutation(len(row))]
    count = min(int(fraction * len(row)), max(len(row) - 1, 0))
    train.append(row[:len(row) - count])
    test.append(row[len(row) - count:])
  return from_lists(train), from_lists(test)


def iid(num_samples: int, nodes: int, rng) -> Partition:
  """Uniformly random, equal-sized (within one sample) shares."""
  _check_nodes(num_samples, nodes)
  rng = np.random.default_rng(rng)
  sizes = np.full(nodes, num_samples // nodes) + (np.arange(nodes) < num_samples % nodes)
  owner = np.empty(num_samples, np.int64)  # [M]
  owner[rng.permutation(num_samples)] = np.repeat(np.arange(nodes), sizes)
  return from_lists(_rows(owner, nodes))


def dirichlet(labels: np.ndarray, nodes: int, alpha: float, rng, min_size: int = 1) -> Partition:
  """Label skew: class c is split over the nodes in proportions p_c ~ Dir(alpha).

  As in NIID-Bench, a node already holding its fair share (M / N samples) gets
  nothing of the classes still to be split, which keeps sizes within reason.
  Draws are repeated (up to 100 times) until every node has ``min_size``
  samples.
  """
  labels = _check_labels(labels)
  m = len(labels)
  _check_nodes(m, nodes)
  if not alpha > 0:
    raise DataError(f'dirichlet alpha must be > 0, got {alpha}; 0.1 is strong skew, 100 near IID')
  rng = np.random.default_rng(rng)
  classes = np.unique(labels)
  by_class = [np.flatnonzero(labels == c) for c in classes]
  for _ in range(_DIRICHLET_TRIES):
    owner = np.empty(m, np.int64)  # [M]
    counts = np.zeros(nodes, np.int64)  # [N]
    for members in by_class:
      members = rng.permutation(members)
      p = rng.dirichlet(np.full(nodes, float(alpha)))  # [N]
      p = np.nan_to_num(p) * (counts < m / nodes)
      # Tiny alpha can put all mass on full nodes (or underflow): then spread evenly.
      p = p / p.sum() if p.sum() > 0 else (counts < m / nodes) / np.sum(counts < m / nodes)
      cuts = (np.cumsum(p)[:-1] * len(members)).astype(np.int64)  # [N-1]
      take = np.diff(np.concatenate([[0], cuts, [len(members)]]))  # [N]
      owner[members] = np.repeat(np.arange(nodes), take)
      counts += take
    if counts.min() >= min_size:
      return from_lists(_rows(owner, nodes))
  raise DataError(
      f'dirichlet(alpha={alpha}) left some of {nodes} nodes with fewer than {min_size} samples '
      f'in {_DIRICHLET_TRIES} draws over {m} samples; use a larger alpha, fewer nodes or more '
      'samples')


def shards(labels: np.ndarray, nodes: int, shards_per_node: int, rng) -> Partition:
  """McMahan et al.'s split: label-sorted shards, ``shards_per_node`` to each node.

  Samples of one class are in random order before sorting, so a shard is a
  random subset of its class. A shard that straddles a class boundary holds two
  classes; at most (classes - 1) shards do.
  """
  labels = _check_labels(labels)
  m = len(labels)
  _check_nodes(m, nodes)
  if shards_per_node < 1 or nodes * shards_per_node > m:
    raise DataError(
        f'shards needs 1 <= nodes * shards_per_node <= samples, got {nodes} * '
        f'{shards_per_node} for {m} samples; lower shards_per_node or nodes')
  rng = np.random.default_rng(rng)
  num_shards = nodes * shards_per_node
  perm = rng.permutation(m)
  order = perm[np.argsort(labels[perm], kind='stable')]  # [M] sample ids sorted by label
  shard_sizes = np.full(num_shards, m // num_shards) + (np.arange(num_shards) < m % num_shards)
  shard_of_pos = np.repeat(np.arange(num_shards), shard_sizes)  # [M]
  node_of_shard = np.empty(num_shards, np.int64)  # [S]
  node_of_shard[rng.permutation(num_shards)] = np.arange(num_shards) // shards_per_node
  owner = np.empty(m, np.int64)  # [M]
  owner[order] = node_of_shard[shard_of_pos]
  return from_lists(_rows(owner, nodes))


def natural(groups: np.ndarray, nodes: int) -> Partition:
  """Every group (writer/user) on one node; groups dealt round-robin in sorted order."""
  groups = np.asarray(groups).reshape(-1)
  distinct, inverse = np.unique(groups, return_inverse=True)
  if len(distinct) < nodes:
    raise DataError(
        f'natural partition has {len(distinct)} groups (writers/users) for {nodes} nodes; use '
        f'nodes <= {len(distinct)} or another scheme (iid, dirichlet, shards)')
  return from_lists(_rows(inverse.reshape(-1) % nodes, nodes))


def make_partition(
    name: str,
    labels: np.ndarray,
    nodes: int,
    *,
    seed: int,
    alpha: float = 0.5,
    shards_per_node: int = 2,
    groups: np.ndarray | None = None,
) -> Partition:
  """Partitions samples with ``labels`` [M] over ``nodes`` by scheme ``name``."""
  labels = _check_labels(labels)
  _check_nodes(len(labels), nodes)
  rng = np.random.default_rng(seed)
  if name == 'iid':
    return iid(len(labels), nodes, rng)
  if name == 'dirichlet':
    return dirichlet(labels, nodes, alpha, rng)
  if name == 'shards':
    return shards(labels, nodes, shards_per_node, rng)
  if name == 'natural':
    if groups is None:
      raise DataError(
          'natural partition needs groups (the writer/user of each sample), and this dataset '
          'has none; use a dataset with groups (e.g. synthetic) or another scheme')
    if len(groups) != len(labels):
      raise DataError(
          f'natural partition got {len(groups)} groups for {len(labels)} samples; pass one '
          'group id per train sample (ArrayDataset.groups)')
    return natural(groups, nodes)
  raise DataError(f'unknown partition {name!r}; choose one of {", ".join(SCHEMES)}')


def label_histogram(partition: Partition, labels: np.ndarray, num_classes: int) -> np.ndarray:
  """Counts ``[N, C]``: how many samples of class c node n holds."""
  idx, sizes = np.asarray(partition.idx), np.asarray(partition.sizes)  # [N, L], [N]
  labels = np.asarray(labels)
  n = idx.shape[0]
  valid = np.arange(idx.shape[1])[None, :] < sizes[:, None]  # [N, L]
  rows = np.broadcast_to(np.arange(n)[:, None], idx.shape)  # [N, L]
  flat = rows[valid] * num_classes + labels[idx[valid]]
  return np.bincount(flat, minlength=n * num_classes).reshape(n, num_classes)


def _rows(owner: np.ndarray, nodes: int) -> list[np.ndarray]:
  """Node n's sample ids, ascending, from the owner of every sample [M]."""
  order = np.argsort(owner, kind='stable')  # [M], ascending ids within a node
  counts = np.bincount(owner, minlength=nodes)  # [N]
  return np.split(order, np.cumsum(counts)[:-1])


def _check_labels(labels) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise DataError(
        f'labels must be a 1-D integer array [M], got shape {labels.shape} dtype {labels.dtype}')
  return labels


def _check_nodes(num_samples: int, nodes: int) -> None:
  if not 1 <= nodes <= num_samples:
    raise DataError(
        f'cannot split {num_samples} samples over {nodes} nodes; need 1 <= nodes <= samples '
        '(lower nodes or raise num_samples)')
