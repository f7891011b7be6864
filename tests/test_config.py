"""Options declared once: every field is a flag in its component's group and checks itself."""

import dataclasses
import math
import typing

import pytest

from decsim import config as config_lib
from decsim.errors import ConfigError
from decsim.experiment import ExperimentConfig

FIELDS = dataclasses.fields(ExperimentConfig)
HINTS = typing.get_type_hints(ExperimentConfig)
NUMERIC = [f for f in FIELDS if config_lib._base_type(HINTS[f.name])[0] in (int, float)]


def test_every_field_is_an_option_and_a_flag_in_its_group():
  from launch import simulate
  for field in FIELDS:
    spec = config_lib.spec_of(field)
    assert spec is not None and spec.doc, field.name
    flag = simulate.FLAGS[field.name]
    assert flag.help.endswith(spec.doc) and flag.default == field.default
  by_module = simulate.FLAGS.flags_by_module_dict()
  groups = [m for m in by_module if m.startswith('decsim: ')]
  assert len(groups) >= 10  # run, data, model, training, topology, network, churn, ...
  assert 'sites' in {f.name for f in by_module['decsim: Simulated network: sites, latency, '
                                              'bandwidth, compute speed']}


@pytest.mark.parametrize('field', NUMERIC, ids=[f.name for f in NUMERIC])
def test_nan_is_refused_for_every_number_naming_the_flag(field):
  kind = config_lib._base_type(HINTS[field.name])[0]
  expected = 'must be a finite number' if kind is float else 'must be an integer'
  with pytest.raises(ConfigError, match=f'--{field.name}=nan {expected}'):
    ExperimentConfig(**{field.name: math.nan})


@pytest.mark.parametrize('field', [f for f in NUMERIC if config_lib.spec_of(f).low is not None],
                         ids=lambda f: f.name)
def test_values_below_the_range_are_refused_whatever_the_protocol(field):
  spec = config_lib.spec_of(field)
  below = spec.low if spec.low_open else spec.low - 1
  for protocol in ('fedavg', 'dpsgd'):
    with pytest.raises(ConfigError, match=f'--{field.name}='):
      ExperimentConfig(protocol=protocol, **{field.name: below})


def test_choices_are_enums_and_bad_types_are_refused():
  from launch import simulate
  assert simulate.FLAGS['optimizer'].parser.enum_values == ['sgd', 'adam']
  with pytest.raises(ConfigError, match='--protocol=.fedsgd. is unknown: choose one of .*fedavg'):
    ExperimentConfig(protocol='fedsgd')  # protocols come from the registry, not an enum
  with pytest.raises(ConfigError, match='--nodes=.5. must be an integer'):
    ExperimentConfig(nodes='5')
  with pytest.raises(ConfigError, match='--resume=1 must be true or false'):
    ExperimentConfig(resume=1)


def test_defaults_are_valid_and_replace_checks_again():
  config = ExperimentConfig()
  with pytest.raises(ConfigError, match='--p_online=2'):
    dataclasses.replace(config, p_online=2.0)


def test_help_lists_the_registered_protocols_and_the_flag_groups():
  from launch import simulate
  from decsim.protocols import registry
  for name in registry.names():
    assert f'\n  {name} ' in simulate.__doc__
  assert 'Local training' in simulate.__doc__ and 'Churn: which nodes are online when' in (
      simulate.__doc__)
