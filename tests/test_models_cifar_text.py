"""GN-ResNet-8/18 and the char-LSTM with its generated text (issue 17, item 5).

Vectorised local training equals a Python loop of single-node training for every new
model; parameter counts follow from the architectures; group norm makes a sample's
logits independent of its batch; the text dataset is deterministic, non-overlapping
and labelled by the next character; a char-LSTM run goes through the ``decsim``
command line.
"""

import dataclasses
import json
import re
import sys
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decsim import experiment
from decsim.data import partition as partition_lib
from decsim.data import sources, text
from decsim.errors import ConfigError
from decsim.models import build_model
from decsim.models.layers import PatchConv
from decsim.protocols.base import train_nodes
from decsim.rng import Stream, node_keys


def _param_count(module, shape, dtype=jnp.float32) -> int:
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, *shape), dtype))
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes['params']))


def _resnet_count(stem: int, stages, classes: int, in_channels: int = 3) -> int:
  """Parameters of a CIFAR ResNet by hand: bias-free convolutions, a scale and an offset
  per channel of every norm, a projection (1x1 conv + norm) where a block changes shape."""
  conv = lambda k, cin, cout: k * k * cin * cout
  count = conv(3, in_channels, stem) + 2 * stem
  cin = stem
  for width, blocks, stride in stages:
    for b in range(blocks):
      count += conv(3, cin, width) + conv(3, width, width) + 4 * width
      if (b == 0 and stride != 1) or cin != width:
        count += conv(1, cin, width) + 2 * width
      cin = width
  return count + cin * classes + classes


def test_resnet_parameter_counts_follow_the_architecture():
  resnet8 = _resnet_count(16, ((16, 1, 1), (32, 1, 2), (64, 1, 2)), 10)
  resnet18 = _resnet_count(64, ((64, 2, 1), (128, 2, 2), (256, 2, 2), (512, 2, 2)), 10)
  assert _param_count(build_model('gn_resnet8', 10).module, (32, 32, 3)) == resnet8
  assert _param_count(build_model('gn_resnet18', 10).module, (32, 32, 3)) == resnet18
  # The CIFAR ResNet-18 (He et al. with a 3x3 stem) has 11,173,962 parameters with batch
  # norm; group norm has the same scale and offset per channel.
  assert resnet18 == 11_173_962


@pytest.mark.parametrize('model', ['gn_resnet8', 'gn_resnet18'])
@pytest.mark.parametrize('shape', [(32, 32, 3), (28, 28, 1), (40, 1)])
def test_resnets_map_images_and_signals_to_logits(model, shape):
  module = build_model(model, 7).module
  x = jnp.zeros((3, *shape))
  params = jax.eval_shape(module.init, jax.random.key(0), x)
  assert jax.eval_shape(module.apply, params, x).shape == (3, 7)


def test_char_lstm_maps_character_ids_to_logits_over_the_vocabulary():
  module = build_model('char_lstm', len(text.VOCAB)).module
  ids = jnp.zeros((3, text.CONTEXT), jnp.int32)
  params = jax.eval_shape(module.init, jax.random.key(0), ids)
  assert jax.eval_shape(module.apply, params, ids).shape == (3, len(text.VOCAB))
  # embedding 61x8; two LSTM layers of 4 gates (input kernel, recurrent kernel, bias); dense
  h, e, v = 128, 8, len(text.VOCAB)
  expected = v * e + 4 * (e * h + h * h + h) + 4 * (h * h + h * h + h) + h * v + v
  assert _param_count(module, (text.CONTEXT,), jnp.int32) == expected


@pytest.mark.parametrize('window,stride,shape', [(3, 2, (2, 8, 8, 3)), (1, 2, (2, 8, 8, 3)),
                                                 (3, 2, (2, 9, 4)), (3, 1, (1, 5, 5, 2))])
