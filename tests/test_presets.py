"""Every preset flag file parses into a valid configuration of its launcher
(``sapo_*`` presets belong to launch/sapo.py, the others to the decsim command)."""

import pathlib

import pytest

from decsim import experiment
from decsim.rl import experiment as rl_experiment
from launch import sapo, simulate

PRESETS = sorted((pathlib.Path(simulate.__file__).parent / 'presets').glob('*.flags'))


def test_there_are_presets_for_each_paper():
  names = {p.stem for p in PRESETS}
  assert {'modest_cifar10', 'modest_churn', 'variance_gossip', 'sapo_4_4'} <= names


@pytest.mark.parametrize('preset', PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_is_a_valid_configuration(preset):
  launcher, validate, default = (
      (sapo, rl_experiment.validate, rl_experiment.SapoRunConfig())
      if preset.stem.startswith('sapo') else
      (simulate, experiment.validate, experiment.ExperimentConfig()))
  launcher.FLAGS.unparse_flags()
  try:
    launcher.FLAGS(['prog', f'--flagfile={preset}'])
    config = launcher.config_from_flags()
  finally:
    launcher.FLAGS.unparse_flags()
  validate(config)
  if preset.stem.startswith('sapo'):  # sapo_I_J
    _, i, j = preset.stem.split('_')
    assert (config.local_groups, config.external_groups) == (int(i), int(j))
  else:
    assert config != default  # the preset changed something
