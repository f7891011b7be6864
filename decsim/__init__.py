"""decsim: federated and decentralized learning, all N nodes in one jit-compiled round."""

from decsim.experiment import ConfigError, ExperimentConfig, build, run
from decsim.protocols.base import Learner, Protocol
from decsim.protocols.dpsgd import dpsgd
from decsim.protocols.fedavg import fedavg
from decsim.state import NodeState, RoundMetrics, SimState

__all__ = [
    'ConfigError',
    'ExperimentConfig',
    'Learner',
    'NodeState',
    'Protocol',
    'RoundMetrics',
    'SimState',
    'build',
    'dpsgd',
    'fedavg',
    'run',
]