def test_strided_patch_conv_equals_flax_conv_padded_like_pytorch(window, stride, shape):
  x = jax.random.normal(jax.random.key(0), shape)
  ndim = len(shape) - 2
  conv = PatchConv(4, (window,) * ndim, stride=stride, use_bias=False)
  params = conv.init(jax.random.key(1), x)
  pad = [((window - 1) // 2, window // 2)] * ndim
  theirs = nn.Conv(4, (window,) * ndim, strides=stride, padding=pad, use_bias=False)
  np.testing.assert_allclose(conv.apply(params, x), theirs.apply(params, x), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.slow  # compiling ResNet-8 takes ~75 s on the busy 2-core CPU
def test_group_norm_resnet_scores_a_sample_the_same_in_any_batch():
  """No batch statistics (the reason for group norm under non-IID averaging): a sample's
  logits do not depend on the samples batched with it."""
  module = build_model('gn_resnet8', 10).module
  x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3))
  others = jnp.concatenate([x[:1], x[1:] * 3.0 + 1.0])  # sample 0 with other companions

  @jax.jit
  def logits(key, x, others):  # one compilation for both batches
    params = module.init(key, x)
    return module.apply(params, x), module.apply(params, others)

  together, apart = logits(jax.random.key(1), x, others)
  np.testing.assert_allclose(together[0], apart[0], rtol=1e-5, atol=1e-5)
  assert not np.allclose(together[1], apart[1], atol=1e-3)


# ------------------------------------------------------------------ vmapped == per-node loop


def _tiny_images(samples=48, shape=(8, 8, 3)) -> sources.ArrayDataset:
  rng = np.random.default_rng(0)
  x = rng.random((samples, *shape), dtype=np.float32)
  y = rng.integers(0, 10, samples).astype(np.int32)
  return sources.ArrayDataset('tiny_images', x, y, x[:8], y[:8], 10)


def _tiny_config(tiny_config, model, dataset='mnist1d', **kw):
  return dataclasses.replace(tiny_config, model=model, dataset=dataset, nodes=3, sample_size=3,
                             partition='iid', optimizer='sgd', momentum=0.9, local_steps=2,
                             batch_size=4, eval_nodes=0, **kw)


def _loop_equals_vmap(exp, node_chunk):
  """Local training of every node, vmapped (or in chunks), against a Python loop."""
  n = exp.config.nodes
  params = jax.vmap(exp.learner.init_params)(jax.random.split(jax.random.key(1), n))
  opt = jax.vmap(exp.learner.tx.init)(params)
  keys = node_keys(jax.random.key(0), 3, jnp.arange(n), Stream.BATCH)
  learner = dataclasses.replace(exp.learner, node_chunk=node_chunk)
  batched = jax.jit(lambda p, o, k: train_nodes(learner, p, o, k, exp.data, jnp.arange(n)))(
      params, opt, keys)
  one_node = jax.jit(lambda p, o, k, idx, size: exp.learner.local_update(
      p, o, k, exp.data.x, exp.data.y, idx, size))
  for i in range(n):
    one = one_node(jax.tree.map(lambda p: p[i], params), jax.tree.map(lambda o: o[i], opt),
                   keys[i], exp.data.idx[i], exp.data.sizes[i])
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(batched.params)):
      np.testing.assert_allclose(a, b[i], rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(one.loss, batched.loss[i], rtol=1e-5)
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(batched.params),
                                                              jax.tree.leaves(params)))
  assert moved > 1e-4  # the nodes trained


@pytest.mark.slow  # ResNet-8 with chunks of 2: 280 s on the busy 2-core CPU (compilation)
@pytest.mark.parametrize('model,node_chunk', [('gn_resnet8', 2), ('gn_resnet8', 0),
                                              ('gn_resnet18', 0)])
def test_vmapped_resnet_training_equals_loop_over_nodes(tiny_config, model, node_chunk):
  exp = experiment.build(_tiny_config(tiny_config, model), dataset=_tiny_images())
  _loop_equals_vmap(exp, node_chunk)


@pytest.fixture(scope='module')
def text_experiment(tiny_config):
  return experiment.build(_tiny_config(tiny_config, 'char_lstm', 'text', num_samples=60))


def test_vmapped_char_lstm_training_equals_loop_over_nodes(text_experiment):
  _loop_equals_vmap(text_experiment, 0)


# ------------------------------------------------------------------------- the text dataset


def test_text_is_deterministic_in_the_seed():
  a, b, c = (text.load_text(400, 4, seed) for seed in (3, 3, 4))
  for key in ('x_train', 'y_train', 'x_test', 'y_test', 'groups'):
    np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
  assert not np.array_equal(a.x_train, c.x_train)


