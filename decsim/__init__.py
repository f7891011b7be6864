"""decsim: federated and decentralized learning, all N node models in one jit-compiled round.

The public namespace: configure and run experiments, and extend them with your own
dataset, model, protocol or aggregator (docs/extending.md) without importing
decsim's internals.
"""

from decsim import simulate
from decsim.aggregation import Aggregator, ServerOptimizer, make_aggregator
from decsim.churn import ChurnConfig, make_availability, with_churn
from decsim.data.sources import ArrayDataset
from decsim.errors import ConfigError, UserError
from decsim.experiment import ExperimentConfig, build, run
from decsim.network import Network, NetworkConfig, make_network, model_messages
from decsim.protocols.base import Learner, Protocol, weighted_average
from decsim.protocols.dpsgd import dpsgd
from decsim.protocols.fedavg import fedavg
from decsim.protocols.gossip import gossip
from decsim.protocols.modest import modest
from decsim.protocols.registry import BuildContext, ProtocolSpec, register
from decsim.rng import Stream, node_keys
from decsim.state import NodeState, RoundMetrics, SimState, init_sim_state

__all__ = [
    'plotting',
    'studies',
    'Aggregator',
    'ArrayDataset',
    'BuildContext',
    'ChurnConfig',
    'ConfigError',
    'ExperimentConfig',
    'Learner',
    'Network',
    'NetworkConfig',
    'NodeState',
    'Protocol',
    'ProtocolSpec',
    'RoundMetrics',
    'ServerOptimizer',
    'SimState',
    'Stream',
    'UserError',
    'build',
    'dpsgd',
    'fedavg',
    'gossip',
    'init_sim_state',
    'make_aggregator',
    'make_availability',
    'make_network',
    'model_messages',
    'modest',
    'node_keys',
    'register',
    'run',
    'simulate',
    'weighted_average',
    'with_churn',
]


def __getattr__(name: str):
  """``decsim.plotting`` and ``decsim.studies`` load on first use (matplotlib is heavy)."""
  if name in ('plotting', 'studies'):
    import importlib
    module = importlib.import_module(f'decsim.{name}')
    if name == 'studies':
      for study in ('common', 'modest', 'sapo', 'variance'):
        importlib.import_module(f'decsim.studies.{study}')
    return module
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
