"""Shared fixtures: small generated data and tiny learners, so the suite stays fast on 2 CPUs."""

import os

import pytest
from hypothesis import settings

# Property tests explore fresh examples locally but are reproducible in CI.
settings.register_profile('ci', derandomize=True, deadline=None)
settings.register_profile('dev', deadline=None)
settings.load_profile('ci' if os.environ.get('CI') else 'dev')

os.environ.setdefault('DECSIM_CACHE', os.path.join(os.path.dirname(__file__), '..', '.cache'))


@pytest.fixture(scope='session')
def tiny_config():
  """A FedAvg config on 2,000 MNIST-1D samples that runs in a few seconds."""
  from decsim.experiment import ExperimentConfig
  return ExperimentConfig(num_samples=2000, nodes=20, sample_size=5, model='mlp', rounds=10,
                          eval_every=5, local_steps=2, eval_nodes=3)
