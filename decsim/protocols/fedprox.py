"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020).

FedAvg whose clients minimise their local loss plus a proximal term
``mu / 2 * ||w - w_global||^2`` that keeps them near the model they received.
Its gradient ``mu * (w - w_global)`` is added to each local step's gradient by an
optax transform chained before the local optimiser; the transform's state is the
model the client started from, which FedAvg's stateless clients initialise from
the global model every round. Everything else (sampling, the server, the simulated
network, churn, aggregators and server optimizers) is FedAvg's. With ``mu = 0``
the added term is an exact zero and the run is FedAvg's, byte for byte.

Deviation: the paper's inexact local solvers (a variable number of local steps
per device, "gamma-inexactness") are FedAvg's ``--local_steps``/``--local_epochs``.
"""

import dataclasses
from typing import NamedTuple

import jax
import optax

from decsim.config import Component, option
from decsim.protocols import fedavg, registry
from decsim.protocols.base import Protocol
from decsim.types import Params


@dataclasses.dataclass(frozen=True)
class FedProxConfig(Component):
  """FedProx (Li et al. 2020)."""

  fedprox_mu: float = option(0.01, 'FedProx: weight mu of the proximal term mu/2 ||w - w_global||^2 '
                             '(0: FedAvg).', low=0)


class ProximalState(NamedTuple):
  anchor: Params  # the model the client started from this round


def proximal(mu: float) -> optax.GradientTransformation:
  """Adds ``mu * (params - anchor)`` to the gradient; ``anchor`` is the params at init."""

  def init(params: Params) -> ProximalState:
    return ProximalState(anchor=params)

  def update(updates, state: ProximalState, params=None):
    pull = jax.tree.map(lambda w, w0: mu * (w - w0), params, state.anchor)
    return jax.tree.map(lambda g, p: g + p.astype(g.dtype), updates, pull), state

  return optax.GradientTransformation(init, update)


def build(ctx: registry.BuildContext) -> Protocol:
  return fedavg.build(ctx, learner=ctx.learner_with(proximal(ctx.config.fedprox_mu)))


registry.register(registry.ProtocolSpec(
    'fedprox', build, 'FedProx (Li et al., MLSys 2020)', fedavg.check_sampled, FedProxConfig))
