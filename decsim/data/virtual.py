"""Clients without a table: client c's samples are a function of (seed, c), made on demand.

A table partition (``decsim.data.partition``) stores every client's sample ids in an
``[N, L]`` array; at millions of clients that array, and LEAF's host-side generation of
every user's data up front, are what no longer fits. Here nothing of size N x L exists:
a client's data is drawn from its own key, ``fold_in(data key, c)``, inside the jitted
round, and only for the samples a minibatch reads (``Samples.__getitem__``). The one
per-client array is the data sizes ``sizes [N] int32`` (4 bytes a client), which FedAvg
weights by.

Two kinds (``--client_data=generated``):

* ``--dataset=synthetic``: LEAF's Synthetic(alpha, beta) (Caldas et al. 2018,
  arXiv:1812.01097, after FedProx, Li et al. 2020, ``generate_synthetic``) generated on
  the device: client c draws u_c ~ N(0, alpha^2), B_c ~ N(0, beta^2), W_c [60, 10] ~
  N(u_c, 1), b_c [10] ~ N(u_c, 1), v_c [60] ~ N(B_c, 1); its sample j is x ~ N(v_c, Sigma),
  Sigma = diag(k^-1.2), and y = argmax(x W_c + b_c), each from ``fold_in(key_c, j)``. The
  test set is a fresh draw of ``0.2 * --num_samples`` samples from clients picked in
  proportion to their sizes (LEAF pools 20% of every user's samples), at positions no
  client trains on.
* any other ``--dataset`` (the base): "virtual clients". Client c's label mix is p_c ~
  Dirichlet(alpha) over the classes (``--alpha``, the label skew of the Dirichlet
  partition); its sample j draws a label from p_c and then a uniform train sample of that
  label, both from ``fold_in(key_c, j)`` (counter-based; clients share base samples, as
  with replacement). The test set is the base test split.

Client sizes are lognormal as in LEAF (``--client_size_mu``, ``--client_size_sigma``; LEAF's
are 4 and 2), rounded down and clipped to [``--client_size_min``, ``--client_size_max``];
sigma 0 gives every client ``exp(mu)`` samples. A client's minibatches walk a random
permutation of its positions 0..n_c-1 exactly as a table client walks its row
(``decsim.data.sampler``), so one local epoch reads each of its samples once.

Deviations from LEAF's generator: sizes are not rescaled to a total (there is no total
at a million clients; ``--num_samples`` only sizes the synthetic test set), and each
client's samples are re-generated from its key whenever it trains (the same values every
time), never stored.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from decsim.config import Component, check, option
from decsim.data.sources import SYNTHETIC_CLASSES, SYNTHETIC_DIM, SYNTHETIC_TEST_FRACTION
from decsim.types import PRNGKey

CLIENT_DATA = ('auto', 'table', 'generated')
TABLE_MAX_NODES = 10_000  # --client_data=auto: a table up to here, generated beyond
_SIZE, _MODEL, _SAMPLE, _TEST = 0, 1, 2, 3  # streams under a client's key
_DATA_STREAM = 0xDA7A  # the data key: fold_in(key(seed), this)


@dataclasses.dataclass(frozen=True)
class ClientDataConfig(Component):
  """Clients without a table (decsim/data/virtual.py)."""

  client_data: str = option('auto', "How clients hold data: table (a partition's [N, L] index "
                            'rows), generated (client c\'s samples made from (seed, c) inside '
                            'the round: LEAF Synthetic on the device, or virtual clients over '
                            f'the base dataset), auto (table up to {TABLE_MAX_NODES:,} nodes).',
                            choices=CLIENT_DATA)
  client_size_mu: float = option(4.0, '--client_data=generated: client sizes are '
                                 'lognormal(mu, sigma) (LEAF: 4, 2).', low=0, high=20)
  client_size_sigma: float = option(2.0, '--client_data=generated: sigma of the lognormal '
                                    'sizes (0: every client exp(mu)).', low=0, high=10)
  client_size_min: int = option(10, '--client_data=generated: fewest samples a client holds.',
                                low=1, high=1_000_000)
  client_size_max: int = option(2981, '--client_data=generated: most samples a client holds '
                                '(LEAF caps at e^8 = 2981).', low=1, high=1_000_000)

  def check(self):
    check(self.client_size_min <= self.client_size_max,
          f'--client_size_min={self.client_size_min} exceeds --client_size_max='
          f'{self.client_size_max}: lower --client_size_min or raise --client_size_max')


def generated(c) -> bool:
  """Whether the run of experiment config ``c`` uses generated clients."""
  return c.client_data == 'generated' or (c.client_data == 'auto' and c.nodes > TABLE_MAX_NODES)


def validate(c) -> None:
  """The checks of generated clients against the rest of an experiment config."""
  if not generated(c):
    return
  why = f'--client_data=generated (or auto above {TABLE_MAX_NODES:,} nodes)'
  check(c.local_test_fraction == 0, f'--local_test_fraction={c.local_test_fraction} needs '
        f'clients with a table; {why} has none: drop --local_test_fraction or use '
        '--client_data=table')
  check(c.devices == 1, f'--devices={c.devices}: {why} runs on one device; use --devices=1 or '
        '--client_data=table')


# ------------------------------------------------------------------------- the data


@struct.dataclass
class Samples:
  """One client's samples by position, made on demand: ``samples[ids]`` is ``[B, ...]``.

  ``local.make_local_update`` indexes its ``x`` and ``y`` so; features and labels are two
  such views of the same client (``labels`` selects which half is returned).
  """

  data: 'VirtualData'
  client: dict  # the client's own draws (vmapped over clients)
  labels: bool = struct.field(pytree_node=False, default=False)

  def __getitem__(self, ids: jax.Array) -> jax.Array:
    x, y = self.data.samples(self.client, ids)
    return y if self.labels else x


@struct.dataclass
class VirtualData:
  """Clients whose samples are functions of (key, client); passed to ``round`` like
  ``NodeData``. ``base_x``/``base_y``/``by_class`` are the base dataset of virtual clients
  (empty for synthetic)."""

  key: PRNGKey  # [] the data key
  sizes: jax.Array  # [N] int32 samples of each client
  base_x: jax.Array  # [M, ...] base train features (virtual), [0, D] (synthetic)
  base_y: jax.Array  # [M] int32
  by_class: jax.Array  # [M] int32 base sample ids sorted by label
  class_start: jax.Array  # [C] int32 first position of each label in by_class
  class_count: jax.Array  # [C] int32 samples of each label
  kind: str = struct.field(pytree_node=False, default='synthetic')  # or 'virtual'
  max_size: int = struct.field(pytree_node=False, default=1)  # L: the longest client
  alpha: jax.Array = 1.0  # [] synthetic alpha, or the label mixes' Dirichlet concentration
  beta: jax.Array = 1.0  # [] synthetic beta

  @property
  def num_nodes(self) -> int:
    return self.sizes.shape[0]

  def client_rows(self, rows: jax.Array) -> tuple[jax.Array, jax.Array, dict]:
    """Positions ``[s, L]`` (0..L-1 for every client), sizes ``[s]`` and the clients' draws."""
    idx = jnp.broadcast_to(jnp.arange(self.max_size, dtype=jnp.int32), (rows.shape[0],
                                                                         self.max_size))
    return idx, self.sizes[rows], jax.vmap(self.client)(rows)

  def views(self, client: dict) -> tuple[Samples, Samples]:
    """(features, labels) of one client, indexable by position."""
    return Samples(self, client), Samples(self, client, labels=True)

  def client(self, c: jax.Array) -> dict:
    """Client ``c``'s own draws: its key, and its Synthetic model or label mix."""
    key = jax.random.fold_in(self.key, c)
    if self.kind == 'synthetic':
      return {'key': key, **synthetic_client(jax.random.fold_in(key, _MODEL), self.alpha,
                                             self.beta)}
    return {'key': key, 'mix': label_mix(jax.random.fold_in(key, _MODEL), self.alpha,
                                         self.class_count)}

  def samples(self, client: dict, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Features ``[B, ...]`` and labels ``[B]`` of the client's samples at ``positions [B]``."""
    keys = jax.vmap(lambda j: jax.random.fold_in(jax.random.fold_in(client['key'], _SAMPLE),
                                                 j))(positions)  # [B]
    if self.kind == 'synthetic':
      return synthetic_samples(client, keys)
    ids = jax.vmap(lambda k: virtual_sample(k, client['mix'], self.by_class, self.class_start,
                                            self.class_count))(keys)  # [B]
    return self.base_x[ids], self.base_y[ids]


def synthetic_client(key: PRNGKey, alpha: float, beta: float) -> dict:
  """One Synthetic(alpha, beta) user: its softmax model ``w [D, C]``, ``b [C]`` and feature
  mean ``v [D]``."""
  d, c = SYNTHETIC_DIM, SYNTHETIC_CLASSES
  # One flat draw, sliced: a vmapped [D, C]-shaped normal took XLA 6x longer to compile.
  z = jax.random.normal(key, (2 + d * c + c + d,))  # [2 + DC + C + D]
  u, b_mean = alpha * z[0], beta * z[1]
  return {'w': u + z[2:2 + d * c].reshape(d, c),  # [D, C]
          'b': u + z[2 + d * c:2 + d * c + c],  # [C]
          'v': b_mean + z[2 + d * c + c:]}  # [D]


def synthetic_samples(client: dict, keys: PRNGKey) -> tuple[jax.Array, jax.Array]:
  """x ~ N(v, diag(k^-1.2)) and y = argmax(x w + b), one per key ``[B]``."""
  std = jnp.arange(1, SYNTHETIC_DIM + 1, dtype=jnp.float32) ** -0.6  # [D]
  noise = jax.vmap(lambda k: jax.random.normal(k, (SYNTHETIC_DIM,)))(keys)  # [B, D]
  x = client['v'] + std * noise  # [B, D]
  y = jnp.argmax(x @ client['w'] + client['b'], axis=-1).astype(jnp.int32)  # [B]
  return x, y


def label_mix(key: PRNGKey, alpha: float, class_count: jax.Array) -> jax.Array:
  """A virtual client's label proportions ``[C]`` ~ Dirichlet(alpha), over labels that exist."""
  mix = jax.random.dirichlet(key, jnp.full(class_count.shape, alpha, jnp.float32))  # [C]
  mix = jnp.where(class_count > 0, mix, 0.0)
  # A draw whose mass all fell on absent labels (tiny alpha) falls back to uniform.
  return jnp.where(jnp.sum(mix) > 0, mix, (class_count > 0).astype(jnp.float32))


def virtual_sample(key: PRNGKey, mix: jax.Array, by_class: jax.Array, class_start: jax.Array,
                   class_count: jax.Array) -> jax.Array:
  """A base sample id: a label from ``mix [C]``, then a uniform sample of that label."""
  k_label, k_pick = jax.random.split(key)
  label = jax.random.categorical(k_label, jnp.log(mix))
  pick = jax.random.randint(k_pick, (), 0, jnp.maximum(class_count[label], 1))
  return by_class[class_start[label] + pick]


def client_sizes(key: PRNGKey, clients: jax.Array, mu: float, sigma: float, low: int,
                 high: int) -> jax.Array:
  """Samples of each client ``[n] int32``: floor(lognormal(mu, sigma)) clipped to [low, high],
  from ``fold_in(key, c)`` (a client's size does not depend on N)."""
  def one(c):
    z = jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, c), _SIZE))
    return jnp.clip(jnp.floor(jnp.exp(mu + sigma * z)), low, high).astype(jnp.int32)

  return jax.vmap(one)(clients)


