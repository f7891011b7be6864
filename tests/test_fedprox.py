"""FedProx: mu = 0 is FedAvg byte for byte; the proximal step solves its closed form."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from decsim import experiment
from decsim.protocols.fedprox import proximal


def test_proximal_gradient_descent_reaches_the_closed_form():
  """min 0.5||w - a||^2 + mu/2 ||w - w0||^2 is (a + mu w0) / (1 + mu)."""
  a, w0, mu = jnp.array([3.0, -1.0, 0.5]), jnp.array([0.0, 2.0, 0.5]), 4.0
  tx = optax.chain(proximal(mu), optax.sgd(0.1))
  w, state = w0, tx.init(w0)
  for _ in range(300):
    updates, state = tx.update(w - a, state, w)  # gradient of the local loss only
    w = optax.apply_updates(w, updates)
  np.testing.assert_allclose(w, (a + mu * w0) / (1 + mu), rtol=1e-5)


def test_fedprox_mu_zero_is_fedavg_byte_for_byte(tiny_config, tmp_path):
  fedavg = dataclasses.replace(tiny_config, model='logistic', optimizer='sgd', momentum=0.9)
  experiment.run(fedavg, out_dir=tmp_path / 'fedavg', log=lambda _: None)
  experiment.run(dataclasses.replace(fedavg, protocol='fedprox', fedprox_mu=0.0),
                 out_dir=tmp_path / 'fedprox', log=lambda _: None)
  assert ((tmp_path / 'fedprox' / 'metrics.jsonl').read_bytes()
          == (tmp_path / 'fedavg' / 'metrics.jsonl').read_bytes())


def test_fedprox_mu_keeps_clients_near_the_global_model(tiny_config):
  """A large mu pulls each client's local model toward the global one."""
  def client_drift(mu):
    c = dataclasses.replace(tiny_config, protocol='fedprox', fedprox_mu=mu, model='logistic',
                            local_steps=20, lr=0.5, momentum=0.0, rounds=1, eval_every=1)
    exp = experiment.build(c)
    state = exp.protocol.init(jax.random.key(0), exp.data)
    start = state.extra.global_params
    state, _ = exp.protocol.round(state, exp.data)
    ids = np.nonzero(np.any(np.asarray(state.nodes.params['Dense_0']['kernel'])
                            != np.asarray(start['Dense_0']['kernel'])[None], axis=(1, 2)))[0]
    moved = state.nodes.params['Dense_0']['kernel'][ids] - start['Dense_0']['kernel'][None]
    return float(jnp.sqrt(jnp.mean(moved ** 2)))

  assert client_drift(1.0) < 0.5 * client_drift(0.0)  # lr * mu < 2: a stable pull
