"""Per-node loop baselines: how loop-based simulators run nodes, for the same rounds as decsim.

* ``loop_jax``: fedjax's default backend — one jitted single-node call per node
  per round (the same ``local_update`` decsim vmaps), each node's model its own
  pytree, then a jitted per-node neighbour average (D-PSGD) or server average
  (FedAvg) over Python lists.
* ``loop_torch`` (when torch is installed): how decentralizepy and gossipy run
  nodes — one ``torch.nn.Module`` and one ``torch.optim.SGD`` per node, a Python
  loop of forward/backward/step, then ``state_dict`` neighbour averaging
  (decentralizepy's ``Sharing``: ``sum_j w_ij * state_dict_j[key]`` per key).

Every round function here returns its models, so timings include all the work.
"""

import jax
import jax.numpy as jnp
import numpy as np

from decsim.rng import Stream, node_keys


def make_loop_dpsgd_round(learner, data, topology):
  """Returns ``round(models, opt_states, r) -> (models, opt_states)`` over Python lists."""
  step = jax.jit(lambda p, o, k, idx_row, size: learner.local_update(p, o, k, data.x, data.y,
                                                                     idx_row, size))
  idx = np.asarray(topology.idx)
  weights = np.asarray(topology.weights)

  @jax.jit
  def average(models, w):  # models: k pytrees, w [k]
    return jax.tree.map(lambda *leaves: sum(wi * l for wi, l in zip(w, leaves)), *models)

  def round_(models, opt_states, r):
    n = len(models)
    keys = node_keys(jax.random.key(0), r, jnp.arange(n), Stream.BATCH)
    trained, new_opt = [], []
    for i in range(n):
      result = step(models[i], opt_states[i], keys[i], data.idx[i], data.sizes[i])
      trained.append(result.params)
      new_opt.append(result.opt_state)
    mixed = [average([trained[j] for j in idx[i]], jnp.asarray(weights[i])) for i in range(n)]
    return mixed, new_opt

  return round_


def make_loop_fedavg_round(learner, data, sample_size: int):
  """Returns ``round(global_params, r) -> global_params``: s sampled clients in a Python loop."""
  step = jax.jit(lambda p, o, k, idx_row, size: learner.local_update(p, o, k, data.x, data.y,
                                                                     idx_row, size))
  n = data.idx.shape[0]

  @jax.jit
  def average(models, w):  # models: s pytrees, w [s]
    w = w / jnp.sum(w)
    return jax.tree.map(lambda *leaves: sum(wi * l for wi, l in zip(w, leaves)), *models)

  def round_(global_params, r):
    rng = np.random.default_rng(int(r))
    ids = rng.choice(n, sample_size, replace=False)
    keys = node_keys(jax.random.key(0), r, jnp.asarray(ids), Stream.BATCH)
    trained = [step(global_params, learner.tx.init(global_params), keys[i], data.idx[c],
                    data.sizes[c]).params for i, c in enumerate(ids)]
    return average(trained, data.sizes[ids].astype(jnp.float32))

  return round_


def unstack(stacked, n):
  return [jax.tree.map(lambda x: x[i], stacked) for i in range(n)]


# ------------------------------------------------------------------ PyTorch


def torch_available() -> bool:
  try:
    import torch  # noqa: F401
  except ImportError:
    return False
  return True


