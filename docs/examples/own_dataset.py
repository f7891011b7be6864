"""Your own dataset as arrays: FedAvg on Gaussian blobs split Dirichlet(0.3) over 20 nodes.

Run: python docs/examples/own_dataset.py [OUT_DIR]
"""

import sys

import numpy as np

import decsim


def blobs(samples: int, classes: int = 4, dim: int = 8, seed: int = 0):
  """Gaussian blobs: a linearly separable classification task."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(0, 3, (classes, dim))
  y = rng.integers(0, classes, samples).astype(np.int32)
  x = (centres[y] + rng.normal(0, 1, (samples, dim))).astype(np.float32)
  return x, y


def main(out_dir=None):
  x, y = blobs(1200)
  dataset = decsim.ArrayDataset(name='blobs', x_train=x[:1000], y_train=y[:1000],
                                x_test=x[1000:], y_test=y[1000:], num_classes=4)
  config = decsim.ExperimentConfig(protocol='fedavg', nodes=20, sample_size=5, model='logistic',
                                   partition='dirichlet', alpha=0.3, rounds=20, eval_every=10,
                                   lr=0.1, momentum=0.0)
  return decsim.run(config, out_dir=out_dir, dataset=dataset, log=lambda _: None)


if __name__ == '__main__':
  print(main(sys.argv[1] if len(sys.argv) > 1 else None)['final_accuracy'])
