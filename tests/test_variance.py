"""Variance correction (Tian et al. 2024): exact target variance and unchanged mean, a
no-op on identical models, biases and normalisation left alone, the 1/k shrinkage it
repairs, and its targets under D-PSGD mixing and FedAvg aggregation."""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from decsim import experiment, metrics, mixing
from decsim.models import build_model
from decsim.protocols.base import broadcast
from decsim.studies import variance as study
from decsim.topology import build_topology

# Jitted once per configuration: eager dispatch of the many small ops is the slow part.
correct = jax.jit(mixing.variance_correct, static_argnums=2)
mix_corrected = jax.jit(mixing.mix_corrected, static_argnums=(2, 3))


def _stack(key, n, shapes):
  keys = jax.random.split(key, len(shapes))
  return {name: jax.random.normal(k, (n, *shape)) * (1.0 + jnp.arange(n).reshape((-1,) + (1,) * len(shape)))
          for k, (name, shape) in zip(keys, shapes.items())}


@pytest.mark.parametrize('unbiased', [False, True])
def test_corrected_tensor_has_target_variance_and_same_mean(unbiased):
  stacked = {'Dense_0': _stack(jax.random.key(0), 5, {'kernel': (30, 20)})['kernel']}
  stacked = {'Dense_0': {'kernel': stacked['Dense_0'] + 3.0}}  # a non-zero mean
  target = {'Dense_0': {'kernel': jnp.array([0.1, 2.0, 0.5, 7.0, 1e-3])}}
  vc = mixing.VarianceCorrection(unbiased=unbiased)
  out = correct(stacked, target, vc)['Dense_0']['kernel']
  flat, before = np.asarray(out).reshape(5, -1), np.asarray(stacked['Dense_0']['kernel']).reshape(5, -1)
  np.testing.assert_allclose(flat.var(1, ddof=int(unbiased)), target['Dense_0']['kernel'], rtol=1e-4)
  np.testing.assert_allclose(flat.mean(1), before.mean(1), rtol=1e-5)
  # A partial correction moves the std ratio of the way to the target std.
  half = correct(stacked, target, dataclasses.replace(vc, ratio=0.5))
  std = np.asarray(half['Dense_0']['kernel']).reshape(5, -1).std(1, ddof=int(unbiased))
  s0, s1 = before.std(1, ddof=int(unbiased)), np.sqrt(target['Dense_0']['kernel'])
  np.testing.assert_allclose(std, 0.5 * (s0 + s1), rtol=1e-4)


def test_correcting_identical_models_is_a_no_op():
  one = _stack(jax.random.key(1), 1, {'kernel': (16, 8), 'bias': (8,)})
  stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (8, *x.shape[1:])), one)
  topo = build_topology('kregular', 8, degree=3)
  vc = mixing.VarianceCorrection(biases=True)
  for target in mixing.VC_TARGETS:
    out = mix_corrected(topo, stacked, dataclasses.replace(vc, target=target))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), out, stacked)


def test_biases_and_normalisation_left_alone():
  class Net(nn.Module):  # named like the models: Dense_0, GroupNorm_0, Dense_1
    @nn.compact
    def __call__(self, x):
      return nn.Dense(4)(nn.GroupNorm(num_groups=2)(nn.Dense(16)(x)))

  module = Net()
  keys = jax.random.split(jax.random.key(2), 4)
  stacked = jax.vmap(lambda k: module.init(k, jnp.ones((1, 8)))['params'])(keys)
  # Non-trivial biases and norm parameters, so that a rescale would show.
  stacked = jax.tree.map(lambda x: x + jax.random.normal(jax.random.key(3), x.shape), stacked)
  target = jax.tree.map(lambda x: jnp.full((4,), 9.0), stacked)
  for biases in (False, True):
    out = correct(stacked, target, mixing.VarianceCorrection(biases=biases))
    norm = 'GroupNorm_0'
    for leaf in ('scale', 'bias'):
      np.testing.assert_array_equal(out[norm][leaf], stacked[norm][leaf])
    for dense in ('Dense_0', 'Dense_1'):
      assert not np.allclose(out[dense]['kernel'], stacked[dense]['kernel'])
      same_bias = np.array_equal(out[dense]['bias'], stacked[dense]['bias'])
      assert same_bias == (not biases)


