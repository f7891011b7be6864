"""Checkpoints: kill -9 then --resume reproduces the uninterrupted metrics bitwise; a
corrupt newest checkpoint falls back to the previous one, in one line."""

import pathlib
import signal
import subprocess
import sys
import time

import jax

from decsim import experiment
from decsim.checkpoint import Checkpointer

ROOT = pathlib.Path(__file__).parent.parent
ARGS = ['--protocol=dpsgd', '--nodes=16', '--num_samples=2000', '--rounds=40', '--eval_every=5',
        '--checkpoint_every=10', '--model=mlp']


def _decsim(out, *extra, wait=True):
  cmd = [sys.executable, '-m', 'launch.simulate', *ARGS, f'--out={out}', *extra]
  if not wait:
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def _rows(path):
  return path.read_text() if path.exists() else ''


def test_kill_9_then_resume_reproduces_the_uninterrupted_run(tmp_path):
  full, killed = tmp_path / 'full', tmp_path / 'killed'
  assert _decsim(full).returncode == 0
  proc = _decsim(killed, wait=False)
  deadline = time.time() + 240
  while _rows(killed / 'metrics.jsonl').count('\n') < 5 and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert 5 <= _rows(killed / 'metrics.jsonl').count('\n') < 8  # killed mid-run
  resumed = _decsim(killed, '--resume')
  assert resumed.returncode == 0, resumed.stderr
  assert 'resumed from the checkpoint at round' in resumed.stdout
  assert (killed / 'metrics.jsonl').read_text() == (full / 'metrics.jsonl').read_text()


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path):
  config = experiment.ExperimentConfig(protocol='dpsgd', nodes=8, num_samples=1000, model='mlp',
                                       rounds=30, eval_every=10, checkpoint_every=10)
  experiment.run(config, out_dir=tmp_path / 'a', log=lambda _: None)
  for f in (tmp_path / 'a' / 'checkpoints' / '30').rglob('*'):
    if f.is_file():
      f.write_bytes(b'\x00garbage')
  lines = []
  exp = experiment.build(config)
  like = exp.protocol.init(jax.random.key(0), exp.data)
  step, state, _ = Checkpointer(tmp_path / 'a' / 'checkpoints').restore_latest(like, lines.append)
  assert step == 20 and int(state.round) == 20
  assert len(lines) == 1 and 'round 30' in lines[0] and 'falling back' in lines[0]
  # resuming from round 20 rewrites rounds 30 identically
  before = (tmp_path / 'a' / 'metrics.jsonl').read_text()
  experiment.run(config.__class__(**{**config.__dict__, 'resume': True}), out_dir=tmp_path / 'a',
                 log=lambda _: None)
  assert (tmp_path / 'a' / 'metrics.jsonl').read_text() == before


def test_resume_with_different_settings_is_refused(tmp_path):
  assert _decsim(tmp_path, '--rounds=10', '--checkpoint_every=5').returncode == 0
  proc = _decsim(tmp_path, '--resume', '--lr=0.5')
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and '--lr' in lines[0] and 'new --out' in lines[0]
