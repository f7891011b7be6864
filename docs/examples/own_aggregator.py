"""Your own server aggregator: a norm-clipped mean, plugged into FedAvg.

Each client's update (its model minus the mean model) is clipped to norm C before
averaging, which bounds what one faulty client can move. Registered as the
protocol 'fedavg_clipped', it takes every FedAvg flag.

Run: python docs/examples/own_aggregator.py [OUT_DIR]
"""

import sys

import jax
import jax.numpy as jnp

import decsim
from decsim.protocols import fedavg


def clipped_mean(clip: float) -> decsim.Aggregator:
  def apply(models, weights, state):  # leaves [s, ...], weights [s] (0: not received)
    centre = decsim.weighted_average(models, jnp.where(jnp.any(weights > 0), weights, 1.0))
    deltas = jax.tree.map(lambda m, c: m - c[None], models, centre)
    norms = jnp.sqrt(sum(jnp.sum(d.reshape(d.shape[0], -1) ** 2, axis=1)
                         for d in jax.tree.leaves(deltas)))  # [s]
    scale = jnp.minimum(1.0, clip / jnp.maximum(norms, 1e-12))  # [s]
    clipped = jax.tree.map(lambda c, d: c[None] + d * scale.reshape((-1,) + (1,) * (d.ndim - 1)),
                           centre, deltas)
    return decsim.weighted_average(clipped, jnp.where(jnp.any(weights > 0), weights, 1.0)), state

  return decsim.Aggregator(init=lambda params: (), apply=apply)


def build(ctx: decsim.BuildContext) -> decsim.Protocol:
  c = ctx.config
  return fedavg.fedavg(ctx.learner, nodes=c.nodes, sample_size=c.sample_size,
                       network=ctx.network, aggregator=clipped_mean(clip=1.0))


decsim.register(decsim.ProtocolSpec('fedavg_clipped', build, 'FedAvg with a norm-clipped mean',
                                    fedavg.check_sampled))


def main(out_dir=None):
  config = decsim.ExperimentConfig(protocol='fedavg_clipped', nodes=10, sample_size=5,
                                   num_samples=1000, model='logistic', rounds=10, eval_every=5)
  return decsim.run(config, out_dir=out_dir, log=lambda _: None)


if __name__ == '__main__':
  print(main(sys.argv[1] if len(sys.argv) > 1 else None)['final_accuracy'])
