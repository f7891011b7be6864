"""The recipes of docs/extending.md run, and do what they say."""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import decsim

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / 'docs' / 'examples'


def _example(name: str):
  spec = importlib.util.spec_from_file_location(f'example_{name}', EXAMPLES / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_own_dataset_learns_separable_blobs(tmp_path):
  summary = _example('own_dataset').main(tmp_path / 'run')
  assert summary['status'] == 'completed' and summary['final_accuracy'] > 0.8


def test_own_model_is_the_model_trained(tmp_path):
  example = _example('own_model')
  config = decsim.ExperimentConfig(protocol='dpsgd', nodes=4, degree=2, num_samples=400,
                                   rounds=2, eval_every=1)
  exp = decsim.build(config, module=example.WideMLP(num_classes=10))
  shapes = jax.tree.map(jnp.shape, exp.learner.init_params(jax.random.key(0)))
  assert shapes['Dense_0']['kernel'][1] == 128 and len(shapes) == 3
  assert example.main(tmp_path / 'run')['rounds'] == 10


def test_own_protocol_sends_nothing_and_scores_its_nodes(tmp_path):
  summary = _example('own_protocol').main(tmp_path / 'run')
  rows = [json.loads(l) for l in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert summary['bytes_total'] == 0 and all(r['models_sent'] == 0 for r in rows)
  assert 'consensus_accuracy' in rows[-1] and summary['node_steps_per_second'] > 0


def test_own_aggregator_is_the_mean_when_nothing_is_clipped_and_bounds_an_outlier(tmp_path):
  example = _example('own_aggregator')
  rng = np.random.default_rng(0)
  models = {'w': jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)}
  weights = jnp.ones(6)
  loose, _ = example.clipped_mean(1e9).apply(models, weights, ())
  np.testing.assert_allclose(loose['w'], decsim.weighted_average(models, weights)['w'], atol=1e-6)
  outlier = {'w': models['w'].at[0].set(1e4)}
  tight, _ = example.clipped_mean(1.0).apply(outlier, weights, ())
  assert float(jnp.max(jnp.abs(tight['w']))) < 1e4 / 6  # the mean would be pulled to ~1667
  assert example.main(tmp_path / 'run')['status'] == 'completed'
