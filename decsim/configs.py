"""The components of an experiment's configuration, one frozen dataclass each.

Every field is declared once with ``decsim.config.option`` (default, help, range,
choices); the flags of ``decsim`` and their groups in ``--helpfull`` are generated
from these classes, and every value is checked when a config is made, whether or
not its feature is switched on. ``Component.__post_init__`` runs the field checks
and then each component's ``check`` for combinations of fields.
"""

import dataclasses

from decsim import mixing
from decsim.config import Component, check, option
from decsim.data.sources import DATASETS
from decsim.models import MODELS
from decsim.rng import MAX_SEED, REPLICA_PARTS
from decsim.topology import TOPOLOGIES

MAX_LOCAL_STEPS = 100_000  # per node per round: a scan of this length is compiled


@dataclasses.dataclass(frozen=True)
class DataConfig(Component):
  """Data and its partition over nodes."""

  dataset: str = option('mnist1d', 'mnist1d (embedded, generated locally), synthetic (LEAF), '
                        'text (generated lines of one role per node, next character; '
                        '--model=char_lstm), or a prepared TFDS dataset: mnist, '
                        'fashion_mnist, cifar10, emnist.',
                        choices=DATASETS)
  num_samples: int = option(10_000, 'Samples generated (mnist1d, synthetic, text; 80/20 '
                            'train/test) or the train subset of a real dataset (0: all).', low=0,
                            hint='(0: the whole dataset)')
  data_dir: str | None = option(None, 'TFDS data directory of the real datasets.')
  partition: str = option('dirichlet', 'How samples are split over nodes.',
                          choices=('iid', 'dirichlet', 'shards', 'natural'))
  alpha: float = option(0.5, 'Dirichlet concentration of the label skew (small: skewed).',
                        low=0, low_open=True, hint='(small: label skew; large: near IID)')
  shards_per_node: int = option(2, 'Label shards per node (--partition=shards).', low=1)
  local_test_fraction: float = option(0.0, "Fraction of each node's samples held out as its "
                                      'local test set (rows add local_accuracy; 0: none).',
                                      low=0, high=1, high_open=True)


@dataclasses.dataclass(frozen=True)
class ModelConfig(Component):
  """Model."""

  model: str = option('lenet', 'logistic, mlp, lenet (LeNet-5), gn_lenet, gn_resnet8, '
                      'gn_resnet18 (group-norm ResNets) or char_lstm (--dataset=text).',
                      choices=MODELS)
  init: str = option('shared', 'shared: one model for all nodes; independent: a draw each.',
                     choices=('shared', 'independent'))
  param_dtype: str = option('float32', 'Dtype of stored params, optimiser state and model '
                            'transfers (bytes); compute stays float32.',
                            choices=('float32', 'bfloat16'))


@dataclasses.dataclass(frozen=True)
class TrainConfig(Component):
  """Local training."""

  local_steps: int = option(5, 'Local minibatch steps per round.', low=1, high=MAX_LOCAL_STEPS)
  local_epochs: float = option(0.0, 'Local epochs per round; > 0 overrides --local_steps (each '
                               'node ceil(E * its samples / batch) steps).', low=0, high=1000,
                               hint='(0: use --local_steps)')
  batch_size: int = option(32, 'Local minibatch size.', low=1, high=65_536)
  optimizer: str = option('sgd', 'Local optimiser.', choices=('sgd', 'adam'))
  lr: float = option(0.05, 'Local learning rate.', low=0, low_open=True)
  momentum: float = option(0.9, 'SGD momentum (0: plain SGD).', low=0, high=1, high_open=True)
  lr_schedule: str = option('constant', 'Local learning rate by round (every protocol, and a '
                            'resumed run, sees the same rate): constant, cosine (to 0 over '
                            '--lr_decay_rounds) or step (x --lr_decay_factor every '
                            '--lr_decay_rounds).', choices=('constant', 'cosine', 'step'))
  lr_decay_rounds: int = option(0, 'Rounds of the cosine decay, or between two steps (0: '
                                '--rounds).', low=0, hint='(0: --rounds)')
  lr_decay_factor: float = option(0.1, 'Step schedule: factor of each step.', low=0, high=1,
                                  low_open=True)
  node_chunk: int = option(-1, 'Nodes per vectorised chunk of local training: -1 auto (by model '
                           'on CPU, one vmap on GPU), 0 one vmap, k > 0 chunks of k.', low=-1,
                           hint='(-1: auto, 0: one vmap, k: chunks of k)')


