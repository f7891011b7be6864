"""The node axis on a 1-D device mesh: one ``round`` on 1..D devices, and on several hosts.

Every stacked leaf of ``SimState`` (node params, optimiser state, per-node
counters, the availability mask) and the partition's rows (``NodeData.idx``,
``NodeData.sizes``) are split over a mesh axis called ``'nodes'``
(``NamedSharding(mesh, P('nodes'))``): device d holds nodes
``[d * N / D, (d + 1) * N / D)``. The training samples ``x``, ``y`` and the
scalars (round, key, clock, a server model) are replicated. The protocols are
not changed: ``round`` is jit-compiled with these input and output shardings and
XLA's SPMD partitioner (GSPMD) inserts the collectives — the all-gathers of a
sparse neighbour gather or of a dense ``W @ X``, the gather of FedAvg's ``s``
sampled rows and the scatter back, the reductions of the metrics.

N must be a multiple of D. Padding N with phantom nodes would change what a
protocol computes (sampling, mixing and averages would see them), so a run with
``N % D != 0`` is refused with a one-line error instead (``device_error``).

Several hosts: call ``initialize_distributed`` (``jax.distributed.initialize``)
in every process before anything touches a device; ``jax.devices()`` then lists
every process's devices and the same mesh spans them. On CPUs the collectives go
through gloo (``jax_cpu_collectives_implementation``); on GPUs through NCCL.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from decsim.data.sampler import NodeData
from decsim.state import SimState

AXIS = 'nodes'


def device_error(requested: int, nodes: int, available: int) -> str | None:
  """Why ``--devices=requested`` cannot run ``nodes`` nodes on ``available`` devices, or None."""
  if requested < 0:
    return f'--devices={requested} must be >= 0 (0: all {available} visible devices)'
  if requested > available:
    return (f'--devices={requested} but only {available} devices are visible (jax.devices()); '
            'lower --devices or pass 0 for all')
  d = requested or available
  if nodes % d:
    return (f'--nodes={nodes} is not a multiple of {d} devices (--devices={requested}): the node '
            f'axis is split evenly, so use --nodes={(nodes // d + 1) * d} or a --devices that '
            f'divides {nodes}')
  return None


def make_mesh(devices: int = 0) -> Mesh:
  """A 1-D mesh named ``'nodes'`` over the first ``devices`` devices (0: all, every host's)."""
  available = jax.devices()
  d = devices or len(available)
  if not 1 <= d <= len(available):
    raise ValueError(f'--devices={devices} but {len(available)} devices are visible')
  return Mesh(np.asarray(available[:d]), (AXIS,))


def node_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _by_leading_axis(tree: Any, mesh: Mesh, nodes: int) -> Any:
  """Node sharding for leaves whose leading axis has size ``nodes``, replication otherwise."""
  def one(leaf):
    shape = getattr(leaf, 'shape', ())
    return node_sharding(mesh) if len(shape) >= 1 and shape[0] == nodes else replicated(mesh)

  return jax.tree.map(one, tree)


def state_shardings(state: SimState, mesh: Mesh) -> SimState:
  """A pytree of shardings for ``state`` (arrays or ``jax.eval_shape`` structs).

  Every leaf whose leading axis is the node axis (N, read from ``state.available``)
  is split over the mesh: the stacked params and optimiser state, the per-node
  counters and availability mask, per-node fields of a protocol's ``extra``
  (ages, views). The rest — round, key, clock, a server model — is replicated.
  The rule reads shapes, not field names, so new ``SimState`` fields need no
  change here. It only places data: a leaf split by coincidence (a server
  weight with a dimension equal to N) gives the same results with more
  communication.
  """
  nodes = state.available.shape[0]
  return _by_leading_axis(state, mesh, nodes)


def data_shardings(data: NodeData, mesh: Mesh) -> NodeData:
  """Partition rows split on the node axis; the samples replicated (every node may read any)."""
  rep, split = replicated(mesh), node_sharding(mesh)
  return NodeData(x=rep, y=rep, idx=split, sizes=split)


def put(tree: Any, shardings: Any) -> Any:
  """Places host or device arrays on ``shardings``; also across processes.

  ``jax.make_array_from_callback`` builds each process's shards from the same
  global value, so it works when the mesh spans several hosts, where
  ``jax.device_put`` of a value to non-addressable devices does not.
  """
  def one(x, sharding):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(one, tree, shardings)


def shard_data(data: NodeData, mesh: Mesh) -> NodeData:
  return put(data, data_shardings(data, mesh))


def sharded_init(init, key: jax.Array, data: NodeData, mesh: Mesh):
  """``init(key, data)`` compiled to write each device's node rows in place (no full copy on one)."""
  shapes = jax.eval_shape(init, key, data)
  return jax.jit(init, out_shardings=state_shardings(shapes, mesh))(key, data)


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int,
                           cpu_collectives: str = 'gloo') -> None:
  """``jax.distributed.initialize`` for a multi-host run; call first, in every process.

  On CPU-only hosts cross-process collectives need an implementation: gloo is
  built into jaxlib (``mpi`` is the other choice). GPUs use NCCL regardless.
  """
  if num_processes <= 1:
    return
  jax.config.update('jax_cpu_collectives_implementation', cpu_collectives)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def distributed_error(coordinator_address: str | None, num_processes: int,
                      process_id: int) -> str | None:
  """Why the multi-host flags do not describe a run, or None."""
  if num_processes < 1:
    return f'--num_processes={num_processes} must be at least 1'
  if num_processes == 1:
    return None
  if not coordinator_address:
    return (f'--num_processes={num_processes} needs --coordinator_address=HOST:PORT (process 0 '
            'listens there; every process passes the same address)')
  if not 0 <= process_id < num_processes:
    return f'--process_id={process_id} must be in 0..{num_processes - 1} (--num_processes - 1)'
  return None


def bytes_per_node(tree: Any) -> int:
  """Bytes of one node's row of every stacked leaf of ``tree`` (arrays or shape structs)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    if getattr(leaf, 'ndim', 0) >= 1:
      total += math.prod(leaf.shape[1:]) * jnp.dtype(leaf.dtype).itemsize
  return total
