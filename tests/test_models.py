"""Models: shapes for 1-D and 2-D inputs, Xavier scale at init, PatchConv == flax Conv,
and shared vs independent initialisation of the node models."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decsim import experiment
from decsim.models import MODELS, build_model
from decsim.models.layers import PatchConv
from decsim.protocols.base import init_params


# The ResNets (shapes from jax.eval_shape) and the char-LSTM (character ids) are tested in
# test_models_cifar_text.py.
@pytest.mark.parametrize('model', [m for m in MODELS if m not in ('gn_resnet8', 'gn_resnet18',
                                                                  'char_lstm')])
@pytest.mark.parametrize('shape', [(40, 1), (28, 28, 1), (32, 32, 3)])
def test_models_map_inputs_to_logits(model, shape):
  module = build_model(model, 7).module
  x = jnp.ones((3, *shape))
  params = module.init(jax.random.key(0), x)['params']
  assert module.apply({'params': params}, x).shape == (3, 7)


@pytest.mark.parametrize('window,shape', [((5, 5), (2, 9, 8, 3)), ((4,), (2, 11, 3)),
                                          ((3, 3), (1, 5, 5, 1))])
def test_patch_conv_equals_flax_conv(window, shape):
  x = jax.random.normal(jax.random.key(0), shape)
  params = PatchConv(4, window).init(jax.random.key(1), x)
  ours = PatchConv(4, window).apply(params, x)
  theirs = nn.Conv(4, window, padding='SAME').apply(params, x)
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_weights_start_at_the_xavier_scale():
  """Every kernel's empirical variance is 2 / (fan_in + fan_out) (Glorot & Bengio 2010)
  within the sampling error of its size; biases start at zero."""
  module = build_model('lenet', 10).module
  params = module.init(jax.random.key(0), jnp.ones((1, 28, 28, 1)))['params']
  for name, layer in params.items():
    kernel = layer['kernel']
    receptive = int(np.prod(kernel.shape[:-2]))
    target = 2.0 / (receptive * (kernel.shape[-2] + kernel.shape[-1]))
    # var of a uniform sample: relative standard error sqrt(0.8 / size) (kurtosis 1.8)
    tolerance = 4 * np.sqrt(0.8 / kernel.size)
    assert abs(float(jnp.var(kernel)) / target - 1) < tolerance, name
    np.testing.assert_array_equal(layer['bias'], 0)


@pytest.mark.parametrize('init,equal', [('shared', True), ('independent', False)])
def test_shared_and_independent_init(tiny_config, init, equal):
  config = dataclasses.replace(tiny_config, protocol='dpsgd', init=init)
  exp = experiment.build(config)
  stacked = init_params(exp.learner, jax.random.key(0), 5)
  kernel = jax.tree.leaves(stacked)[-1]  # [5, ...]
  same = [bool(jnp.all(kernel[0] == kernel[i])) for i in range(1, 5)]
  assert all(same) if equal else not any(same)
