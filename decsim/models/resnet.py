"""GN-ResNets for 32x32 images: ResNet-8 and ResNet-18 with group norm instead of batch norm.

He et al. (2016, "Deep Residual Learning for Image Recognition", CVPR) define the
residual networks; the CIFAR forms used here keep their 3x3 stem without max-pooling:

* ``gn_resnet8``: the CIFAR family 6n+2 of He et al. (Section 4.2) with n = 1: a 3x3
  conv with 16 channels, then three stages of one basic block each (16, 32, 64
  channels; strides 1, 2, 2), global average pooling and a dense layer (78k
  parameters with 10 classes).
* ``gn_resnet18``: ResNet-18's four stages of two basic blocks (64, 128, 256, 512
  channels; strides 1, 2, 2, 2) on a 3x3 stem, the CIFAR adaptation most
  federated-learning papers train (11.2M parameters with 10 classes).

Every batch norm is a ``GroupNorm(2)`` with a learned scale and offset, as Hsieh
et al. (2020, "The Non-IID Data Quagmire of Decentralized Machine Learning",
ICML) do in their GN-ResNet-20 (github.com/kevinhsieh/non_iid_dml,
``apps/caffe/examples/cifar10/5parts/resnetgn20_train_val.prototxt.template``:
``GroupNorm`` with ``group_num: 2`` then ``Scale`` with a bias): batch statistics
differ between nodes holding different labels, and averaging models trained with
them breaks; group norm uses no batch statistics. A block is conv3x3 - GN - ReLU -
conv3x3 - GN, plus the input (through a 1x1 strided conv and GN where the shape
changes), then ReLU. Convolutions carry no bias (the norm's offset replaces it),
kernels start Xavier-uniform like every decsim model. Convolutions are
``PatchConv`` (im2col + matmul), which vmaps over nodes into batched matmuls on
XLA's CPU backend.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from decsim.models.layers import PatchConv, xavier_uniform

GN_GROUPS = 2  # Hsieh et al. (2020)


def _conv(features: int, window: int, ndim: int, stride: int = 1) -> PatchConv:
  return PatchConv(features, (window,) * ndim, stride=stride, use_bias=False)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with group norm and a residual connection."""

  features: int
  stride: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ndim = x.ndim - 2
    y = nn.relu(nn.GroupNorm(GN_GROUPS)(_conv(self.features, 3, ndim, self.stride)(x)))
    y = nn.GroupNorm(GN_GROUPS)(_conv(self.features, 3, ndim)(y))  # [B, *S / stride, F]
    if self.stride != 1 or x.shape[-1] != self.features:  # projection shortcut
      x = nn.GroupNorm(GN_GROUPS)(_conv(self.features, 1, ndim, self.stride)(x))
    return nn.relu(y + x)


class GNResNet(nn.Module):
  """A 3x3 stem, stages of basic blocks (the first block of a stage strides), global
  average pooling and a dense layer; works on one or two spatial axes."""

  num_classes: int
  stem: int
  stages: Sequence[tuple[int, int, int]]  # (channels, blocks, stride) per stage

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ndim = x.ndim - 2
    x = nn.relu(nn.GroupNorm(GN_GROUPS)(_conv(self.stem, 3, ndim)(x)))  # [B, *S, stem]
    for features, blocks, stride in self.stages:
      for b in range(blocks):
        x = BasicBlock(features, stride if b == 0 else 1)(x)
    x = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))  # [B, C] global average pooling
    return nn.Dense(self.num_classes, kernel_init=xavier_uniform)(x)


def gn_resnet8(num_classes: int) -> GNResNet:
  return GNResNet(num_classes, stem=16, stages=((16, 1, 1), (32, 1, 2), (64, 1, 2)))


def gn_resnet18(num_classes: int) -> GNResNet:
  return GNResNet(num_classes, stem=64,
                  stages=((64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)))
