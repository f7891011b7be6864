"""--tensorboard: every number of every metrics.jsonl row is also a TensorBoard scalar
(tag = key, step = round), read back here from the event files' records."""

import dataclasses
import json
import struct

import pytest

from decsim import experiment, tensorboard


def _scalars(directory) -> dict[str, dict[int, float]]:
  """tag -> {step: value} from the TFRecord-framed Event protos of ``directory``."""
  from tensorboardX.proto import event_pb2
  out = {}
  for path in sorted(directory.iterdir()):
    data = path.read_bytes()
    at = 0
    while at < len(data):
      (length,) = struct.unpack('<Q', data[at:at + 8])
      event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
      at += 12 + length + 4  # length, its crc, the record, its crc
      for value in event.summary.value:
        out.setdefault(value.tag, {})[event.step] = value.simple_value
  return out


def test_tensorboard_scalars_are_the_rows(tiny_config, tmp_path):
  config = dataclasses.replace(tiny_config, rounds=4, eval_every=2, tensorboard=True)
  experiment.run(config, out_dir=tmp_path / 'run', log=lambda _: None)
  rows = [json.loads(l) for l in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  scalars = _scalars(tmp_path / 'run' / 'tensorboard')
  for key in ('accuracy', 'loss', 'sim_seconds', 'bytes_total', 'client_accuracy_median'):
    want = {r['round']: r[key] for r in rows if r[key] is not None}
    assert scalars[key] == pytest.approx(want, rel=1e-6)  # float32 in the event files
  assert sorted(scalars['accuracy']) == [0, 2, 4]


def test_tensorboard_without_tensorboardx_is_one_line(tiny_config, monkeypatch):
  monkeypatch.setattr(tensorboard.importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(experiment.ConfigError, match=r"--tensorboard needs tensorboardX.*pip install"):
    experiment.validate(dataclasses.replace(tiny_config, tensorboard=True))
