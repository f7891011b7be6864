"""Datasets as host numpy arrays: an offline default, a federated synthetic task, TFDS.

* ``mnist1d`` (the default) is MNIST-1D (Greydanus, 2020, "Scaling down deep
  learning", arXiv:2011.14439): 1-D signals of length 40, ten classes, generated
  locally by the ``mnist1d`` package, so it needs no network and no disk.
* ``synthetic`` is Synthetic(alpha, beta) from FedProx (Li et al., 2020,
  "Federated Optimization in Heterogeneous Networks", MLSys), as packaged by LEAF
  (Caldas et al., 2018, arXiv:1812.01097), after Shamir et al. (2014): every user
  has its own softmax-regression model and feature distribution, so the data is
  non-IID by construction and ``groups`` holds the user of every sample.
* ``mnist``, ``fashion_mnist``, ``cifar10`` and ``emnist`` (``emnist/balanced``)
  are read through ``tfds.data_source``, which needs array_record files prepared
  beforehand but no TensorFlow. Nothing here ever downloads.

Feature arrays are float32 with a trailing channel axis for images and signals
(``[M, 28, 28, 1]``, ``[M, 40, 1]``, ``[M, 32, 32, 3]``) and plain vectors for
``synthetic`` (``[M, 60]``); ``text`` (``decsim/data/text.py``, generated lines of
many roles) holds int32 character ids ``[M, 40]``; labels are int32 ``[M]``.
"""

import dataclasses
import logging
import os
import pathlib
import random
import tempfile
import zipfile

import numpy as np
from decsim.errors import ConfigError

DATASETS = ('mnist1d', 'synthetic', 'text', 'mnist', 'fashion_mnist', 'cifar10', 'emnist')

# decsim name -> TFDS name.
_TFDS_NAMES = {
    'mnist': 'mnist',
    'fashion_mnist': 'fashion_mnist',
    'cifar10': 'cifar10',
    'emnist': 'emnist/balanced',
}

_MNIST1D_DEFAULT_SAMPLES = 5_000  # the size of the published MNIST-1D dataset
_SYNTHETIC_DEFAULT_SAMPLES = 10_000
SYNTHETIC_DIM = 60
SYNTHETIC_CLASSES = 10
_SYNTHETIC_MIN_PER_USER = 10  # leaves >= 2 test samples per user after the 20% hold-out
SYNTHETIC_TEST_FRACTION = 0.2


class DataError(ConfigError):
  """A dataset or partition request that cannot be met; the message says how to fix it."""


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
  """A train/test split held in host memory.

  ``eq=False``: element-wise ``==`` on arrays has no single truth value, so
  instances compare by identity.
  """

  name: str
  x_train: np.ndarray  # [M, ...] float32
  y_train: np.ndarray  # [M] int32
  x_test: np.ndarray  # [T, ...] float32
  y_test: np.ndarray  # [T] int32
  num_classes: int
  groups: np.ndarray | None = None  # [M] int32, the writer/user of each train sample

  def __post_init__(self):
    if len(self.x_train) != len(self.y_train) or len(self.x_test) != len(self.y_test):
      raise DataError(
          f'{self.name}: features and labels differ in length '
          f'(train {len(self.x_train)} vs {len(self.y_train)}, '
          f'test {len(self.x_test)} vs {len(self.y_test)}); build them from the same samples')
    if self.groups is not None and len(self.groups) != len(self.y_train):
      raise DataError(
          f'{self.name}: groups has {len(self.groups)} entries for {len(self.y_train)} train '
          'samples; give one group id per train sample or groups=None')

  @property
  def input_shape(self) -> tuple[int, ...]:
    """Shape of one sample's features, e.g. ``(28, 28, 1)``."""
    return tuple(self.x_train.shape[1:])


