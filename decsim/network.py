"""Simulated time: how long transfers and local computation take.

This is the homogeneous first model: one one-way latency, one bandwidth and one
compute speed for every node. A transfer of B bytes takes
``latency + B / bandwidth``; training on S samples takes ``S / samples_per_second``.
Per-site latency matrices, per-node bandwidth and compute heterogeneity (MoDeST's
evaluation) extend this module without changing the protocols' use of it.
"""

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Network:
  latency_seconds: float = 0.05  # one-way, every pair of nodes
  bandwidth_bytes_per_second: float = 12.5e6  # 100 Mbit/s up and down
  samples_per_second: float = 1000.0  # local training throughput of one node

  def transfer_seconds(self, nbytes: float | jax.Array) -> jax.Array:
    return jnp.float32(self.latency_seconds) + jnp.float32(nbytes) / self.bandwidth_bytes_per_second

  def compute_seconds(self, samples: jax.Array) -> jax.Array:
    return jnp.asarray(samples, jnp.float32) / self.samples_per_second