def test_averaging_k_independent_xavier_models_shrinks_variance_by_1_over_k():
  # MLP 784-200-10: Dense_0 has 157k Xavier-uniform weights. The sample variance of
  # P iid entries has relative sd sqrt((kurtosis - 1) / P) < 0.3%, so 5% is a wide
  # tolerance (> 15 sd); averaging k uncorrelated models gives sigma^2 / k.
  spec = build_model('mlp', 10)
  init = lambda k: spec.module.init(k, jnp.zeros((1, 784)))['params']
  all_models = jax.jit(jax.vmap(init))(jax.random.split(jax.random.key(0), 8))
  for k in (2, 4, 8):
    models = jax.tree.map(lambda x: x[:k], all_models)
    avg = jax.tree.map(lambda x: jnp.mean(x, 0, keepdims=True), models)
    kernel = lambda t: t['Dense_0']['kernel']
    before = np.mean(np.asarray(mixing.layer_variance(models)['Dense_0']['kernel']))
    after = float(mixing.layer_variance(avg)['Dense_0']['kernel'][0])
    xavier = metrics.xavier_variance(kernel(models).shape[1:])
    np.testing.assert_allclose(before, xavier, rtol=0.05)
    np.testing.assert_allclose(after * k, before, rtol=0.05)
    # The correction restores the mean variance of the models averaged.
    target = jax.tree.map(lambda v: jnp.mean(v, keepdims=True), mixing.layer_variance(models))
    fixed = correct(avg, target, mixing.VarianceCorrection())
    np.testing.assert_allclose(float(mixing.layer_variance(fixed)['Dense_0']['kernel'][0]),
                               before, rtol=1e-4)


def test_dpsgd_correction_hits_the_mean_variance_of_the_averaged_neighbours():
  stacked = _stack(jax.random.key(4), 10, {'kernel': (12, 6)})
  topo = build_topology('kregular', 10, degree=3, seed=1)
  var = np.asarray(stacked['kernel']).reshape(10, -1).var(1)
  W = np.asarray(topo.dense())
  plain = (W > 0) / (W > 0).sum(1, keepdims=True)
  for target, expected in (('received', plain @ var), ('follow_beta', W @ var), ('self', var)):
    out = mix_corrected(topo, stacked, mixing.VarianceCorrection(target=target))
    got = np.asarray(out['kernel']).reshape(10, -1)
    np.testing.assert_allclose(got.var(1), expected, rtol=1e-4)
    mixed = np.asarray(mixing.mix(topo, stacked)['kernel']).reshape(10, -1)
    np.testing.assert_allclose(got.mean(1), mixed.mean(1), rtol=1e-4, atol=1e-6)


def test_fedavg_correction_gives_the_clients_mean_variance(tiny_config):
  c = dataclasses.replace(tiny_config, nodes=8, sample_size=4, variance_correction='received',
                          weighting='uniform')
  exp = experiment.build(c)
  state = exp.protocol.init(jax.random.key(0), exp.data)
  new, _ = jax.jit(exp.protocol.round)(state, exp.data)
  # The round's clients are the rows that changed; their models are in the node rows.
  changed = np.asarray(jax.tree.leaves(jax.tree.map(
      lambda a, b: jnp.any(a != b, axis=tuple(range(1, a.ndim))), state.nodes.params,
      new.nodes.params))[0])
  assert changed.sum() == 4
  clients = jax.tree.map(lambda x: x[changed], new.nodes.params)
  var_clients = mixing.layer_variance(clients)
  var_global = mixing.layer_variance(broadcast(new.extra.global_params, 1))
  mask = mixing.correctable(new.extra.global_params)
  for want, got, m in zip(jax.tree.leaves(var_clients), jax.tree.leaves(var_global),
                          jax.tree.leaves(mask)):
    if m:
      np.testing.assert_allclose(float(got[0]), float(np.mean(want)), rtol=1e-4)


def test_weight_variance_metric_matches_xavier_at_init():
  spec = build_model('mlp', 10)
  init = lambda k: spec.module.init(k, jnp.zeros((1, 784)))['params']
  models = jax.lax.map(init, jax.random.split(jax.random.key(5), 6))
  out = metrics.weight_variance(models)
  assert set(out) == {'weight_variance/Dense_0/kernel', 'xavier_variance/Dense_0/kernel',
                      'weight_variance/Dense_1/kernel', 'xavier_variance/Dense_1/kernel'}
  assert float(out['xavier_variance/Dense_0/kernel']) == pytest.approx(2 / (784 + 200))
  np.testing.assert_allclose(out['weight_variance/Dense_0/kernel'],
                             out['xavier_variance/Dense_0/kernel'], rtol=0.05)