def load_dataset(
    name: str = 'mnist1d',
    *,
    data_dir: str | os.PathLike | None = None,
    num_samples: int | None = 10_000,
    seed: int = 0,
    nodes: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    synthetic_alpha: float = 1.0,
    synthetic_beta: float = 1.0,
) -> ArrayDataset:
  """Loads dataset ``name`` (one of ``DATASETS``) as host numpy arrays.

  Args:
    name: ``mnist1d`` | ``synthetic`` | ``text`` | ``mnist`` | ``fashion_mnist`` | ``cifar10``
      | ``emnist``.
    data_dir: TFDS data directory holding the prepared real datasets (default:
      TFDS's own, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    num_samples: for the generated datasets (``mnist1d``, ``synthetic``) the
      number of samples generated, train and test together (80/20); for the real
      ones the size of a random subset of the train split (the test split is kept
      whole). ``0`` or ``None``: the whole real dataset, or the generators'
      standard sizes (5,000 for ``mnist1d``, 10,000 for ``synthetic``).
    seed: fixes generation and subsampling; the same seed gives the same arrays.
    nodes: number of users of ``synthetic`` (required there) and of roles of ``text``
      (default 100); unused elsewhere.
    cache_dir: where ``mnist1d`` is cached (default ``$DECSIM_CACHE`` or
      ``~/.cache/decsim``).
    synthetic_alpha: how much the users' models differ (Synthetic(alpha, beta)).
    synthetic_beta: how much the users' feature distributions differ.

  Raises:
    DataError: unknown name, bad arguments, or a real dataset not prepared.
  """
  if num_samples is not None and num_samples < 0:
    raise DataError(f'num_samples must be >= 0 (0 or None: all/standard size), got {num_samples}')
  if name == 'mnist1d':
    return _mnist1d(num_samples or _MNIST1D_DEFAULT_SAMPLES, seed, cache_dir)
  if name == 'synthetic':
    return _synthetic(num_samples or _SYNTHETIC_DEFAULT_SAMPLES, nodes, seed,
                      synthetic_alpha, synthetic_beta)
  if name == 'text':  # generated lines of many roles, character ids (decsim/data/text.py)
    from decsim.data import text  # pylint: disable=g-import-not-at-top  # imports this module
    return text.load_text(num_samples, nodes, seed)
  if name in _TFDS_NAMES:
    return _tfds(name, data_dir, num_samples, seed)
  raise DataError(f'unknown dataset {name!r}; choose one of {", ".join(DATASETS)}')


# ----------------------------------------------------------------------------- MNIST-1D


def default_cache_dir() -> pathlib.Path:
  """``$DECSIM_CACHE`` if set, else ``~/.cache/decsim``."""
  env = os.environ.get('DECSIM_CACHE')
  return pathlib.Path(env) if env else pathlib.Path.home() / '.cache' / 'decsim'


def mnist1d_cache_path(num_samples: int, seed: int, cache_dir=None) -> pathlib.Path:
  """Where ``load_dataset('mnist1d', num_samples=..., seed=...)`` caches its arrays."""
  root = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
  return root / f'mnist1d_v1_n{num_samples}_seed{seed}.npz'


def _mnist1d(num_samples: int, seed: int, cache_dir) -> ArrayDataset:
  path = mnist1d_cache_path(num_samples, seed, cache_dir)
  arrays = _read_npz(path)
  if arrays is None:
    arrays = _generate_mnist1d(num_samples, seed)
    _write_npz_atomic(path, arrays)
  return ArrayDataset(name='mnist1d', num_classes=10, groups=None, **arrays)


def _generate_mnist1d(num_samples: int, seed: int) -> dict[str, np.ndarray]:
  """Runs the MNIST-1D generator: about 2.3 s for 10,000 samples (0.23 s for 1,000)
  on one CPU core, hence the cache.

  ``make_dataset`` draws ``num_samples // 10`` signals per class, shuffles them
  and keeps the first 80% for training. It seeds Python's and numpy's *global*
  generators, so their states are saved and restored around it. Only
  ``get_dataset_args``/``make_dataset`` are used: ``get_dataset`` downloads.
  """
  from mnist1d import data as mnist1d_data  # pylint: disable=g-import-not-at-top

  args = mnist1d_data.get_dataset_args()
  args.num_samples = int(num_samples)
  args.seed = int(seed)
  np_state, py_state = np.random.get_state(), random.getstate()
  try:
    raw = mnist1d_data.make_dataset(args)
  finally:
    np.random.set_state(np_state)
    random.setstate(py_state)
  return {
      'x_train': np.asarray(raw['x'], np.float32)[..., None],  # [M, 40, 1]
      'y_train': np.asarray(raw['y'], np.int32),  # [M]
      'x_test': np.asarray(raw['x_test'], np.float32)[..., None],  # [T, 40, 1]
      'y_test': np.asarray(raw['y_test'], np.int32),  # [T]
  }