def torch_module(model: str, input_shape, num_classes: int = 10):
  """The decsim model of that name as a ``torch.nn.Module`` (same layer sizes)."""
  import torch.nn as tnn
  features = int(np.prod(input_shape))
  if model == 'logistic':
    return tnn.Sequential(tnn.Flatten(), tnn.Linear(features, num_classes))
  if model == 'mlp':
    return tnn.Sequential(tnn.Flatten(), tnn.Linear(features, 200), tnn.ReLU(),
                          tnn.Linear(200, num_classes))
  if model == 'lenet':  # 28x28x1, 'same' padding, as decsim's LeNet5
    return tnn.Sequential(
        tnn.Conv2d(input_shape[-1], 6, 5, padding='same'), tnn.ReLU(), tnn.MaxPool2d(2),
        tnn.Conv2d(6, 16, 5, padding='same'), tnn.ReLU(), tnn.MaxPool2d(2), tnn.Flatten(),
        tnn.Linear(16 * (input_shape[0] // 4) * (input_shape[1] // 4), 120), tnn.ReLU(),
        tnn.Linear(120, 84), tnn.ReLU(), tnn.Linear(84, num_classes))
  raise ValueError(f'no torch baseline for model {model!r}: use logistic, mlp or lenet')


class TorchLoop:
  """N torch modules with an SGD optimiser each; D-PSGD and FedAvg rounds as Python loops."""

  def __init__(self, model: str, input_shape, x: np.ndarray, y: np.ndarray, idx: np.ndarray,
               sizes: np.ndarray, *, lr: float = 0.05, batch_size: int = 32,
               local_steps: int = 1, seed: int = 0, threads: int = 0):
    import torch
    if threads > 0:  # 0: torch's default (one per core). On a contended host 1 avoids
      torch.set_num_threads(threads)  # OpenMP spin-waits (measured 60x slower with 2 there)
    torch.manual_seed(seed)
    self.torch = torch
    self.n = idx.shape[0]
    self.x = torch.from_numpy(np.array(x.transpose(0, 3, 1, 2) if x.ndim == 4 else x))
    self.y = torch.from_numpy(y.astype(np.int64))
    self.idx, self.sizes = idx, sizes
    self.batch_size, self.local_steps, self.lr = batch_size, local_steps, lr
    self.rng = np.random.default_rng(seed)
    template = torch_module(model, input_shape)
    self.models = [torch_module(model, input_shape) for _ in range(self.n)]
    for m in self.models:
      m.load_state_dict(template.state_dict())
    self.opts = [torch.optim.SGD(m.parameters(), lr=lr) for m in self.models]
    self.loss = torch.nn.CrossEntropyLoss()

  def _train(self, i: int) -> None:
    size = int(self.sizes[i])
    for _ in range(self.local_steps):
      rows = self.idx[i, self.rng.integers(0, size, self.batch_size)]
      ids = self.torch.from_numpy(rows.astype(np.int64))
      self.opts[i].zero_grad()
      self.loss(self.models[i](self.x[ids]), self.y[ids]).backward()
      self.opts[i].step()

  def dpsgd_round(self, topo_idx: np.ndarray, topo_w: np.ndarray) -> None:
    """Train every node, then decentralizepy's state_dict averaging over neighbours."""
    for i in range(self.n):
      self._train(i)
    with self.torch.no_grad():
      states = [m.state_dict() for m in self.models]
      mixed = []
      for i in range(self.n):
        avg = {}
        for slot, (j, w) in enumerate(zip(topo_idx[i], topo_w[i])):
          if w == 0 and slot:
            continue
          for key, value in states[j].items():
            avg[key] = avg[key] + value * float(w) if key in avg else value * float(w)
        mixed.append(avg)
      for m, sd in zip(self.models, mixed):
        m.load_state_dict(sd)

  def fedavg_round(self, sample_size: int) -> None:
    """s sampled clients load the server model, train, and the server averages them."""
    with self.torch.no_grad():
      server = self.models[0].state_dict()
      server = {k: v.clone() for k, v in server.items()}
    ids = self.rng.choice(self.n, sample_size, replace=False)
    for c in ids:
      self.models[c].load_state_dict(server)
      self._train(int(c))
    with self.torch.no_grad():
      w = self.sizes[ids].astype(np.float64)
      w = w / w.sum()
      states = [self.models[c].state_dict() for c in ids]
      avg = {k: sum(float(wi) * sd[k] for wi, sd in zip(w, states)) for k in server}
      self.models[0].load_state_dict(avg)
