"""Simulated time and message sizes: where nodes sit, how long transfers and training take.

Nodes sit on ``S`` sites, assigned round-robin (node i on site i mod S). A
transfer of B bytes from node i to node j takes

    latency[site_i, site_j] + B / min(upload_i, download_j)

and training on n samples takes ``n / speed_i``. This is the model MoDeST (de Vos
et al. 2023) evaluates on: a site-to-site latency matrix, model transfer times
and compute times. A node's concurrent transfers share its bandwidth fairly: a
node sending to k peers at once uploads to each at upload_i / k, one receiving
from m at download_j / m (``up_share``, ``down_share``), as the authors' bandwidth
scheduler does; the share is held for the whole transfer, which is exact for
equal transfers that start together (an aggregator's s uploads, a D-PSGD node's k
neighbours). A protocol's round time is the path it waits for, computed by the
protocol from these two primitives.

The default latency matrix places ``S`` sites uniformly on the globe and takes
the great-circle distance at 2/3 the speed of light with a 2x route inflation,
plus 1 ms inside a site: one-way latencies from about 1 ms to 200 ms, the spread
of intercontinental WAN paths.
"""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from decsim.config import Component, check, option
from decsim.errors import ConfigError

KINDS = ('model', 'view', 'ping')  # message kinds counted by every protocol
MODEL, VIEW, PING = range(3)
PING_BYTES = 64  # a ping or its reply: headers and two node ids
VIEW_BYTES_PER_NODE = 8  # a view entry: last-active round and membership counter (int32 each)

_EARTH_RADIUS_KM = 6371.0
_FIBRE_KM_PER_S = 200_000.0  # light in fibre, ~2/3 c
_ROUTE_INFLATION = 2.0
_SAME_SITE_S = 0.001
MAX_SITES = 10_000  # an [S, S] float32 latency matrix: 400 MB at this size
MIN_RATE = 1e-3  # slower bandwidths or speeds give simulated times beyond float32
MAX_LATENCY_MS = 3_600_000.0  # one hour one way


class NetworkError(ConfigError):
  """A bad network setting or file; the message names the flag and the fix."""


@struct.dataclass
class Network:
  site: jax.Array  # [N] int32 site of each node
  latency: jax.Array  # [S, S] float32 one-way seconds
  upload: jax.Array  # [N] float32 bytes/s (inf: unlimited)
  download: jax.Array  # [N] float32 bytes/s (inf: unlimited)
  speed: jax.Array  # [N] float32 training samples/s

  @property
  def num_nodes(self) -> int:
    return self.site.shape[0]

  def transfer_seconds(self, src: jax.Array, dst: jax.Array, nbytes, up_share=1,
                       down_share=1) -> jax.Array:
    """Seconds for ``nbytes`` from node(s) ``src`` to node(s) ``dst`` (broadcasting), while
    ``src`` uploads ``up_share`` and ``dst`` downloads ``down_share`` transfers at once."""
    up = self.upload[src] / jnp.maximum(up_share, 1).astype(jnp.float32)
    down = self.download[dst] / jnp.maximum(down_share, 1).astype(jnp.float32)
    bandwidth = jnp.minimum(up, down)
    return self.latency[self.site[src], self.site[dst]] + jnp.float32(nbytes) / bandwidth

  def compute_seconds(self, nodes: jax.Array, samples: jax.Array) -> jax.Array:
    return jnp.asarray(samples, jnp.float32) / self.speed[nodes]


def globe_latency(sites: int, seed: int = 0) -> np.ndarray:
  """[S, S] one-way seconds between ``sites`` random points on the globe."""
  rng = np.random.default_rng(seed)
  lon = rng.uniform(-np.pi, np.pi, sites)
  lat = np.arcsin(rng.uniform(-1, 1, sites))  # uniform on the sphere
  dlat = lat[:, None] - lat[None, :]
  dlon = lon[:, None] - lon[None, :]
  h = np.sin(dlat / 2) ** 2 + np.cos(lat[:, None]) * np.cos(lat[None, :]) * np.sin(dlon / 2) ** 2
  km = 2 * _EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(h, 0, 1)))
  return (_SAME_SITE_S + _ROUTE_INFLATION * km / _FIBRE_KM_PER_S).astype(np.float32)