# ------------------------------------------------------------------------ building


def data_key(seed: int) -> PRNGKey:
  return jax.random.fold_in(jax.random.key(seed), _DATA_STREAM)


def make_sizes(key: PRNGKey, nodes: int, c) -> jax.Array:
  """Every client's size ``[N]``, computed in chunks of a million clients."""
  sizes = jax.jit(lambda ids: client_sizes(key, ids, c.client_size_mu, c.client_size_sigma,
                                           c.client_size_min, c.client_size_max))
  chunk = 1 << 20
  parts = [sizes(jnp.arange(start, min(start + chunk, nodes), dtype=jnp.int32))
           for start in range(0, nodes, chunk)]
  return jnp.concatenate(parts)


def synthetic_data(seed: int, nodes: int, c, alpha: float = 1.0, beta: float = 1.0
                   ) -> VirtualData:
  """Synthetic(alpha, beta) with ``nodes`` generated clients; ``c`` holds the size options
  (a ``ClientDataConfig``)."""
  key = data_key(seed)
  empty = jnp.zeros((0,), jnp.int32)
  return VirtualData(key=key, sizes=make_sizes(key, nodes, c),
                     base_x=jnp.zeros((0, SYNTHETIC_DIM), jnp.float32), base_y=empty,
                     by_class=empty, class_start=jnp.zeros((SYNTHETIC_CLASSES,), jnp.int32),
                     class_count=jnp.zeros((SYNTHETIC_CLASSES,), jnp.int32),
                     kind='synthetic', max_size=c.client_size_max,
                     alpha=jnp.float32(alpha), beta=jnp.float32(beta))


