"""Classifiers used by the papers, all with Glorot/Xavier-uniform weights and zero biases.

Inputs carry a trailing channel axis (``[B, 40, 1]`` MNIST-1D, ``[B, 28, 28, 1]``
MNIST, ``[B, 32, 32, 3]`` CIFAR-10, ``[B, F]`` tabular); the convolutional models
work for one or two spatial axes. Tian et al. (2024) argue the Xavier scale is
what averaging destroys, so every model starts from it.
"""

from collections.abc import Sequence
from typing import NamedTuple

import jax
import flax.linen as nn

from decsim.models.layers import PatchConv, xavier_uniform


def _dense(features: int) -> nn.Dense:
  return nn.Dense(features, kernel_init=xavier_uniform)


class Logistic(nn.Module):
  """Multinomial logistic regression."""

  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _dense(self.num_classes)(x.reshape(x.shape[0], -1))


class MLP(nn.Module):
  """ReLU multilayer perceptron (McMahan et al. 2017 use 784-200-200-10)."""

  num_classes: int
  hidden: Sequence[int] = (200,)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    for width in self.hidden:
      x = nn.relu(_dense(width)(x))
    return _dense(self.num_classes)(x)


def _pool(x: jax.Array) -> jax.Array:
  ndim = x.ndim - 2
  return nn.max_pool(x, (2,) * ndim, strides=(2,) * ndim)


class LeNet5(nn.Module):
  """LeNet-5 (LeCun et al. 1998) with ReLU and max-pooling, as Tian et al. (2024) train it.

  conv6@5 - pool - conv16@5 - pool - fc120 - fc84 - fc(classes). 'SAME' padding on
  28x28 inputs plays the role of the original 32x32 padded digits.
  """

  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    window = (5,) * (x.ndim - 2)
    x = _pool(nn.relu(PatchConv(6, window)(x)))
    x = _pool(nn.relu(PatchConv(16, window)(x)))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(_dense(120)(x))
    x = nn.relu(_dense(84)(x))
    return _dense(self.num_classes)(x)


class GNLeNet(nn.Module):
  """GN-LeNet of Hsieh et al. (2020), the CIFAR-10 model of decentralizepy and MoDeST.

  Three conv(5x5) - ReLU - max-pool - GroupNorm(2) blocks with 32, 32, 64 channels,
  then one dense layer. GroupNorm instead of BatchNorm: batch statistics break
  under non-IID partitions.
  """

  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    window = (5,) * (x.ndim - 2)
    for features in (32, 32, 64):
      x = nn.GroupNorm(num_groups=2)(_pool(nn.relu(PatchConv(features, window)(x))))
    return _dense(self.num_classes)(x.reshape(x.shape[0], -1))


class ModelSpec(NamedTuple):
  module: nn.Module
  # Nodes per chunk when vectorising local training on a CPU (0: one vmap over all).
  cpu_node_chunk: int


MODELS = ('logistic', 'mlp', 'lenet', 'gn_lenet')


def build_model(name: str, num_classes: int) -> ModelSpec:
  """The flax module called ``name`` and how best to vectorise it on a CPU."""
  if name == 'logistic':
    return ModelSpec(Logistic(num_classes), cpu_node_chunk=0)
  if name == 'mlp':
    return ModelSpec(MLP(num_classes), cpu_node_chunk=0)
  if name == 'lenet':
    return ModelSpec(LeNet5(num_classes), cpu_node_chunk=4)
  if name == 'gn_lenet':
    return ModelSpec(GNLeNet(num_classes), cpu_node_chunk=4)
  raise ValueError(f'unknown model {name!r}: choose one of {", ".join(MODELS)}')
