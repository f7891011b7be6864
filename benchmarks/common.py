"""Workloads shared by the benchmarks: random MNIST-shaped (CIFAR-shaped, text-shaped) data
and a learner per model.

Random data is enough to time a step (the FLOPs do not depend on the values),
and needs no download.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from decsim import experiment
from decsim.data import partition as partition_lib
from decsim.data.sampler import NodeData
from decsim.data import text
from decsim.data.sources import ArrayDataset

INPUT_SHAPES = {'logistic': (28, 28, 1), 'mlp': (28, 28, 1), 'lenet': (28, 28, 1),
                'gn_lenet': (32, 32, 3), 'gn_resnet8': (32, 32, 3), 'gn_resnet18': (32, 32, 3),
                'char_lstm': (text.CONTEXT,)}
VOCABULARY = {'char_lstm': len(text.VOCAB)}  # models that read token ids: random ids


def random_dataset(input_shape, samples: int, seed: int = 0,
                   vocabulary: int | None = None) -> ArrayDataset:
  """Uniform features in [0, 1) and 10 classes, or with ``vocabulary`` random token ids
  labelled by random ids."""
  rng = np.random.default_rng(seed)
  if vocabulary is None:
    x = rng.random((samples, *input_shape), dtype=np.float32)
    y = rng.integers(0, 10, samples).astype(np.int32)
    return ArrayDataset('random', x, y, x[:100], y[:100], 10)
  x = rng.integers(0, vocabulary, (samples, *input_shape)).astype(np.int32)
  y = rng.integers(0, vocabulary, samples).astype(np.int32)
  return ArrayDataset('random_text', x, y, x[:100], y[:100], vocabulary)


MAX_SAMPLES = 60_000  # MNIST's train set: the data stays the same size above ~940 nodes


def workload(model: str, nodes: int, *, samples_per_node: int = 64, local_steps: int = 1,
             batch_size: int = 32, node_chunk: int = -1, protocol: str = 'dpsgd',
             sample_size: int = 10, degree: int = 4, param_dtype: str = 'float32',
             mixing: str = 'auto', views: str = 'global'):
  """(config, learner, data) for ``model`` at ``nodes`` nodes on random data.

  ``min(nodes * samples_per_node, MAX_SAMPLES)`` samples, split IID; a node with
  fewer samples than a batch reuses them (the FLOPs of a step do not change).
  """
  config = experiment.ExperimentConfig(
      protocol=protocol, model=model, nodes=nodes, local_steps=local_steps,
      batch_size=batch_size, node_chunk=node_chunk, topology='kregular', degree=degree,
      sample_size=min(sample_size, nodes), momentum=0.0, param_dtype=param_dtype,
      mixing=mixing, views=views)
  dataset = random_dataset(INPUT_SHAPES[model], min(nodes * samples_per_node, MAX_SAMPLES),
                           vocabulary=VOCABULARY.get(model))
  part = partition_lib.make_partition('iid', dataset.y_train, nodes, seed=0)
  data = NodeData(jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train), part.idx,
                  part.sizes)
  learner, _ = experiment.make_learner(config, dataset)
  return config, learner, data


def machine() -> dict:
  import os
  import platform
  return {'platform': jax.default_backend(), 'devices': [str(d) for d in jax.devices()],
          'cpu_count': os.cpu_count(), 'processor': platform.processor() or platform.machine(),
          'jax': jax.__version__}


def available_memory_bytes() -> tuple[int, str]:
  """Memory a benchmark may fill: the device's limit where it reports one, else the host's
  available RAM."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'bytes_limit' in stats:
    return int(stats['bytes_limit']), 'device bytes_limit'
  import psutil
  return int(psutil.virtual_memory().available), 'host available RAM'


def replace(config, **kw):
  return dataclasses.replace(config, **kw)