def virtual_data(seed: int, nodes: int, c, x: np.ndarray, y: np.ndarray, num_classes: int,
                 alpha: float) -> VirtualData:
  """Virtual clients over the base train set ``x [M, ...]``, ``y [M]``, label mixes ~
  Dirichlet(alpha); ``c`` holds the size options (a ``ClientDataConfig``)."""
  key = data_key(seed)
  y = np.asarray(y, np.int32)
  count = np.bincount(y, minlength=num_classes).astype(np.int32)  # [C]
  start = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int32)  # [C]
  return VirtualData(key=key, sizes=make_sizes(key, nodes, c), base_x=jnp.asarray(x),
                     base_y=jnp.asarray(y),
                     by_class=jnp.asarray(np.argsort(y, kind='stable').astype(np.int32)),
                     class_start=jnp.asarray(start), class_count=jnp.asarray(count),
                     kind='virtual', max_size=c.client_size_max, alpha=jnp.float32(alpha),
                     beta=jnp.float32(1.0))


def synthetic_test_set(data: VirtualData, seed: int, count: int) -> tuple[np.ndarray, np.ndarray]:
  """``count`` test samples: clients drawn in proportion to their sizes, each sample at a
  position past every client's training positions (``max_size`` and on)."""
  sizes = np.asarray(data.sizes, np.int64)
  rng = np.random.default_rng([seed, _TEST])
  clients = np.searchsorted(np.cumsum(sizes), rng.integers(0, sizes.sum(), count),
                            side='right').astype(np.int32)  # [T]
  positions = data.max_size + np.arange(count, dtype=np.int32)  # [T], never trained on

  @jax.jit
  def draw(data, clients, positions):  # data an argument: no [N] constant to compile
    one = lambda c, j: jax.tree.map(lambda a: a[0], data.samples(data.client(c), j[None]))
    return jax.vmap(one)(clients, positions)

  x, y = draw(data, jnp.asarray(clients), jnp.asarray(positions))
  return np.asarray(x), np.asarray(y)


