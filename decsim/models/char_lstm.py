"""A character LSTM for next-character prediction, the Shakespeare model of LEAF.

LEAF (Caldas et al., 2018, "LEAF: A Benchmark for Federated Settings",
arXiv:1812.01097; github.com/TalwalkarLab/leaf, ``models/shakespeare/stacked_lstm.py``,
``ClientModel.create_model``) embeds each of the last 80 characters in 8 dimensions,
runs a two-layer LSTM of 256 units and reads the next character from a dense layer
on the last step's output; McMahan et al. (2017) train the same kind of model on
Shakespeare's plays. ``CharLSTM`` is that model with a smaller default width (128
units: a round on a CPU stays cheap), on ``[B, T]`` character ids of any length T.
The label of a sample is the character that follows its T characters, so accuracy
is next-character accuracy.

Deviations: weights start Xavier-uniform and biases at zero like every decsim model
(LEAF's TF ``BasicLSTMCell`` adds a constant 1 to the forget gate); the cell is
flax's ``OptimizedLSTMCell``. Inputs may arrive as floats (decsim initialises every
model on a float32 sample); they are character ids and are cast to int32.
"""

import jax
import jax.numpy as jnp
import flax.linen as nn

from decsim.models.layers import xavier_uniform


class CharLSTM(nn.Module):
  """Embedding - stacked LSTM - dense on the last step: ``[B, T]`` ids -> ``[B, classes]``."""

  num_classes: int  # the vocabulary: labels are character ids too
  hidden: int = 128
  layers: int = 2
  embed: int = 8

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    tokens = x.reshape(x.shape[0], -1).astype(jnp.int32)  # [B, T]
    h = nn.Embed(self.num_classes, self.embed, embedding_init=xavier_uniform)(tokens)
    h = h.astype(jnp.float32)  # [B, T, E]; compute stays float32 with bfloat16 params
    for _ in range(self.layers):
      cell = nn.OptimizedLSTMCell(self.hidden, kernel_init=xavier_uniform,
                                  recurrent_kernel_init=xavier_uniform)
      h = nn.RNN(cell)(h)  # [B, T, H]
    return nn.Dense(self.num_classes, kernel_init=xavier_uniform)(h[:, -1])  # [B, classes]
