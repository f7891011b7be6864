"""Study definitions and outputs: comparable configurations, study.json format, CLI errors."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from decsim import studies
from decsim.studies import common, modest

PROTOCOL_FIELDS = {'protocol', 'topology', 'aggregators', 'success_fraction', 'weighting',
                   'rounds', 'replicas', 'modest_stream'}


@pytest.mark.parametrize('quick', [True, False])
def test_modest_study_compares_protocols_on_identical_settings(quick):
  configs = modest.modest_configs(quick)
  assert any('fl' in k for k in configs) and any('dpsgd' in k for k in configs)
  assert sum(c.protocol == 'modest' for c in configs.values()) == 3
  assert configs['modest_independent_3'].modest_stream == 'independent'
  assert configs['fl_3'].replicas == configs['modest_independent_3'].replicas == (1 if quick else 3)
  shared = [{k: v for k, v in dataclasses.asdict(c).items() if k not in PROTOCOL_FIELDS}
            for c in configs.values()]
  assert all(s == shared[0] for s in shared)  # same data, partition, network, target, seed
  assert {c.success_fraction for c in configs.values() if c.protocol == 'modest'} == {1.0, 0.8}


def test_churn_study_follows_the_paper_schedule():
  crash, crash_a3, join = modest.churn_configs(False).values()
  assert (crash.crash_start_seconds, crash.crash_every_seconds, crash.crash_batch,
          crash.crash_fraction) == (300, 60, 5, 0.8)
  assert (crash.success_fraction, crash.ping_timeout, crash.inactivity_threshold) == (0.8, 5.0, 1000)
  assert not crash.mark_down and (crash.aggregators, crash_a3.aggregators) == (1, 3)
  assert (join.nodes - join.join_nodes, join.join_nodes, join.join_every_seconds) == (90, 10, 60)


def test_write_study_format(tmp_path, capsys):
  runs = {'fl': {'final_accuracy': 0.9, 'rounds_to_target': 10},
          'modest': {'final_accuracy': 0.8, 'rounds_to_target': None}}
  path = common.write_study(tmp_path, 'modest', runs)
  assert json.loads(path.read_text()) == {'study': 'modest', 'runs': runs}
  table = capsys.readouterr().out.splitlines()
  assert table[0].split()[0] == 'run' and table[1].split()[:2] == ['fl', '0.9']


def test_registered_studies_resolve_and_unknown_fails():
  for name in studies.STUDIES:
    assert callable(studies.get_study(name))
  with pytest.raises(ValueError, match='unknown study'):
    studies.get_study('nope')
  proc = subprocess.run([sys.executable, '-m', 'launch.reproduce', '--study=nope', '--out=x'],
                        capture_output=True, text=True, timeout=120,
                        cwd=os.path.join(os.path.dirname(__file__), '..'))
  assert proc.returncode == 2
  assert [l for l in proc.stderr.splitlines() if l.strip()] == [
      f'reproduce: error: unknown study \'nope\': choose one of {", ".join(sorted(studies.STUDIES))}']


def test_sapo_gain_interval_is_the_paired_t_test_inverted():
  """``ratio_interval`` holds exactly the gains a paired t-test on a - (1 + g) b keeps."""
  import numpy as np
  import scipy.stats
  from decsim.studies import sapo
  base = np.array([2.0, 17.6, 32.1, 61.4, 42.5, 30.0, 25.0, 50.0])
  split = np.array([46.4, 56.5, 48.8, 71.0, 57.4, 40.0, 60.0, 52.0])
  low, high = sapo.ratio_interval(split, base)
  assert low < split.mean() / base.mean() < high
  for rho in np.linspace(low - 0.5, high + 0.5, 41):
    p = scipy.stats.ttest_1samp(split - rho * base, 0.0).pvalue
    assert (p >= 0.05) == (low - 1e-9 <= rho <= high + 1e-9), rho
  for rho, p_expected in ((low, 0.05), (high, 0.05)):  # the ends are where p = 0.05
    assert scipy.stats.ttest_1samp(split - rho * base, 0.0).pvalue == pytest.approx(p_expected)


def test_sapo_gain_interval_special_cases():
  import numpy as np
  import scipy.stats
  from decsim.studies import sapo
  # an exact ratio on every seed: no doubt left about it
  assert sapo.ratio_interval([20.0, 22.0, 26.0], [10.0, 11.0, 13.0]) == pytest.approx((2.0, 2.0))
  # a constant baseline: the t interval of mean(a), divided by it
  a = np.array([12.0, 14.0, 16.0, 18.0])
  half = scipy.stats.t.ppf(0.975, 3) * a.std(ddof=1) / 2
  assert sapo.ratio_interval(a, [10.0] * 4) == pytest.approx(((15 - half) / 10, (15 + half) / 10))
  # a baseline mean not distinguishable from 0, or a single seed: no bounded interval
  assert sapo.ratio_interval([1.0, 2.0, 3.0], [-5.0, 0.0, 6.0]) is None
  assert sapo.ratio_interval([1.0], [2.0]) is None


def test_sapo_paired_gain_pairs_by_seed():
  from decsim.studies import sapo
  base = {'seeds': [0, 1, 2, 3], 'cumulative_rewards': [30.0, 32.0, 34.0, 80.0]}
  split = {'seeds': [2, 0, 1], 'cumulative_rewards': [51.0, 60.0, 48.0]}  # seed 3 not run
  g = sapo.paired_gain(split, base)
  assert g['gain_seeds'] == [2, 0, 1]
  assert g['seed_gains'] == pytest.approx([0.5, 1.0, 0.5])
  assert g['gain'] == pytest.approx(159 / 96 - 1)
  low, high = sapo.ratio_interval([51.0, 60.0, 48.0], [34.0, 30.0, 32.0])
  assert g['gain_ci95'] == pytest.approx([low - 1, high - 1])


def test_sapo_study_records_the_paired_gain_of_each_split(tmp_path, monkeypatch):
  """``run_study`` end to end with a stand-in for the SAPO run (no training): the 4/4
  record of study.json holds its gain over 8/0 and ``gain_ci95`` from the same seeds."""
  import numpy as np
  from decsim.rl import experiment
  from decsim.studies import sapo

  def fake_run(c, out_dir, log):
    rewards = np.linspace(0, 0.3 + 0.05 * c.external_groups + 0.02 * c.seed, 40)  # [R]
    out_dir.mkdir(parents=True)
    (out_dir / 'metrics.jsonl').write_text(''.join(
        json.dumps({'reward': float(r), 'signal_fraction': 0.5}) + '\n' for r in rewards))
    return {'cumulative_reward': float(rewards.sum()), 'initial_reward': 0.0,
            'final_reward': float(rewards[-1]), 'wall_seconds': 0.0, 'compile_seconds': 0.0,
            'rounds': 40, 'nodes': c.nodes, 'bytes_shared_per_node_round': 1.0}

  monkeypatch.setattr(experiment, 'run', fake_run)
  sapo.run_study(tmp_path, sapo.quick_config(), seeds=(0, 1, 2, 3), splits=((8, 0), (4, 4)),
                 log=lambda _: None)
  runs = json.loads((tmp_path / 'study.json').read_text())['runs']
  base, split = runs['8/0'], runs['4/4']
  assert 'gain_ci95' not in base and split['gain_seeds'] == split['seeds'] == [0, 1, 2, 3]
  low, high = split['gain_ci95']
  assert 0 < low < split['gain'] < high
  assert split['gain'] == pytest.approx(split['vs_8_0'])
  assert split['seed_gains'] == pytest.approx(
      list(np.divide(split['cumulative_rewards'], base['cumulative_rewards']) - 1))
  assert split['take_off_rounds'][0] == 20 + np.flatnonzero(  # first window mean >= 0.25
      np.convolve(np.linspace(0, 0.5, 40), np.ones(20) / 20, 'valid') >= sapo.TAKE_OFF)[0]
