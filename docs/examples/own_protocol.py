"""Your own protocol: 'local_only', every node trains alone and never communicates.

The baseline every decentralized paper should show: what nodes reach without
sharing anything. Registered under a name, it runs with every flag decsim has
(data, network, churn, replicas, checkpoints) and reports the same metrics.

Run: python docs/examples/own_protocol.py [OUT_DIR]
"""

import sys

import jax
import jax.numpy as jnp

import decsim
from decsim.protocols import base


def local_only(learner: decsim.Learner, nodes: int, network: decsim.Network) -> decsim.Protocol:
  def init(key, data):
    del data
    params = base.init_params(learner, jax.random.fold_in(key, decsim.Stream.INIT), nodes)
    return decsim.init_sim_state(key, decsim.NodeState(params, jax.vmap(learner.tx.init)(params)))

  def round_(state, data):
    alive = state.available  # [N] bool, set by the churn schedule
    keys = decsim.node_keys(state.key, state.round, jnp.arange(nodes), decsim.Stream.BATCH)
    result = base.train_nodes(learner, state.nodes.params, state.nodes.opt_state, keys, data,
                              round_=state.round)
    keep = lambda new, old: jnp.where(alive.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)
    params = jax.tree.map(keep, result.params, state.nodes.params)
    opt_state = jax.tree.map(keep, result.opt_state, state.nodes.opt_state)
    steps = jnp.where(alive, result.steps, 0)  # [N]
    seconds = jnp.max(network.compute_seconds(jnp.arange(nodes), steps * learner.batch_size))
    n_alive = jnp.sum(alive, dtype=jnp.int32)
    state = state.replace(round=state.round + 1, nodes=decsim.NodeState(params, opt_state),
                          clock=state.clock + seconds)
    metrics = decsim.RoundMetrics(
        train_loss=jnp.sum(jnp.where(alive, result.loss, 0.0)) / jnp.maximum(n_alive, 1),
        sim_seconds=seconds, messages=decsim.model_messages(jnp.int32(0)),
        active_nodes=n_alive, node_steps=jnp.sum(steps))
    return state, metrics

  return decsim.Protocol(init, round_, model=lambda s: base.node_average(s.nodes.params),
                         node_models=lambda s: s.nodes.params)


def build(ctx: decsim.BuildContext) -> decsim.Protocol:
  return local_only(ctx.learner, ctx.config.nodes, ctx.network)


decsim.register(decsim.ProtocolSpec('local_only', build, 'Local training only (no sharing)'))


def main(out_dir=None):
  config = decsim.ExperimentConfig(protocol='local_only', nodes=10, num_samples=1000,
                                   model='logistic', rounds=10, eval_every=5)
  return decsim.run(config, out_dir=out_dir, log=lambda _: None)


if __name__ == '__main__':
  print(main(sys.argv[1] if len(sys.argv) > 1 else None)['final_accuracy'])
