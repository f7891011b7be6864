"""Every preset flag file parses into a valid configuration."""

import pathlib

import pytest

from decsim import experiment
from launch import simulate

PRESETS = sorted((pathlib.Path(simulate.__file__).parent / 'presets').glob('*.flags'))


def test_there_are_presets():
  assert len(PRESETS) >= 3


@pytest.mark.parametrize('preset', PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_is_a_valid_configuration(preset):
  simulate.FLAGS.unparse_flags()
  simulate.FLAGS(['decsim', f'--flagfile={preset}'])
  config = simulate.config_from_flags()
  experiment.validate(config)
  assert config != experiment.ExperimentConfig()  # the preset changed something
  simulate.FLAGS.unparse_flags()
