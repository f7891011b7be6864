"""Classifiers used by the papers, all with Glorot/Xavier-uniform weights and zero biases.

Inputs carry a trailing channel axis (``[B, 40, 1]`` MNIST-1D, ``[B, 28, 28, 1]``
MNIST, ``[B, 32, 32, 3]`` CIFAR-10, ``[B, F]`` tabular); the convolutional models
work for one or two spatial axes. ``gn_resnet8`` and ``gn_resnet18`` are in
``resnet.py``; ``char_lstm`` (``char_lstm.py``) reads character ids ``[B, T]``
instead (``--dataset=text``). Tian et al. (2024) argue the Xavier scale is
what averaging destroys, so every model starts from it.
"""

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import flax.linen as nn

from decsim.errors import ConfigError
from decsim.models.char_lstm import CharLSTM
from decsim.models.layers import PatchConv, xavier_uniform
from decsim.models.resnet import gn_resnet8, gn_resnet18


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
  # Reads integer token ids (char_lstm) rather than float features.
  tokens: bool = False


# Measured CPU chunks of the new models (BUILD_NOTES.md, "Models for CIFAR and text").
CPU_CHUNK_RESNET8 = 2
CPU_CHUNK_RESNET18 = 1
CPU_CHUNK_LSTM = 0


MODELS = ('logistic', 'mlp', 'lenet', 'gn_lenet', 'gn_resnet8', 'gn_resnet18', 'char_lstm')


def build_model(name: str, num_classes: int) -> ModelSpec:
  """The flax module called ``name`` and how best to vectorise it on a CPU.

  ``cpu_node_chunk`` was measured with ``benchmarks.throughput --node_chunks`` on the
  dev CPU (BUILD_NOTES.md, "CPU vectorisation" and "Models for CIFAR and text").
  """
  if name == 'logistic':
    return ModelSpec(Logistic(num_classes), cpu_node_chunk=0)
  if name == 'mlp':
    return ModelSpec(MLP(num_classes), cpu_node_chunk=0)
  if name == 'lenet':
    return ModelSpec(LeNet5(num_classes), cpu_node_chunk=4)
  if name == 'gn_lenet':
    return ModelSpec(GNLeNet(num_classes), cpu_node_chunk=4)
  if name == 'gn_resnet8':
    return ModelSpec(gn_resnet8(num_classes), cpu_node_chunk=CPU_CHUNK_RESNET8)
  if name == 'gn_resnet18':
    return ModelSpec(gn_resnet18(num_classes), cpu_node_chunk=CPU_CHUNK_RESNET18)
  if name == 'char_lstm':
    return ModelSpec(CharLSTM(num_classes), cpu_node_chunk=CPU_CHUNK_LSTM, tokens=True)
  raise ValueError(f'unknown model {name!r}: choose one of {", ".join(MODELS)}')


def check_inputs(name: str, spec: ModelSpec, dataset_name: str, features) -> None:
  """Refuses a model that reads token ids on float features, and the reverse.

  ``features`` is the train array of the dataset called ``dataset_name``; integer
  features are token ids.
  """
  tokens = jnp.issubdtype(features.dtype, jnp.integer)
  if spec.tokens and not tokens:
    raise ConfigError(f'--model={name} reads character ids but --dataset={dataset_name} holds '
                      'float features: use --dataset=text')
  if tokens and not spec.tokens:
    raise ConfigError(f'--dataset={dataset_name} holds character ids: use --model=char_lstm '
                      f'(--model={name} reads float features)')
