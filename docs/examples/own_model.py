"""Your own model: a flax module that maps a batch to logits, trained by D-PSGD.

Run: python docs/examples/own_model.py [OUT_DIR]
"""

import sys

from flax import linen as nn

import decsim


class WideMLP(nn.Module):
  """Two hidden layers of 128 with GELU; flattens whatever comes in."""

  num_classes: int

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))  # [B, features]
    x = nn.gelu(nn.Dense(128)(x))
    x = nn.gelu(nn.Dense(128)(x))
    return nn.Dense(self.num_classes)(x)  # [B, classes]


def main(out_dir=None):
  config = decsim.ExperimentConfig(protocol='dpsgd', nodes=8, degree=2, num_samples=1000,
                                   rounds=10, eval_every=5, local_steps=2)
  return decsim.run(config, out_dir=out_dir, module=WideMLP(num_classes=10),
                    log=lambda _: None)


if __name__ == '__main__':
  print(main(sys.argv[1] if len(sys.argv) > 1 else None)['final_accuracy'])