_NPZ_KEYS = ('x_train', 'y_train', 'x_test', 'y_test')


def _read_npz(path: pathlib.Path) -> dict[str, np.ndarray] | None:
  """The cached arrays, or None when the file is missing or unreadable."""
  if not path.is_file():
    return None
  try:
    with np.load(path) as f:
      return {k: f[k] for k in _NPZ_KEYS}
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    logging.warning('decsim: ignoring unreadable cache %s (%s); regenerating', path, e)
    return None


def _write_npz_atomic(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
  """Writes to a temporary file in the same directory, then renames it into place,
  so concurrent readers see either no file or a whole one. A cache that cannot be
  written is not an error: the data was generated and is returned anyway."""
  tmp = None
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix='.tmp',
                                     delete=False) as f:
      tmp = f.name
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except OSError as e:
    logging.warning('decsim: could not write cache %s (%s)', path, e)
    if tmp is not None and os.path.exists(tmp):
      os.remove(tmp)


# ---------------------------------------------------------------------------- synthetic


def _synthetic(num_samples: int, nodes: int | None, seed: int, alpha: float,
               beta: float) -> ArrayDataset:
  """Synthetic(alpha, beta), as generated by FedProx's ``generate_synthetic``.

  For user k: u_k ~ N(0, alpha^2), B_k ~ N(0, beta^2); W_k [60, 10] ~ N(u_k, 1),
  b_k [10] ~ N(u_k, 1); feature mean v_k [60] ~ N(B_k, 1); x ~ N(v_k, Sigma)
  with Sigma = diag(j^-1.2), j = 1..60; y = argmax(softmax(x W_k + b_k)).
  Differences from FedProx: user sizes are lognormal(4, 2) as there, but
  capped at e^8 (mean + 2 sd in log space, so no single user holds most of the
  data), rescaled so that they sum to ``num_samples`` exactly, with at least 10
  per user; 20% of every user's samples form the test set.
  """
  if nodes is None or nodes < 1:
    raise DataError(
        f'synthetic needs the number of users: pass load_dataset("synthetic", nodes=N) '
        f'with N >= 1 (got nodes={nodes})')
  if num_samples < _SYNTHETIC_MIN_PER_USER * nodes:
    raise DataError(
        f'synthetic with {nodes} users needs num_samples >= {_SYNTHETIC_MIN_PER_USER * nodes} '
        f'({_SYNTHETIC_MIN_PER_USER} per user), got {num_samples}; raise num_samples or '
        'lower nodes')
  if alpha < 0 or beta < 0:
    raise DataError(f'synthetic_alpha and synthetic_beta must be >= 0, got {alpha}, {beta}')
  rng = np.random.default_rng(seed)
  sizes = _lognormal_sizes(rng, nodes, num_samples)  # [K]
  d, c = SYNTHETIC_DIM, SYNTHETIC_CLASSES
  u = rng.normal(0.0, alpha, nodes)  # [K]
  b_mean = rng.normal(0.0, beta, nodes)  # [K]
  w = rng.normal(u[:, None, None], 1.0, (nodes, d, c))  # [K, D, C]
  b = rng.normal(u[:, None], 1.0, (nodes, c))  # [K, C]
  v = rng.normal(b_mean[:, None], 1.0, (nodes, d))  # [K, D]
  std = np.arange(1, d + 1, dtype=np.float64) ** -0.6  # [D], sqrt(j^-1.2)

  parts = {'x_train': [], 'y_train': [], 'x_test': [], 'y_test': [], 'groups': []}
  for k in range(nodes):  # host-side, once; K is at most a few thousand
    x = v[k] + std * rng.standard_normal((sizes[k], d))  # [n_k, D]
    y = np.argmax(x @ w[k] + b[k], axis=1)  # [n_k]; softmax is monotone
    n_test = int(sizes[k] * SYNTHETIC_TEST_FRACTION)
    n_train = sizes[k] - n_test
    parts['x_train'].append(x[:n_train])
    parts['y_train'].append(y[:n_train])
    parts['x_test'].append(x[n_train:])
    parts['y_test'].append(y[n_train:])
    parts['groups'].append(np.full(n_train, k))
  cat = {key: np.concatenate(val) for key, val in parts.items()}
  return ArrayDataset(
      name='synthetic',
      x_train=cat['x_train'].astype(np.float32),  # [M, 60]
      y_train=cat['y_train'].astype(np.int32),  # [M]
      x_test=cat['x_test'].astype(np.float32),  # [T, 60]
      y_test=cat['y_test'].astype(np.int32),  # [T]
      num_classes=c,
      groups=cat['groups'].astype(np.int32),  # [M]
  )