def synthetic_test_size(num_samples: int) -> int:
  return max(1, math.ceil(SYNTHETIC_TEST_FRACTION * num_samples))


def load(c, seed: int, dataset=None):
  """``(ArrayDataset, VirtualData)`` of experiment config ``c``: the dataset holds the test
  set, the class count and the input shape (no train samples for synthetic: they are made
  in the round); ``dataset`` (your arrays) replaces the base of virtual clients."""
  from decsim.data import sources  # pylint: disable=g-import-not-at-top
  if dataset is None and c.dataset == 'synthetic':
    data = synthetic_data(seed, c.nodes, c)
    x_test, y_test = synthetic_test_set(data, seed, synthetic_test_size(c.num_samples))
    empty = np.zeros((0, SYNTHETIC_DIM), np.float32)
    return sources.ArrayDataset('synthetic', empty, np.zeros((0,), np.int32), x_test, y_test,
                                SYNTHETIC_CLASSES), data
  if dataset is None:
    dataset = sources.load_dataset(c.dataset, data_dir=c.data_dir, num_samples=c.num_samples,
                                   seed=seed, nodes=c.nodes)
  return dataset, virtual_data(seed, c.nodes, c, dataset.x_train, dataset.y_train,
                               dataset.num_classes, c.alpha)
