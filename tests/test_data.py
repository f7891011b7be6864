"""Tests for decsim.data.sources and decsim.data.partition (fast, offline)."""

import socket

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from decsim.data import partition as P
from decsim.data import sources as S

_FAST = settings(max_examples=25, deadline=None)


def _check_exact_cover(part: P.Partition, num_samples: int):
  """Every sample on exactly one node; sizes match rows; padding in range."""
  idx, sizes = np.asarray(part.idx), np.asarray(part.sizes)
  assert idx.dtype == np.int32 and sizes.dtype == np.int32
  assert idx.shape == (len(sizes), max(1, sizes.max()))
  rows = P.to_lists(part)
  assert [len(r) for r in rows] == sizes.tolist()
  np.testing.assert_array_equal(np.sort(np.concatenate(rows)), np.arange(num_samples))
  assert idx.min() >= 0 and idx.max() < num_samples
  for row, n in zip(idx, sizes):  # padding repeats the first index, or 0 when empty
    np.testing.assert_array_equal(row[n:], row[0] if n else 0)


def _mean_tv(hist: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
  """Mean over nodes of TV(node's label distribution, global label distribution)."""
  glob = np.bincount(labels, minlength=num_classes) / len(labels)  # [C]
  local = hist / np.maximum(hist.sum(1, keepdims=True), 1)  # [N, C]
  return float(0.5 * np.abs(local - glob).sum(1).mean())


def _iid_tv_bound(labels: np.ndarray, num_classes: int, n: float) -> float:
  """Upper bound on the expected TV of n samples drawn IID from the global distribution:
  E|q_c - g_c| <= sqrt(Var q_c) = sqrt(g_c (1 - g_c) / n) by Jensen, so
  E TV <= 0.5 * sum_c sqrt(g_c (1 - g_c) / n)."""
  glob = np.bincount(labels, minlength=num_classes) / len(labels)
  return float(0.5 * np.sqrt(glob * (1 - glob) / n).sum())


# ---------------------------------------------------------------------------- partition


@_FAST
@given(m=st.integers(1, 300), nodes=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_iid_covers_every_sample_once(m, nodes, seed):
  nodes = min(nodes, m)
  part = P.iid(m, nodes, seed)
  _check_exact_cover(part, m)
  sizes = np.asarray(part.sizes)
  assert sizes.max() - sizes.min() <= 1


@_FAST
@given(m=st.integers(1, 300), nodes=st.integers(1, 30), classes=st.integers(1, 10),
       alpha=st.floats(0.01, 100.0), seed=st.integers(0, 2**16))
def test_dirichlet_covers_every_sample_once(m, nodes, classes, alpha, seed):
  nodes = min(nodes, m)
  labels = np.random.default_rng(seed).integers(0, classes, m)
  # min_size=0 never retries, so every draw is checked, empty nodes included.
  _check_exact_cover(P.dirichlet(labels, nodes, alpha, seed, min_size=0), m)


@_FAST
@given(m=st.integers(2, 300), nodes=st.integers(1, 30), spn=st.integers(1, 4),
       classes=st.integers(1, 10), seed=st.integers(0, 2**16))
def test_shards_cover_every_sample_once(m, nodes, spn, classes, seed):
  spn = min(spn, m)
  nodes = max(1, min(nodes, m // spn))
  labels = np.random.default_rng(seed).integers(0, classes, m)
  part = P.shards(labels, nodes, spn, seed)
  _check_exact_cover(part, m)
  # Node classes beyond its shard count come only from shards straddling one of
  # the (classes - 1) label boundaries of the sorted order.
  seen = (P.label_histogram(part, labels, classes) > 0).sum(1)  # [N]
  assert np.maximum(seen - spn, 0).sum() <= len(np.unique(labels)) - 1


@_FAST
@given(m=st.integers(1, 300), groups=st.integers(1, 50), nodes=st.integers(1, 50),
       seed=st.integers(0, 2**16))
def test_natural_keeps_each_group_on_one_node(m, groups, nodes, seed):
  g = np.random.default_rng(seed).integers(0, groups, m) * 7 + 3  # arbitrary ids
  nodes = min(nodes, len(np.unique(g)))
  part = P.natural(g, nodes)
  _check_exact_cover(part, m)
  owner = np.empty(m, np.int64)
  for n, row in enumerate(P.to_lists(part)):
    owner[row] = n
  for gid in np.unique(g):
    assert len(np.unique(owner[g == gid])) == 1


def test_from_lists_pads_with_first_index_or_zero():
  part = P.from_lists([np.array([5, 2]), np.array([], np.int64), np.array([7, 1, 4])])
  np.testing.assert_array_equal(part.idx, [[5, 2, 5], [0, 0, 0], [7, 1, 4]])
  np.testing.assert_array_equal(part.sizes, [2, 0, 3])


def test_dirichlet_skew_grows_as_alpha_shrinks():
  # 10 balanced classes, 10 nodes of ~500 samples. Statistic: mean over nodes of
  # the total-variation distance between a node's label distribution and the
  # global one (0: same mix as the whole data; 1 - k/C: a node holding only k of
  # C balanced classes).
  c, nodes = 10, 10
  labels = np.repeat(np.arange(c), 500)
  m = len(labels)
  skewed = _mean_tv(P.label_histogram(P.make_partition(
      'dirichlet', labels, nodes, seed=0, alpha=0.1), labels, c), labels, c)
  near_iid = _mean_tv(P.label_histogram(P.make_partition(
      'dirichlet', labels, nodes, seed=0, alpha=1000.0), labels, c), labels, c)
  # alpha = 1000: proportions are within ~3% of 1/N, so the split must be at least
  # as close to the global mix as a truly random sample of a node's size
  # (bound ~0.054 here; observed ~0.011).
  assert near_iid < _iid_tv_bound(labels, c, m / nodes)
  # alpha = 0.1: each class lands on one or two nodes, so on average a node holds
  # fewer than half the classes (TV > 0.5; observed ~0.7).
  assert skewed > 0.5


def test_dirichlet_min_size_and_impossible_requests():
  labels = np.random.default_rng(0).integers(0, 10, 2000)
  sizes = np.asarray(P.dirichlet(labels, 20, 0.5, 0, min_size=30).sizes)
  assert sizes.min() >= 30
  with pytest.raises(S.DataError, match='larger alpha'):
    P.dirichlet(labels[:10], 10, 0.5, 0, min_size=2)  # 10 samples cannot give 10 nodes 2 each


def test_shards_pathological_split():
  # Balanced classes whose size is a multiple of the shard size: no shard straddles
  # a class boundary, so each node sees at most shards_per_node classes.
  labels = np.repeat(np.arange(10), 100)
  part = P.make_partition('shards', labels, 10, seed=1, shards_per_node=2)
  seen = (P.label_histogram(part, labels, 10) > 0).sum(1)
  assert seen.max() <= 2 and seen.min() >= 1
  np.testing.assert_array_equal(part.sizes, 100)


def test_label_histogram_counts_only_real_entries():
  labels = np.array([0, 1, 1, 2, 2, 2])
  part = P.from_lists([np.array([0, 3]), np.array([1, 2, 4, 5])])
  np.testing.assert_array_equal(P.label_histogram(part, labels, 3), [[1, 0, 1], [0, 2, 2]])


def test_make_partition_rejects_bad_requests():
  labels = np.zeros(5, np.int32)
  with pytest.raises(S.DataError, match='iid, dirichlet, shards, natural'):
    P.make_partition('bogus', labels, 2, seed=0)
  with pytest.raises(S.DataError, match='alpha'):
    P.make_partition('dirichlet', labels, 2, seed=0, alpha=0.0)
  with pytest.raises(S.DataError, match='6 nodes'):
    P.make_partition('iid', labels, 6, seed=0)
  with pytest.raises(S.DataError, match='groups'):
    P.make_partition('natural', labels, 2, seed=0)
  with pytest.raises(S.DataError, match='2 groups'):
    P.make_partition('natural', labels, 3, seed=0, groups=np.array([0, 0, 1, 1, 1]))


def test_make_partition_is_deterministic_in_seed():
  labels = np.random.default_rng(0).integers(0, 10, 500)
  for name in ('iid', 'dirichlet', 'shards'):
    a, b, c = (P.make_partition(name, labels, 7, seed=s) for s in (3, 3, 4))
    np.testing.assert_array_equal(a.idx, b.idx)
    assert not np.array_equal(a.idx, c.idx)


# ------------------------------------------------------------------------------ sources


def test_mnist1d_shapes_determinism_and_cache(tmp_path, monkeypatch):
  ds = S.load_dataset('mnist1d', num_samples=1000, seed=3, cache_dir=tmp_path)
  assert ds.x_train.shape == (800, 40, 1) and ds.x_test.shape == (200, 40, 1)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  assert ds.y_test.dtype == np.int32 and ds.num_classes == 10 and ds.groups is None
  assert set(np.unique(ds.y_train)) <= set(range(10))
  assert set(np.unique(ds.y_train)) == set(range(10))
  assert S.mnist1d_cache_path(1000, 3, tmp_path).is_file()
  assert not list(tmp_path.glob('*.tmp'))  # the atomic write left no temporary file

  # The second load must come from the cache: generation is disabled.
  def no_generation(*args):
    raise AssertionError(f'regenerated {args} instead of reading the cache')
  monkeypatch.setattr(S, '_generate_mnist1d', no_generation)
  again = S.load_dataset('mnist1d', num_samples=1000, seed=3, cache_dir=tmp_path)
  for field in ('x_train', 'y_train', 'x_test', 'y_test'):
    np.testing.assert_array_equal(getattr(ds, field), getattr(again, field))


def test_mnist1d_deterministic_in_seed_and_keeps_global_rng(tmp_path):
  np.random.seed(123)
  before = np.random.get_state()[1].copy()
  a = S.load_dataset('mnist1d', num_samples=200, seed=1, cache_dir=tmp_path / 'a')
  np.testing.assert_array_equal(np.random.get_state()[1], before)  # mnist1d seeds globally
  b = S.load_dataset('mnist1d', num_samples=200, seed=1, cache_dir=tmp_path / 'b')
  c = S.load_dataset('mnist1d', num_samples=200, seed=2, cache_dir=tmp_path / 'c')
  np.testing.assert_array_equal(a.x_train, b.x_train)
  np.testing.assert_array_equal(a.y_train, b.y_train)
  assert not np.array_equal(a.x_train, c.x_train)


def test_mnist1d_ignores_a_corrupt_cache(tmp_path):
  path = S.mnist1d_cache_path(100, 0, tmp_path)
  path.write_bytes(b'not a zip file')
  ds = S.load_dataset('mnist1d', num_samples=100, seed=0, cache_dir=tmp_path)
  assert ds.x_train.shape == (80, 40, 1)
  with np.load(path) as f:  # rewritten whole
    np.testing.assert_array_equal(f['y_train'], ds.y_train)


def test_synthetic_users_are_non_iid_and_deterministic():
  ds = S.load_dataset('synthetic', nodes=50, num_samples=5000, seed=0)
  m = len(ds.y_train)
  assert ds.x_train.shape == (m, 60) and ds.x_train.dtype == np.float32
  assert ds.y_train.dtype == np.int32 and ds.num_classes == 10
  assert ds.groups is not None and ds.groups.dtype == np.int32 and len(ds.groups) == m
  np.testing.assert_array_equal(np.unique(ds.groups), np.arange(50))
  assert m + len(ds.y_test) == 5000 and abs(len(ds.y_test) / 5000 - 0.2) < 0.02
  assert ds.y_train.min() >= 0 and ds.y_train.max() < 10

  again = S.load_dataset('synthetic', nodes=50, num_samples=5000, seed=0)
  np.testing.assert_array_equal(ds.x_train, again.x_train)
  np.testing.assert_array_equal(ds.y_train, again.y_train)
  np.testing.assert_array_equal(ds.groups, again.groups)
  other = S.load_dataset('synthetic', nodes=50, num_samples=5000, seed=1)
  assert not np.array_equal(ds.y_train[:100], other.y_train[:100])

  # Non-IID: users with >= 50 samples are further from the global label mix than
  # twice the sampling-noise bound for 50 IID samples.
  hist = np.zeros((50, 10), np.int64)
  np.add.at(hist, (ds.groups, ds.y_train), 1)
  big = hist.sum(1) >= 50
  assert big.sum() >= 5
  assert _mean_tv(hist[big], ds.y_train, 10) > 2 * _iid_tv_bound(ds.y_train, 10, 50)

  # The natural partition of synthetic puts each user on one node.
  part = P.make_partition('natural', ds.y_train, 50, seed=0, groups=ds.groups)
  for n, row in enumerate(P.to_lists(part)):
    np.testing.assert_array_equal(ds.groups[row], n)


def test_load_dataset_rejects_bad_requests():
  with pytest.raises(S.DataError, match='mnist1d, synthetic, text, mnist'):
    S.load_dataset('imagenet')
  with pytest.raises(S.DataError, match='nodes'):
    S.load_dataset('synthetic')
  with pytest.raises(S.DataError, match='num_samples'):
    S.load_dataset('synthetic', nodes=100, num_samples=500)


@pytest.fixture
def no_network(monkeypatch):
  """Any connection attempt fails at once instead of waiting on a timeout."""
  def refuse(*args, **kwargs):
    raise AssertionError(f'network access attempted: {args}')
  monkeypatch.setattr(socket.socket, 'connect', refuse)
  monkeypatch.setattr(socket, 'getaddrinfo', refuse)
  monkeypatch.setattr(socket, 'create_connection', refuse)


@pytest.mark.parametrize('name,tfds_name', [('mnist', 'mnist'), ('emnist', 'emnist/balanced')])
def test_missing_tfds_dataset_names_dataset_and_dir(tmp_path, no_network, name, tfds_name):
  with pytest.raises(S.DataError) as err:
    S.load_dataset(name, data_dir=tmp_path)
  msg = str(err.value)
  assert '\n' not in msg
  assert repr(name) in msg and tfds_name in msg and str(tmp_path) in msg
  assert 'tfds build' in msg


def test_tfds_records_become_scaled_float_arrays(tmp_path, no_network):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=30):  # random records, no files needed
    mnist = S.load_dataset('mnist', data_dir=tmp_path, num_samples=10, seed=0)
    cifar = S.load_dataset('cifar10', data_dir=tmp_path, num_samples=0)
    emnist = S.load_dataset('emnist', data_dir=tmp_path, num_samples=10)
  assert mnist.x_train.shape == (10, 28, 28, 1) and mnist.x_test.shape == (30, 28, 28, 1)
  assert cifar.x_train.shape == (30, 32, 32, 3)
  assert emnist.num_classes == 47 and mnist.num_classes == 10
  for ds in (mnist, cifar, emnist):
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