def read_rows(path: str | pathlib.Path) -> list[list[float]]:
  """Rows of numbers from a text file (comma or white space separated, # comments).

  Raises OSError when unreadable, ValueError on a non-number.
  """
  text = pathlib.Path(path).read_text()
  return [[float(v) for v in line.replace(',', ' ').split()]
          for line in text.splitlines() if line.strip() and not line.lstrip().startswith('#')]


def load_latency(path: str | pathlib.Path) -> np.ndarray:
  """An S x S matrix of one-way latencies in milliseconds (CSV, comma or space separated)."""
  fix = 'give a CSV of one-way milliseconds, one row per site'
  try:
    rows = read_rows(path)
  except OSError as e:
    raise NetworkError(f'--latency_file={path} cannot be read ({e.strerror}); {fix}') from None
  except ValueError:
    raise NetworkError(f'--latency_file={path} is not a numeric matrix; {fix}') from None
  if not rows or any(len(r) != len(rows) for r in rows):
    raise NetworkError(f'--latency_file={path} must be a square S x S matrix, got {len(rows)} '
                       f'rows of lengths {sorted({len(r) for r in rows})}; {fix}')
  matrix = np.asarray(rows, np.float64)
  if not np.all(np.isfinite(matrix)) or np.any(matrix < 0) or np.any(matrix > MAX_LATENCY_MS):
    raise NetworkError(f'--latency_file={path} has negative, non-finite or too large entries; '
                       f'latencies are one-way milliseconds in 0..{MAX_LATENCY_MS:.0f}')
  return (matrix / 1000.0).astype(np.float32)