def _lognormal_sizes(rng: np.random.Generator, nodes: int, total: int) -> np.ndarray:
  """Per-user sample counts [K]: >= the minimum, summing to ``total`` exactly."""
  raw = np.minimum(rng.lognormal(4.0, 2.0, nodes), np.exp(4.0 + 2 * 2.0))  # [K]
  extra = total - _SYNTHETIC_MIN_PER_USER * nodes
  share = extra * raw / raw.sum()  # [K]
  sizes = np.floor(share).astype(np.int64)
  # Largest remainders get the samples lost to flooring.
  short = extra - int(sizes.sum())
  sizes[np.argsort(-(share - sizes), kind='stable')[:short]] += 1
  return sizes + _SYNTHETIC_MIN_PER_USER


# ------------------------------------------------------------------------------- TFDS


def _tfds(name: str, data_dir, num_samples: int | None, seed: int) -> ArrayDataset:
  """Reads a prepared TFDS dataset through ``tfds.data_source`` (array_record).

  ``download=False`` matters: with downloads on, an offline machine retries the
  network for minutes. On an empty data_dir, tfds 4.9.10 raises ``KeyError``
  ("splits is empty") when asked for array_record files, and
  ``NotImplementedError`` when the data is there only as TFRecord.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # slow; only here

  tfds_name = _TFDS_NAMES[name]
  data_dir = os.fspath(data_dir) if data_dir is not None else tfds.core.constants.DATA_DIR
  try:
    train, test = [
        tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False,
                         builder_kwargs={'file_format': 'array_record'})
        for split in ('train', 'test')]
  except (KeyError, AssertionError, FileNotFoundError, NotImplementedError, ValueError) as e:
    raise DataError(_not_prepared(name, tfds_name, data_dir, e)) from e

  train_idx = np.arange(len(train))
  if num_samples and num_samples < len(train):
    rng = np.random.default_rng(seed)
    train_idx = np.sort(rng.choice(len(train), num_samples, replace=False))
  x_train, y_train = _read_records(train, train_idx)
  x_test, y_test = _read_records(test, np.arange(len(test)))
  if name == 'emnist':  # TFDS stores EMNIST images transposed; make them upright
    x_train, x_test = x_train.transpose(0, 2, 1, 3), x_test.transpose(0, 2, 1, 3)
  return ArrayDataset(
      name=name,
      x_train=x_train,
      y_train=y_train,
      x_test=x_test,
      y_test=y_test,
      num_classes=int(train.dataset_info.features['label'].num_classes),
      groups=None,
  )


def _read_records(source, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Decodes records ``indices`` of a data source into ([M, H, W, C] float32 in [0, 1], [M] int32)."""
  records = [source[int(i)] for i in indices]
  images = np.stack([r['image'] for r in records])  # [M, H, W, C] uint8
  labels = np.asarray([r['label'] for r in records], np.int32)  # [M]
  return images.astype(np.float32) / 255.0, labels


def _not_prepared(name: str, tfds_name: str, data_dir: str, err: Exception) -> str:
  return (
      f'dataset {name!r} (tfds {tfds_name!r}) is not prepared in array_record format under '
      f'data_dir {data_dir!r} ({type(err).__name__}); prepare it on a machine with internet '
      f'access with `python -c "import tensorflow_datasets as tfds; '
      f"tfds.data_source('{tfds_name}', data_dir='{data_dir}', "
      f"builder_kwargs={{'file_format': 'array_record'}})\"` or `tfds build {tfds_name} "
      f'--data_dir={data_dir} --file_format=array_record`, then copy that directory here, '
      'or use name="mnist1d", which needs no files')
