"""Shared fixtures: small generated data and tiny learners, so the suite stays fast on 2 CPUs."""

import os
import shutil
import tempfile

import pytest
from hypothesis import settings

# Property tests explore fresh examples locally but are reproducible in CI.
settings.register_profile('ci', derandomize=True, deadline=None)
settings.register_profile('dev', deadline=None)
settings.load_profile('ci' if os.environ.get('CI') else 'dev')

os.environ.setdefault('DECSIM_CACHE', os.path.join(os.path.dirname(__file__), '..', '.cache'))

# One persistent XLA compilation cache for the session, shared by the xdist workers, the
# CLI subprocesses and the notebook kernels (they inherit the environment): many tests
# compile the same small programs. A size limit turns on JAX's file lock, so concurrent
# workers never read a half-written entry. The controller makes it (this file is loaded
# before the workers start, and they inherit the variable) and removes it at the end.
if 'DECSIM_TEST_XLA_CACHE' not in os.environ:
  os.environ['DECSIM_TEST_XLA_CACHE'] = tempfile.mkdtemp(prefix='decsim-test-xla-cache-')
XLA_CACHE = os.environ['DECSIM_TEST_XLA_CACHE']
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', XLA_CACHE)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(8 * 2 ** 30))

# The suite's time is XLA compiling many small programs, not running them: LLVM's -O0
# compiles them about 1.7x faster on the CPU (tests compare programs built under the same
# flags, so their equivalences hold as at -O2). Added to any XLA_FLAGS already set; the
# subprocesses (CLI, notebooks, fake-device runs) inherit it. Skipping LLVM's expensive
# passes saves about 10% more compile time (user CPU of tests/test_protocols.py: 60.4 s
# against 53.7 s).
TEST_XLA_FLAGS = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
if TEST_XLA_FLAGS not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()


def pytest_sessionfinish(session):
  if not hasattr(session.config, 'workerinput'):  # the controller, after every worker
    shutil.rmtree(XLA_CACHE, ignore_errors=True)


@pytest.fixture(scope='session')
def tiny_config():
  """A FedAvg config on 2,000 MNIST-1D samples that runs in a few seconds."""
  from decsim.experiment import ExperimentConfig
  return ExperimentConfig(num_samples=2000, nodes=20, sample_size=5, model='mlp', rounds=10,
                          eval_every=5, local_steps=2, eval_nodes=3)


def small_learner(**config):
  """``(learner, node data, dataset)`` of an ``ExperimentConfig`` with ``config``: the tiny
  logistic-regression setups the protocol tests build."""
  from decsim import experiment
  c = experiment.ExperimentConfig(model='logistic', local_steps=2, batch_size=10, lr=0.1, **config)
  dataset, data, _ = experiment.load_data(c)
  learner, _ = experiment.make_learner(c, dataset)
  return learner, data, dataset