def _per_node(rng: np.random.Generator, n: int, mean: float, sigma: float) -> np.ndarray:
  """``mean`` for every node, or lognormal around it (median ``mean``) when sigma > 0."""
  if sigma <= 0:
    return np.full(n, mean, np.float32)
  return (mean * rng.lognormal(0.0, sigma, n)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class NetworkConfig(Component):
  """Simulated network: sites, latency, bandwidth, compute speed."""

  sites: int = option(20, 'Sites on the globe; node i sits on site i mod S.', low=1,
                      high=MAX_SITES)
  latency_file: str | None = option(None, 'CSV S x S one-way latencies in ms (replaces the '
                                    'generated globe).')
  upload_mbps: float = option(0.0, 'Per-node upload Mbit/s (0: unlimited).', low=0,
                              hint='(0: unlimited)')
  download_mbps: float = option(0.0, 'Per-node download Mbit/s (0: unlimited).', low=0,
                                hint='(0: unlimited)')
  bandwidth_sigma: float = option(0.0, 'Lognormal spread of bandwidths.', low=0, high=10)
  samples_per_second: float = option(1000.0, 'Training speed of a node.', low=MIN_RATE)
  compute_sigma: float = option(0.0, 'Lognormal spread of node speeds.', low=0, high=10)
  compute_file: str | None = option(None, 'One samples/s value per node.')

  def check(self):
    for name in ('upload_mbps', 'download_mbps'):
      value = getattr(self, name)
      check(value == 0 or value >= MIN_RATE,
            f'--{name}={value:g} is too slow to simulate: use 0 (unlimited) or >= {MIN_RATE:g}')


def make_network(config: NetworkConfig, nodes: int, seed: int = 0) -> Network:
  rng = np.random.default_rng(seed + 7)
  if config.latency_file:
    latency = load_latency(config.latency_file)
  else:
    if config.sites < 1:
      raise NetworkError(f'--sites={config.sites} must be at least 1')
    latency = globe_latency(config.sites, seed)
  sites = latency.shape[0]

  def bandwidth(mbps):
    if mbps < 0:
      raise NetworkError(f'bandwidth {mbps} Mbit/s must be >= 0 (0: unlimited)')
    if mbps == 0:
      return np.full(nodes, np.inf, np.float32)
    return _per_node(rng, nodes, mbps * 1e6 / 8, config.bandwidth_sigma)

  if config.compute_file:
    speed = _load_speeds(config.compute_file, nodes)
  else:
    if config.samples_per_second <= 0:
      raise NetworkError(f'--samples_per_second={config.samples_per_second} must be > 0')
    speed = _per_node(rng, nodes, config.samples_per_second, config.compute_sigma)
  return Network(site=jnp.asarray(np.arange(nodes) % sites, jnp.int32),
                 latency=jnp.asarray(latency),
                 upload=jnp.asarray(bandwidth(config.upload_mbps)),
                 download=jnp.asarray(bandwidth(config.download_mbps)),
                 speed=jnp.asarray(speed))


def _load_speeds(path: str, nodes: int) -> np.ndarray:
  try:
    values = np.asarray([v for row in read_rows(path) for v in row], np.float64)
  except (OSError, ValueError) as e:
    raise NetworkError(f'--compute_file={path} cannot be read as numbers ({e}); give one '
                       'samples/s value per node') from None
  if values.shape != (nodes,) or not np.all(np.isfinite(values) & (values >= MIN_RATE)):
    raise NetworkError(f'--compute_file={path} must hold {nodes} finite samples/s values >= '
                       f'{MIN_RATE:g} (one per node), got {values.size} values')
  return values.astype(np.float32)


def uniform_network(nodes: int, *, latency: float = 0.05, bandwidth: float = np.inf,
                    speed: float = 1000.0) -> Network:
  """One site, one latency, one bandwidth and one speed for every node (tests, quick runs)."""
  return Network(site=jnp.zeros((nodes,), jnp.int32),
                 latency=jnp.full((1, 1), latency, jnp.float32),
                 upload=jnp.full((nodes,), bandwidth, jnp.float32),
                 download=jnp.full((nodes,), bandwidth, jnp.float32),
                 speed=jnp.full((nodes,), speed, jnp.float32))


def lowest_median_latency_node(network: Network) -> int:
  """The node whose median latency to all nodes is lowest: MoDeST's FL server.

  A node's latencies to all N nodes are its site's row of the S x S matrix, each entry
  repeated by the count of nodes on that site; the median of that multiset is read off
  the sorted row's cumulative counts, so this costs O(S^2 + N), never N x N."""
  site, latency = np.asarray(network.site), np.asarray(network.latency)
  counts = np.bincount(site, minlength=latency.shape[0])  # [S]
  order = np.argsort(latency, axis=1, kind='stable')  # [S, S]
  ends = np.cumsum(counts[order], axis=1)  # [S, S] nodes up to each sorted entry
  middle = [(len(site) - 1) // 2, len(site) // 2]  # the one or two middle positions
  picks = [np.take_along_axis(latency, order, axis=1)[np.arange(len(latency)),
                                                      np.argmax(ends > m, axis=1)]
           for m in middle]  # [S] each
  site_median = np.mean(np.stack(picks, axis=1), axis=1)  # [S], as np.median averages
  return int(np.argmin(site_median[site]))


def model_messages(count: jax.Array) -> jax.Array:
  """A round's per-kind message counts ``[K]`` when it sends only ``count`` models."""
  return jnp.zeros((len(KINDS),), jnp.int32).at[MODEL].set(count)


def message_bytes(model_bytes: int, nodes: int) -> tuple[int, int, int]:
  """Bytes of one message of each kind in ``KINDS``."""
  return (model_bytes, VIEW_BYTES_PER_NODE * nodes, PING_BYTES)
