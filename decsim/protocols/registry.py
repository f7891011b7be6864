"""The protocol registry: a name, the options it adds, how to build it from a config.

A protocol module declares its options (a ``decsim.config.Component`` whose
fields become flags), a ``build(ctx) -> Protocol`` and the checks it needs on
the whole experiment config, and calls ``register`` once. The generic code
(``decsim.experiment``, ``decsim.simulate``, the launchers) looks protocols up
here and never names one. What evaluation and accounting need comes from the
``Protocol`` itself (``node_models``, ``message_bytes``, ``extra_metrics``).

Protocols outside decsim register the same way, from Python before building an
experiment, or through the ``decsim.protocols`` entry point group: an installed
package that names ``mine = mypkg.mymodule`` in that group is imported when this
registry is first used, and its import calls ``register``.
"""

import dataclasses
from collections.abc import Callable
from importlib import metadata
from typing import Any

import optax

from decsim.errors import ConfigError
from decsim.protocols.base import Learner, Protocol
from decsim.rng import Seeds

ENTRY_POINT_GROUP = 'decsim.protocols'


@dataclasses.dataclass(frozen=True)
class BuildContext:
  """What a builder gets: the experiment config and the shared pieces built from it."""

  config: Any  # decsim.experiment.ExperimentConfig: every option, flat
  learner: Learner
  network: Any  # decsim.network.Network
  availability: Callable | None  # churn schedule, or None without churn
  variance_correction: Any  # decsim.mixing.VarianceCorrection | None
  # The learner with an optax transform chained before the local optimiser (e.g. a
  # proximal term): local training rebuilt around ``optax.chain(transform, tx)``.
  learner_with: Callable[[optax.GradientTransformation], Learner]
  # The seeds of the run's parts (``decsim.rng.Seeds``): a graph is drawn from ``seeds.graph``.
  seeds: Seeds


@dataclasses.dataclass(frozen=True)
class ProtocolSpec:
  name: str
  build: Callable[[BuildContext], Protocol]
  summary: str  # one line for --help: the paper
  check: Callable[[Any], None] | None = None  # combination checks on the whole config
  options: type | None = None  # the Component whose fields are this protocol's flags


_REGISTRY: dict[str, ProtocolSpec] = {}
_loaded = {'entry_points': False}


def register(spec: ProtocolSpec) -> ProtocolSpec:
  """Adds ``spec``; a second protocol of the same name is refused."""
  if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
    raise ValueError(f'a protocol named {spec.name!r} is already registered')
  _REGISTRY[spec.name] = spec
  return spec


def _load_entry_points() -> None:
  if _loaded['entry_points']:
    return
  _loaded['entry_points'] = True
  for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
    entry.load()


def names() -> tuple[str, ...]:
  _load_entry_points()
  return tuple(_REGISTRY)


def get(name: str) -> ProtocolSpec:
  _load_entry_points()
  if name not in _REGISTRY:
    raise ConfigError(f'--protocol={name!r} is unknown: choose one of {", ".join(_REGISTRY)} '
                      '(or register your own, see docs/extending.md)')
  return _REGISTRY[name]
