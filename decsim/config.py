"""Options declared once: a dataclass field carries its default, help, choices and range.

A component config (data, model, network, ...) is a frozen dataclass whose fields
are made with ``option``. From that one declaration come

* the check of every value (type, finiteness, range, choices), run by
  ``check_fields`` whether or not the feature the option belongs to is switched on,
  with a one-line message that names the flag and the fix;
* the command-line flag (``define_flags``): name = field name, help = the field's
  doc, an enum when it has choices, grouped by the component that declares it.

Checks that combine several fields stay in the component's ``check`` method.
"""

import dataclasses
import math
import types
import typing
from typing import Any

from absl import flags

from decsim.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Spec:
  """What a value of an option may be; ``low``/``high`` bound numbers (open or closed)."""

  doc: str
  choices: tuple[str, ...] | None = None
  low: float | None = None
  high: float | None = None
  low_open: bool = False  # low < value instead of low <= value
  high_open: bool = False
  allow_inf: bool = False  # +inf is a valid value (e.g. 'never')
  hint: str = ''  # appended to a range error, e.g. '(0: unlimited)'


@dataclasses.dataclass(frozen=True)
class Component:
  """Base of the config components: validates on construction."""

  def __post_init__(self):
    check_fields(self)
    for cls in reversed(type(self).__mro__):
      if 'check' in cls.__dict__:
        cls.__dict__['check'](self)


def option(default: Any, doc: str, **spec: Any) -> Any:
  """A dataclass field with its ``Spec`` in the metadata."""
  return dataclasses.field(default=default, metadata={'spec': Spec(doc, **spec)})


def spec_of(field: dataclasses.Field) -> Spec | None:
  return field.metadata.get('spec')


def _base_type(annotation: Any) -> tuple[type, bool]:
  """``(type, optional)`` of an annotation such as ``int``, ``str | None``."""
  if isinstance(annotation, str):
    annotation = eval(annotation, {})  # noqa: S307 - our own annotations only
  args = typing.get_args(annotation)
  if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
    kinds = [a for a in args if a is not type(None)]
    return kinds[0], True
  return annotation, False


def _number(x: float) -> str:
  return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f'{x:g}'


def _range_text(s: Spec) -> str:
  low = None if s.low is None else _number(s.low)
  high = None if s.high is None else _number(s.high)
  if low is not None and high is not None:
    return f'in {"(" if s.low_open else "["}{low}, {high}{")" if s.high_open else "]"}'
  if low is not None:
    return f'{">" if s.low_open else ">="} {low}'
  return f'{"<" if s.high_open else "<="} {high}'


def _type_error(name: str, value: Any, kind: type) -> str | None:
  if kind is bool:
    return None if isinstance(value, bool) else f'--{name}={value!r} must be true or false'
  if kind is int:
    ok = isinstance(value, int) and not isinstance(value, bool)
    return None if ok else f'--{name}={value!r} must be an integer'
  if kind is float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return None if ok else f'--{name}={value!r} must be a number'
  return None if isinstance(value, kind) else f'--{name}={value!r} must be a {kind.__name__}'


def value_error(name: str, value: Any, kind: type, optional: bool, s: Spec) -> str | None:
  """The one-line complaint about ``--name=value``, or None when it is valid."""
  if value is None:
    return None if optional else f'--{name} needs a value'
  error = _type_error(name, value, kind)
  if error:
    return error
  if s.choices is not None and value not in s.choices:
    return f'--{name}={value!r} is unknown: choose one of {", ".join(s.choices)}'
  if kind in (int, float):
    if math.isnan(value) or (math.isinf(value) and not (s.allow_inf and value > 0)):
      return f'--{name}={value} must be a finite number'
    low_bad = s.low is not None and (value <= s.low if s.low_open else value < s.low)
    high_bad = s.high is not None and (value >= s.high if s.high_open else value > s.high)
    if low_bad or high_bad:
      return f'--{name}={_number(value)} must be {_range_text(s)}{" " + s.hint if s.hint else ""}'
  if kind is str and not optional and not value.strip():
    return f'--{name} is empty: give a value'
  return None


def check_fields(config: Any) -> None:
  """Raises ConfigError on the first field of ``config`` whose value its Spec refuses."""
  hints = typing.get_type_hints(type(config))
  for field in dataclasses.fields(config):
    spec = spec_of(field)
    if spec is None:
      continue
    kind, optional = _base_type(hints[field.name])
    error = value_error(field.name, getattr(config, field.name), kind, optional, spec)
    if error:
      raise ConfigError(error)


def check(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def component_of(cls: type, field_name: str) -> type:
  """The class in ``cls``'s bases that declares ``field_name`` (its flag group)."""
  for base in reversed(cls.__mro__):
    if field_name in getattr(base, '__annotations__', {}):
      return base
  return cls


def group_name(component: type) -> str:
  return component.__doc__.strip().splitlines()[0].rstrip('.') if component.__doc__ else (
      component.__name__)


def define_flags(cls: type, flag_values: flags.FlagValues, prefix: str = 'decsim') -> list[str]:
  """Defines one absl flag per field of the dataclass ``cls``; returns the group names.

  A flag's group (its 'module' in ``--helpfull``) is the component that declares it.
  """
  hints = typing.get_type_hints(cls)
  groups = []
  defaults = cls()
  for field in dataclasses.fields(cls):
    spec = spec_of(field)
    if spec is None:
      continue
    group = f'{prefix}: {group_name(component_of(cls, field.name))}'
    if group not in groups:
      groups.append(group)
    kind, _ = _base_type(hints[field.name])
    _define(kind, field.name, getattr(defaults, field.name), spec, flag_values, group)
  return groups


def _define(kind: type, name: str, default: Any, spec: Spec, flag_values: flags.FlagValues,
            group: str) -> None:
  common = dict(flag_values=flag_values, module_name=group)
  if spec.choices is not None:
    flags.DEFINE_enum(name, default, list(spec.choices), spec.doc, **common)
  elif kind is bool:
    flags.DEFINE_bool(name, default, spec.doc, **common)
  elif kind is int:
    flags.DEFINE_integer(name, default, spec.doc, **common)
  elif kind is float:
    flags.DEFINE_float(name, default, spec.doc, **common)
  else:
    flags.DEFINE_string(name, default, spec.doc, **common)


def from_flags(cls: type, flag_values: flags.FlagValues) -> Any:
  """An instance of ``cls`` with every option field read from ``flag_values``."""
  return cls(**{f.name: flag_values[f.name].value for f in dataclasses.fields(cls)
                if spec_of(f) is not None})