@pytest.mark.parametrize('change,flag', [
    (dict(variance_correction='sometimes'), '--variance_correction'),
    (dict(vc_ratio=1.5), '--vc_ratio'),
])
def test_bad_variance_correction_settings(tiny_config, change, flag):
  with pytest.raises(experiment.ConfigError, match=flag):
    experiment.validate(dataclasses.replace(tiny_config, **change))


def test_dfl2_targets_exclude_the_own_model():
  """DFL2's targets after a buffer merge: 'received' = mean of the received variances (own
  excluded), 'follow_beta' = beta var(merged) + (1 - beta) that mean, 'self' = own."""
  own = {'w': jnp.array([1.0, 5.0])}
  merged = {'w': jnp.array([0.5, 2.0])}
  received = {'w': jnp.array([6.0, 3.0])}  # sums over the buffer
  count = jnp.array([2, 3])
  target = lambda t, beta=0.5: mixing.received_only_target(
      mixing.VarianceCorrection(target=t), own, merged, received, count, beta)['w']
  np.testing.assert_allclose(target('received'), [3.0, 1.0])
  np.testing.assert_allclose(target('follow_beta', 0.25), [0.25 * 0.5 + 0.75 * 3.0,
                                                          0.25 * 2.0 + 0.75 * 1.0])
  np.testing.assert_allclose(target('follow_beta', 0.0), target('received'))
  np.testing.assert_allclose(target('self'), [1.0, 5.0])


# --- the `variance` study's setting and plots (issue 14 item 5); no training here.


@pytest.mark.parametrize('scale', sorted(study.SCALES))
def test_study_runs_the_five_labels_on_random_regular_graphs_of_the_papers_degrees(scale):
  cs = study.configs(dataset='mnist1d', scale=scale)
  assert tuple(cs) == study.LABELS == ('gossip', 'gossip_vc', 'dpsgd', 'dpsgd_vc', 'fedavg')
  for c in cs.values():
    assert (c.topology, c.model, c.partition, c.alpha, c.dataset) == (
        'kregular', 'lenet', 'dirichlet', 0.5, 'mnist1d')
    assert c.degree in study.PAPER_DEGREES
  assert [cs[k].protocol for k in study.LABELS] == ['gossip', 'gossip', 'dpsgd', 'dpsgd', 'fedavg']
  assert [cs[k].variance_correction for k in study.LABELS] == [
      'none', 'received', 'none', 'received', 'none']
  g = cs['gossip_vc']  # DFL2's semantics: one batch a wake-up, buffer 2, all neighbours
  assert (g.gossip_mode, g.gossip_buffer, g.local_steps, g.gossip_peers) == (
      'dfl2', 2, 1, 'all_neighbours')
  assert g.gossip_period_seconds / g.tick_seconds == study.SCALES[scale].ticks_per_period
  if scale in study.SWEEP_GRIDS:
    sweep = study.sweep_configs(dataset='mnist1d', scale=scale)
    nodes = study.SWEEP_GRIDS[scale][0]
    assert {c.degree for c in sweep.values() if c.nodes == nodes} == set(study.PAPER_DEGREES)
    assert all(c.topology == 'kregular' and c.nodes * c.degree % 2 == 0 for c in sweep.values())
    assert all(c.gossip_mode == 'dfl2' for c in sweep.values())


def test_unknown_study_scale_is_a_config_error_naming_the_scales():
  with pytest.raises(experiment.ConfigError, match='paper, small, quick'):
    study.configs(dataset='mnist1d', scale='huge')


def test_study_dataset_is_mnist_only_where_tfds_has_it_prepared(monkeypatch):
  from decsim.data import sources
  def unprepared(name, **_):
    raise sources.DataError(f'{name} is not prepared')
  monkeypatch.setattr(sources, 'load_dataset', unprepared)
  assert study.default_dataset() == 'mnist1d'
  assert study.configs()['gossip'].dataset == 'mnist1d'
  monkeypatch.setattr(sources, 'load_dataset', lambda name, **_: name)
  assert study.default_dataset() == 'mnist'
  assert {c.dataset for c in study.configs().values()} == {'mnist'}


