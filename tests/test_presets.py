"""Every preset flag file parses into a valid configuration of its launcher
(``sapo_*`` presets belong to launch/sapo.py, the others to the decsim command)."""

import pathlib

import pytest

from decsim import experiment
from decsim.rl import experiment as rl_experiment
from launch import sapo, simulate

DATA = pathlib.Path(__file__).parent / 'data'
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
  # an LM preset takes the checkpoint directory on the command line: the stored tiny one here
  extra = [f'--policy_path={DATA / "qwen2_tiny"}'] if preset.stem.startswith('sapo_qwen') else []
  launcher.FLAGS.unparse_flags()
  try:
    launcher.FLAGS(['prog', f'--flagfile={preset}', *extra])
    config = launcher.config_from_flags()
  finally:
    launcher.FLAGS.unparse_flags()
  validate(config)
  if preset.stem.startswith('sapo_qwen'):  # sapo_qwen_N: the paper's 4/4 with N LM policies
    assert (config.policy, config.nodes, config.local_groups, config.external_groups) == (
        'qwen2', int(preset.stem.split('_')[-1]), 4, 4)
  elif preset.stem.startswith('sapo'):  # sapo_I_J
    _, i, j = preset.stem.split('_')
    assert (config.local_groups, config.external_groups) == (int(i), int(j))
  else:
    assert config != default  # the preset changed something
