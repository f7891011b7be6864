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