def _fake_rows(label: str, n: int = 6) -> list[dict]:
  """Rows shaped like a run's: accuracy rising by 0.15 a row, 10 node-steps a row."""
  rows = []
  for i in range(n):
    row = {'round': 10 * i, 'sim_seconds': 2.5 * i, 'bytes_total': 100 * i, 'node_steps': 10,
           'accuracy': 0.1 + 0.15 * i,
           'weight_variance/Dense_0/kernel': 0.5 ** i, 'xavier_variance/Dense_0/kernel': 0.25}
    if label != 'fedavg':
      row['consensus_accuracy'] = 0.1 + 0.1 * i
    rows.append(row)
  return rows


def test_study_summary_and_plots_read_seconds_and_node_steps(tmp_path, monkeypatch):
  """`run` names the dataset in study.json, counts node-steps and seconds to the target on
  the nodes' own accuracy from the rows and draws both figures (fake rows, no training)."""
  from decsim import report

  seen = {}

  def fake_run(c, out_dir, log):
    seen[out_dir.name] = c
    rows = _fake_rows(c.protocol)
    out_dir.mkdir(parents=True)
    (out_dir / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    return report.network_summary(rows, c.target_accuracy)

  monkeypatch.setattr(study.experiment, 'run', fake_run)
  runs = study.run(tmp_path, dataset='mnist1d', scale='quick')
  saved = json.loads((tmp_path / 'study.json').read_text())
  assert (saved['dataset'], saved['scale'], tuple(saved['runs'])) == ('mnist1d', 'quick', study.LABELS)
  # Own accuracy 0.1, 0.25, 0.4, 0.55, 0.7: the target 0.6 is first met in the 5th row
  # (second 10), after 5 rows of 10 node-steps; the node-average model (0.1 a row) at 0.5
  # in the 5th row, 0.6 in the 6th.
  for label in ('gossip', 'dpsgd_vc', 'fedavg'):
    assert runs[label]['seconds_to_target'] == 10.0
    assert runs[label]['node_steps_to_target'] == 50
    assert runs[label]['seconds_to_0.5'] == 7.5
    assert runs[label]['variance_ratio_final'] == {'Dense_0/kernel': pytest.approx(0.5 ** 5 / 0.25)}
  assert runs['gossip']['periods_to_target'] == 40 / study.SCALES['quick'].ticks_per_period
  assert runs['gossip']['consensus_rounds_to_0.6'] == 50
  assert runs['fedavg']['consensus_rounds_to_0.6'] is None
  for name in ('variance_accuracy.png', 'variance_layers.png'):
    assert (tmp_path / name).stat().st_size > 1000
  # variance_clock: gossip +- VC waking once per FedAvg round (12.5 s / 50 rounds), with the
  # tick the same fraction of the period, added beside the five.
  monkeypatch.setattr(study, 'plot', lambda out_dir, labels: seen.setdefault('plotted', labels))
  study.run_clock(tmp_path)
  assert seen['plotted'] == list(study.LABELS) + ['gossip_fedavg_clock', 'gossip_vc_fedavg_clock']
  saved = json.loads((tmp_path / 'study.json').read_text())
  assert tuple(saved['runs']) == study.LABELS + ('gossip_fedavg_clock', 'gossip_vc_fedavg_clock')
  for label in ('gossip', 'gossip_vc'):
    c, before = seen[f'{label}_fedavg_clock'], seen[label]
    assert c.gossip_period_seconds == pytest.approx(0.25)
    assert c.gossip_period_seconds / c.tick_seconds == pytest.approx(
        before.gossip_period_seconds / before.tick_seconds)
    assert c.variance_correction == before.variance_correction


def test_node_steps_axis_accumulates_the_rows_counts(tmp_path):
  from decsim import plotting
  rows = _fake_rows('gossip')
  assert plotting.x_values(rows, 'node_steps') == [10, 20, 30, 40, 50, 60]
  assert plotting.x_values(rows, 'seconds') == [0.0, 2.5, 5.0, 7.5, 10.0, 12.5]
  assert [r['node_steps_total'] for r in study.with_node_steps(rows)] == [10, 20, 30, 40, 50, 60]


@pytest.mark.parametrize('preset,scale', [('variance_gossip', 'paper'),
                                          ('variance_small_gossip', 'small')])
def test_variance_presets_are_the_studys_gossip_vc_label(preset, scale):
  from launch import simulate
  path = pathlib.Path(simulate.__file__).parent / 'presets' / f'{preset}.flags'
  simulate.FLAGS.unparse_flags()
  try:
    simulate.FLAGS(['prog', f'--flagfile={path}'])
    config = simulate.config_from_flags()
  finally:
    simulate.FLAGS.unparse_flags()
  assert config == study.configs(dataset='mnist1d', scale=scale)['gossip_vc']