@dataclasses.dataclass(frozen=True)
class TopologyConfig(Component):
  """Graph of the decentralized protocols."""

  topology: str = option('kregular', 'D-PSGD graph (and gossip --gossip_peers=neighbour).',
                         choices=(*TOPOLOGIES, 'one_peer_exponential'))
  degree: int = option(4, 'Degree of the kregular graph.', low=1)
  edge_probability: float = option(0.1, 'Edge probability (erdos_renyi).', low=0, high=1,
                                   low_open=True)
  mixing: str = option('auto', 'auto, dense (W @ params) or sparse (neighbour slots).',
                       choices=('auto', 'dense', 'sparse'))


@dataclasses.dataclass(frozen=True)
class VarianceConfig(Component):
  """Variance correction after averaging (Tian et al. 2024)."""

  variance_correction: str = option('none', 'Rescale layers after averaging (gossip, dpsgd, '
                                    'fedavg, modest) to a target variance.',
                                    choices=('none', *mixing.VC_TARGETS))
  vc_biases: bool = option(False, 'Variance correction of bias vectors too.')
  vc_unbiased: bool = option(False, 'Variance correction with ddof=1 variances.')
  vc_epsilon: float = option(1e-12, 'Variance correction: floor of the variance.', low=0,
                             low_open=True)
  vc_ratio: float = option(1.0, 'Variance correction: fraction of the way to the target std '
                           '(1: full).', low=0, high=1)


@dataclasses.dataclass(frozen=True)
class RunConfig(Component):
  """Run: nodes, rounds, evaluation, seeds, checkpoints, devices."""

  protocol: str = option('fedavg', 'The protocol to simulate: a name in the registry '
                         '(decsim.protocols.registry), e.g. fedavg, fedprox, dpsgd, gossip, '
                         'modest.')
  nodes: int = option(100, 'Number of nodes N.', low=1, high=100_000_000)
  rounds: int = option(300, 'Rounds to run (the last evaluation is at the last round).',
                       low=1, high=2 ** 31 - 1)
  eval_every: int = option(20, 'Rounds per jit-compiled chunk between evaluations (a '
                           'shorter last chunk ends at --rounds).', low=1)
  eval_nodes: int = option(0, 'Nodes evaluated: for protocols whose nodes hold their own '
                           'models (D-PSGD, gossip) accuracy is their mean; local_accuracy '
                           'uses them too (0: all nodes; k: a fixed random subset of k).', low=0,
                           hint='(0: all nodes)')
  target_accuracy: float = option(0.8, 'Accuracy for *_to_target in summary.json.', low=0,
                                  high=1)
  seed: int = option(0, 'Seed of data, partition, graph, init and every draw.', low=0,
                     high=MAX_SEED)
  replicas: int = option(1, 'Run R independent replicas: replica i is the run with seed + i '
                         '(data, graph, network and every draw); rows report mean, std, values.',
                         low=1, high=1024)
  replica_fix: str | None = option(None, 'Parts the replicas share, from seed: a comma list of '
                                   'data, graph, network. With all three the replicas run as '
                                   'one vmapped simulation; otherwise one after another.')
  checkpoint_every: int = option(0, 'Save an orbax checkpoint every this many rounds into '
                                 'OUT/checkpoints (0: off; a multiple of --eval_every).', low=0)
  resume: bool = option(False, 'Continue the run in --out from its newest readable checkpoint.')
  tensorboard: bool = option(False, 'Also write the rows as TensorBoard scalars into '
                             'OUT/tensorboard (needs tensorboardX: pip install '
                             '"decsim[tensorboard]"); metrics.jsonl stays the record.')
  devices: int = option(1, "Devices the node axis is split over (1: one; 0: all, every "
                        "host's); --nodes must be a multiple of it.", low=0)

  def check(self):
    check(self.checkpoint_every % self.eval_every == 0,
          f'--checkpoint_every={self.checkpoint_every} must be 0 (off) or a multiple of '
          f'--eval_every={self.eval_every}')
    check(self.seed + self.replicas - 1 <= MAX_SEED,
          f'--seed={self.seed} with --replicas={self.replicas} runs seeds up to '
          f'{self.seed + self.replicas - 1}; seeds must be at most {MAX_SEED}')
    unknown = set(self.replica_parts) - set(REPLICA_PARTS)
    check(not unknown, f'--replica_fix={self.replica_fix} names {", ".join(sorted(unknown))}: '
          f'choose from {", ".join(REPLICA_PARTS)}, comma-separated')
    check(self.replicas == 1 or self.devices == 1,
          f'--replicas={self.replicas} cannot be combined with --devices={self.devices}: run '
          'replicas on one device or shard one replica')

  @property
  def replica_parts(self) -> tuple[str, ...]:
    """The parts named by ``--replica_fix``."""
    return tuple(p.strip() for p in (self.replica_fix or '').split(',') if p.strip())

  @property
  def replicas_vmapped(self) -> bool:
    """Replicas that share data, graph and network run as one vmapped simulation."""
    return self.replicas > 1 and set(REPLICA_PARTS) <= set(self.replica_parts)

