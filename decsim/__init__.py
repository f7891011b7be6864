"""decsim: federated and decentralized learning, all N node models in one jit-compiled round."""

from decsim.churn import ChurnConfig, make_availability, with_churn
from decsim.experiment import ConfigError, ExperimentConfig, build, run
from decsim.network import Network, NetworkConfig, make_network
from decsim.protocols.base import Learner, Protocol
from decsim.protocols.dpsgd import dpsgd
from decsim.protocols.fedavg import fedavg
from decsim.protocols.modest import modest
from decsim.state import NodeState, RoundMetrics, SimState

__all__ = [
    'ChurnConfig',
    'ConfigError',
    'ExperimentConfig',
    'Learner',
    'Network',
    'NetworkConfig',
    'NodeState',
    'Protocol',
    'RoundMetrics',
    'SimState',
    'build',
    'dpsgd',
    'fedavg',
    'make_availability',
    'make_network',
    'modest',
    'run',
    'with_churn',
]