def test_text_samples_are_windows_labelled_by_the_next_character():
  data = text.load_text(400, 4, 0)
  assert data.x_train.shape[1:] == (text.CONTEXT,) and data.x_train.dtype == np.int32
  assert len(data.y_train) + len(data.y_test) == 400
  assert data.num_classes == len(text.VOCAB) and data.y_train.max() < data.num_classes
  same_role = data.groups[1:] == data.groups[:-1]  # consecutive windows of one role
  # the next window of a role is this one shifted by one character, ending in the label
  np.testing.assert_array_equal(data.x_train[1:][same_role][:, -1], data.y_train[:-1][same_role])
  np.testing.assert_array_equal(data.x_train[1:][same_role][:, :-1],
                                data.x_train[:-1][same_role][:, 1:])
  assert sorted(set(data.groups.tolist())) == [0, 1, 2, 3]


def test_text_test_windows_share_no_stretch_with_train_windows():
  data = text.load_text(300, 3, 1)
  train = {text.decode(w) for w in data.x_train}
  assert not any(text.decode(w) in train for w in data.x_test)


def test_text_sentences_start_with_a_capital():
  """Spelling rules a model can learn: after a sentence's end comes a capital or a new line."""
  data = text.load_text(400, 1, 0)
  rows = np.arange(len(data.y_train))  # the role's train windows, in order
  lines = text.decode(data.x_train[rows[0]]) + text.decode(data.y_train[rows])
  after_end = re.findall(r'[.!?;]([ \n])(.)', lines)
  assert len(after_end) > 5
  assert all(c.isupper() or (space == '\n') for space, c in after_end)


def test_natural_partition_gives_each_node_one_role(text_experiment):
  data = text_experiment.dataset
  part = partition_lib.make_partition('natural', data.y_train, 3, seed=0, groups=data.groups)
  for node, row in enumerate(partition_lib.to_lists(part)):
    assert set(data.groups[row].tolist()) == {node}


def test_too_few_text_samples_for_the_roles_is_a_one_line_error():
  with pytest.raises(sources.DataError, match='--num_samples >= 50'):
    text.load_text(20, 10, 0)


@pytest.mark.parametrize('model,dataset,named', [('char_lstm', 'mnist1d', '--dataset=text'),
                                                 ('mlp', 'text', '--model=char_lstm')])
def test_token_model_and_dataset_must_match(tiny_config, model, dataset, named):
  config = dataclasses.replace(tiny_config, model=model, dataset=dataset, num_samples=200,
                               partition='iid')
  with pytest.raises(ConfigError, match=named):
    experiment.build(config)


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow  # ~80 s on the busy 2-core CPU (compiles a FedAvg chunk and the evaluation)
def test_char_lstm_run_through_the_command_line(tmp_path, capsys):
  """``decsim --model=char_lstm --dataset=text``: rows of next-character accuracy, and
  local training lowers the test loss from the uniform guess's."""
  from launch import simulate
  argv = ['decsim', f'--out={tmp_path / "run"}', '--model=char_lstm', '--dataset=text',
          '--num_samples=400', '--nodes=4', '--sample_size=4', '--partition=natural',
          '--rounds=4', '--eval_every=2', '--local_steps=4', '--batch_size=8',
          '--optimizer=adam', '--lr=0.01']
  simulate.FLAGS.unparse_flags()
  with mock.patch.object(sys, 'argv', argv), pytest.raises(SystemExit) as exit_:
    simulate.run_main()
  simulate.FLAGS.unparse_flags()
  assert exit_.value.code in (None, 0)
  run = tmp_path / 'run'
  rows = [json.loads(l) for l in (run / 'metrics.jsonl').read_text().splitlines()]
  assert [r['round'] for r in rows] == [0, 2, 4]
  assert abs(rows[0]['loss'] - np.log(len(text.VOCAB))) < 0.1  # ~uniform at Xavier init
  assert rows[-1]['loss'] < rows[0]['loss'] - 0.3
  assert 0 <= rows[-1]['accuracy'] <= 1
  config = json.loads((run / 'config.json').read_text())
  assert (config['model'], config['dataset']) == ('char_lstm', 'text')
  assert 'final_accuracy' in capsys.readouterr().out
