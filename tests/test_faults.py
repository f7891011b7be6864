"""Failure injection: every failure a user can cause leaves an earlier run in --out byte for
byte, says one line, exits with the right status and records the run's true status.

Classes (BUILD_NOTES.md, 'Never lose a run'): values found bad only late, OS errors on
--out, seeds, too little data, impossible allocations, backends, non-runs given to
``decsim plot``, values accepted only while a feature was off, resume of a damaged run,
launcher flags, two runs on one --out, and SIGINT/SIGTERM at any moment.
"""

import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from unittest import mock

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ['--num_samples=600', '--nodes=6', '--sample_size=3', '--model=logistic',
        '--local_steps=1', '--rounds=4', '--eval_every=2']

FILES = {
    'lat_huge.csv': '0,1e300\n1e300,0\n',
    'lat_nan.csv': '0,nan\nnan,0\n',
    'speeds_nan.txt': '\n'.join(['nan'] * 100) + '\n',
    'speeds_tiny.txt': '\n'.join(['1e-30'] * 100) + '\n',
    'trace_zeros.csv': '\n'.join([','.join(['0'] * 6)] * 3) + '\n',
    'a_file': 'not a directory\n',
}

# (args, text the one line must contain); each case ran to a traceback, a destroyed
# earlier run or a silent acceptance before these tests.
LATE_VALUES = [
    (['--local_epochs=inf'], '--local_epochs'),
    (['--local_epochs=1000', '--batch_size=1'], '--local_epochs'),
    (['--samples_per_second=nan'], '--samples_per_second'),
    (['--upload_mbps=nan'], '--upload_mbps'),
    (['--download_mbps=inf'], '--download_mbps'),
    (['--upload_mbps=1e-12'], '--upload_mbps'),
    (['--latency_file={tmp}/lat_huge.csv'], '--latency_file'),
    (['--latency_file={tmp}/lat_nan.csv'], '--latency_file'),
    (['--compute_file={tmp}/speeds_nan.txt'], '--compute_file'),
    (['--compute_file={tmp}/speeds_tiny.txt'], '--compute_file'),
    (['--ping_timeout=inf', '--protocol=modest'], '--ping_timeout'),
    (['--tick_seconds=nan', '--protocol=gossip', '--init=independent'], '--tick_seconds'),
    (['--vc_epsilon=nan'], '--vc_epsilon'),
    (['--lr=inf'], '--lr'),
]
OUT_ERRORS = [
    (['--out={tmp}/a_file'], 'is a file'),
    (['--out={tmp}/a_file/run'], 'is a file'),
    (['--out={tmp}/' + 'x' * 300], 'longer than'),
    (['--out=/proc/decsim_cannot_write_here'], '--out=/proc/decsim_cannot_write_here'),
    (['--out='], '--out is empty'),
]
SEEDS = [
    (['--seed=-1'], '--seed'),
    (['--seed=4294967296'], '--seed'),
    (['--seed=2147483647', '--replicas=2'], '--replicas=2'),
]
TOO_LITTLE_DATA = [
    (['--num_samples=50', '--nodes=100', '--sample_size=5'], 'samples'),
    (['--num_samples=100', '--nodes=90', '--sample_size=5', '--partition=shards'], '90 nodes'),
    (['--dataset=synthetic', '--num_samples=10', '--nodes=50', '--sample_size=5'], 'num_samples'),
]
ALLOCATIONS = [
    (['--sites=100000'], '--sites'),
    (['--replicas=1000', '--replica_fix=data,graph,network', '--nodes=200', '--num_samples=2000',
      '--model=lenet', '--protocol=dpsgd'], 'GiB'),  # N models each (FedAvg's state is O(s))
    (['--protocol=gossip', '--init=independent', '--gossip_partitions=1000000000'],
     '--gossip_partitions'),
    (['--replicas=100000'], '--replicas'),
]
ACCEPTED_WHILE_OFF = [
    (['--p_online=1.5'], '--p_online'),
    (['--degree=-3'], '--degree'),
    (['--gossip_beta=2'], '--gossip_beta'),
    (['--aggregators=0'], '--aggregators'),
    (['--bandwidth_sigma=-1'], '--bandwidth_sigma'),
    (['--crash_batch=-5'], '--crash_batch'),
    (['--inactivity_threshold=0'], '--inactivity_threshold'),
    (['--gossip_keep=0'], '--gossip_keep'),
    (['--eval_nodes=-1'], '--eval_nodes'),
    (['--crash_start_seconds=nan'], '--crash_start_seconds'),
    (['--trace_file={tmp}/trace_zeros.csv', '--nodes=6', '--sample_size=2'], 'would ever be online'),
]
IN_PROCESS = (LATE_VALUES + OUT_ERRORS + SEEDS + TOO_LITTLE_DATA + ALLOCATIONS
              + ACCEPTED_WHILE_OFF)


def _digest(directory: pathlib.Path) -> dict[str, str]:
  """sha256 of every file under ``directory`` (relative path -> hex)."""
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob('*')) if p.is_file()}


def _earlier_run(directory: pathlib.Path) -> dict[str, str]:
  """A finished run's files (what a user would lose) in ``directory``; their digests."""
  (directory / 'checkpoints' / '4').mkdir(parents=True)
  (directory / 'metrics.jsonl').write_text(
      '{"round": 2, "accuracy": 0.4, "loss": 1.0, "sim_seconds": 1.0, "bytes_total": 10}\n'
      '{"round": 4, "accuracy": 0.5, "loss": 0.9, "sim_seconds": 2.0, "bytes_total": 20}\n')
  (directory / 'config.json').write_text('{"nodes": 6}\n')
  (directory / 'summary.json').write_text('{"status": "completed"}\n')
  (directory / 'checkpoints' / '4' / 'state').write_bytes(os.urandom(64))
  return _digest(directory)


def _one_error_line(text: str, prog: str = 'decsim') -> str:
  lines = [l for l in text.splitlines() if l.strip()]
  assert len(lines) == 1, text
  assert lines[0].startswith(f'{prog}: error:') and 'Traceback' not in text, text
  return lines[0]


def _run_in_process(args: list[str], tmp_path: pathlib.Path, capsys) -> tuple[int, str]:
  from launch import simulate
  simulate.FLAGS.unparse_flags()
  argv = ['decsim', *args]
  try:
    with mock.patch.object(sys, 'argv', argv), pytest.raises(SystemExit) as exit_:
      simulate.run_main()
  finally:
    simulate.FLAGS.unparse_flags()
  return exit_.value.code, capsys.readouterr().err


def test_fault_table_and_bad_input_table_hold_80_cases():
  from test_cli import BAD_INPUTS  # tests/ is on sys.path (rootdir conftest)
  assert len(IN_PROCESS) + len(BAD_INPUTS) + len(SUBPROCESS_CASES) >= 80
  assert not {tuple(a) for a, _ in IN_PROCESS} & {tuple(a) for a, _ in BAD_INPUTS}


@pytest.mark.parametrize('args,named', IN_PROCESS, ids=[' '.join(a) for a, _ in IN_PROCESS])
def test_bad_value_exits_2_in_one_line_and_keeps_the_earlier_run(args, named, tmp_path, capsys):
  for name, text in FILES.items():
    (tmp_path / name).write_text(text)
  out = tmp_path / 'run'
  before = _earlier_run(out)
  args = [a.format(tmp=tmp_path) for a in args]
  out_arg = [] if any(a.startswith('--out=') for a in args) else [f'--out={out}']
  code, err = _run_in_process([*TINY, *out_arg, *args], tmp_path, capsys)
  assert code == 2, err
  assert named in _one_error_line(err)
  assert _digest(out) == before
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith('.run.')) in (
      [], ['.run.lock'])  # no staging directory is left behind


# --- Runs that fail after compiling (in process: one JAX start) -----------------------


def _tiny_config(**change):
  from decsim.experiment import ExperimentConfig
  base = dict(num_samples=600, nodes=6, sample_size=3, model='logistic', local_steps=1,
              rounds=4, eval_every=2)
  return ExperimentConfig(**{**base, **change})


@pytest.mark.parametrize('change', [
    pytest.param(dict(lr=1e16, model='mlp'), marks=pytest.mark.slow), dict(lr=1e12, model='mlp'),
    pytest.param(dict(protocol='dpsgd', lr=1e12, model='mlp', degree=2), marks=pytest.mark.slow)])
def test_immediate_divergence_keeps_the_earlier_run(change, tmp_path):
  from decsim import experiment
  from decsim.errors import SimulationDiverged
  out = tmp_path / 'run'
  before = _earlier_run(out)
  with pytest.raises(SimulationDiverged) as err:
    experiment.run(_tiny_config(**change), out_dir=out, log=lambda _: None)
  assert err.value.kept_earlier_run == out.absolute()
  assert _digest(out) == before


def test_divergence_in_an_empty_out_records_status_diverged(tmp_path):
  from decsim import experiment
  from decsim.errors import SimulationDiverged
  with pytest.raises(SimulationDiverged):
    experiment.run(_tiny_config(lr=1e8, model='mlp'), out_dir=tmp_path / 'fresh', log=lambda _: None)
  summary = json.loads((tmp_path / 'fresh' / 'summary.json').read_text())
  assert summary['status'] == 'diverged' and 'diverged' in summary['error']


@pytest.mark.parametrize('fail_at', [1, pytest.param(2, marks=pytest.mark.slow)])
def test_other_exceptions_record_status_failed(fail_at, tmp_path):
  """An exception mid-run (here from the log callback) is 'failed', never 'completed'."""
  from decsim import experiment
  calls = []

  def log(message):
    if message.startswith('round'):  # the progress line written after each row
      calls.append(message)
    if len(calls) == fail_at:
      raise RuntimeError('disk quota exceeded')

  with pytest.raises(RuntimeError):
    experiment.run(_tiny_config(), out_dir=tmp_path / 'run', log=log)
  summary = json.loads((tmp_path / 'run' / 'summary.json').read_text())
  assert summary['status'] == 'failed' and summary['error'] == 'disk quota exceeded'
  rows = (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()
  assert len(rows) == fail_at


def test_no_node_online_stops_with_one_line(tmp_path, capsys):
  trace = tmp_path / 'late.csv'  # node 0 online only in round 100: nobody before
  trace.write_text('\n'.join([','.join(['0'] * 6)] * 100 + [','.join(['1'] + ['0'] * 5)]) + '\n')
  out = tmp_path / 'run'
  before = _earlier_run(out)
  code, err = _run_in_process([*TINY, f'--out={out}', f'--trace_file={trace}'], tmp_path, capsys)
  assert code == 2 and 'no node has been online' in _one_error_line(err)
  assert _digest(out) == before


# --- Resume of a damaged run ---------------------------------------------------------


@pytest.fixture(scope='module')
def checkpointed_run(tmp_path_factory):
  """A finished 8-round run with checkpoints every 2 rounds, and its metrics bytes."""
  from decsim import experiment
  out = tmp_path_factory.mktemp('ckpt') / 'run'
  experiment.run(_tiny_config(rounds=8, checkpoint_every=2), out_dir=out, log=lambda _: None)
  return out, (out / 'metrics.jsonl').read_bytes()


def _copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
  import shutil
  shutil.copytree(src, dst)
  return dst


@pytest.mark.parametrize('damage,named', [
    (lambda d: (d / 'config.json').unlink(), 'config.json is missing'),
    (lambda d: (d / 'metrics.jsonl').write_text(
        ''.join((d / 'metrics.jsonl').read_text().splitlines(True)[:2])), 'does not reach'),
    (lambda d: (d / 'config.json').write_text('{"nodes": 6, "lr": 0.5}\n'), 'differ'),
    (lambda d: (d / 'config.json').write_text('{not json'), 'cannot be read'),
])
def test_resume_of_a_damaged_run_is_refused(checkpointed_run, damage, named, tmp_path, capsys):
  out = _copy(checkpointed_run[0], tmp_path / 'run')
  damage(out)
  before = _digest(out)
  code, err = _run_in_process([*TINY[:-2], '--rounds=8', '--eval_every=2', '--checkpoint_every=2',
                               '--resume', f'--out={out}'], tmp_path, capsys)
  assert code == 2 and named in _one_error_line(err)
  assert _digest(out) == before


def test_resume_falls_back_from_a_corrupt_checkpoint_without_tracebacks(checkpointed_run,
                                                                         tmp_path, capsys):
  out = _copy(checkpointed_run[0], tmp_path / 'run')
  newest = max((out / 'checkpoints').iterdir(), key=lambda p: int(p.name))
  for f in newest.rglob('*'):
    if f.is_file():
      f.write_bytes(b'garbage')
  from launch import simulate
  simulate.FLAGS.unparse_flags()
  argv = ['decsim', *TINY[:-2], '--rounds=8', '--eval_every=2', '--checkpoint_every=2',
          '--resume', f'--out={out}']
  with mock.patch.object(sys, 'argv', argv), pytest.raises(SystemExit) as exit_:
    simulate.run_main()
  simulate.FLAGS.unparse_flags()
  captured = capsys.readouterr()
  assert exit_.value.code in (None, 0)
  assert captured.err.strip() == '' and 'Traceback' not in captured.out
  assert 'unreadable' in captured.out
  assert (out / 'metrics.jsonl').read_bytes() == checkpointed_run[1]


# --- Launchers other than decsim ------------------------------------------------------


def _launch(module: str, args: list[str], timeout=120, env=None, **kwargs):
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', **(env or {})}
  return subprocess.run([sys.executable, '-m', module, *args], capture_output=True, text=True,
                        timeout=timeout, env=env, cwd=ROOT, **kwargs)


LAUNCHER_CASES = [
    ('launch.reproduce', ['--bogus=1'], 'reproduce', 'bogus'),
    ('launch.reproduce', ['--study=nosuch', '--out=x'], 'reproduce', 'nosuch'),
    ('launch.sapo', ['--nodes=1'], 'decsim', '--nodes'),
]
BACKEND_CASES = [('cuda',), ('tpu',), ('rocm',)]
BACKEND_PARAMS = [BACKEND_CASES[0][0], *(pytest.param(c[0], marks=pytest.mark.slow)
                                         for c in BACKEND_CASES[1:])]
SUBPROCESS_CASES = LAUNCHER_CASES + BACKEND_CASES


@pytest.mark.parametrize('module,args,prog,named', LAUNCHER_CASES,
                         ids=[f'{m} {" ".join(a)}' for m, a, _, _ in LAUNCHER_CASES])
def test_every_launcher_fails_in_one_line(module, args, prog, named):
  proc = _launch(module, args)
  assert proc.returncode == 2, proc.stderr
  assert named in _one_error_line(proc.stderr, prog)


@pytest.mark.parametrize('platform', BACKEND_PARAMS)
def test_missing_backend_is_one_line(platform, tmp_path):
  proc = _launch('launch.simulate', [*TINY, f'--out={tmp_path / "run"}'],
                 env={'JAX_PLATFORMS': platform})
  assert proc.returncode == 2
  assert 'JAX cannot start its backend' in _one_error_line(proc.stderr)
  assert not (tmp_path / 'run').exists()


PLOT_CASES = [
    (lambda d: d.write_text('a file'), 'is not a directory'),
    (lambda d: d.mkdir(), 'has no metrics.jsonl'),
    (lambda d: (d.mkdir(), (d / 'metrics.jsonl').write_text('garbage\n')), 'not JSON lines'),
    (lambda d: (d.mkdir(), (d / 'metrics.jsonl').write_text('{"round": 1}\n')), 'no rows'),
]


@pytest.mark.parametrize('make,named', PLOT_CASES, ids=[n for _, n in PLOT_CASES])
def test_plot_of_a_non_run_is_one_line(make, named, tmp_path, capsys):
  from launch import plot
  make(tmp_path / 'thing')
  with pytest.raises(SystemExit) as exit_:
    plot.main(['decsim plot', str(tmp_path / 'thing'), f'--out={tmp_path / "p"}'])
  assert exit_.value.code == 2
  assert named in _one_error_line(capsys.readouterr().err, 'decsim plot')
  assert not (tmp_path / 'p.png').exists()


# --- Two runs on one --out ------------------------------------------------------------


def test_a_locked_out_is_refused_naming_the_holder(tmp_path, capsys):
  from decsim.rundir import RunDirectory
  out = tmp_path / 'run'
  before = _earlier_run(out)
  holder = RunDirectory(out, resume=False)
  try:
    code, err = _run_in_process([*TINY, f'--out={out}'], tmp_path, capsys)
  finally:
    holder.discard()
    holder.release()
  assert code == 2 and f'pid {os.getpid()}' in _one_error_line(err)
  assert _digest(out) == before


def test_two_concurrent_runs_one_wins_the_other_leaves_it_whole(tmp_path):
  out = tmp_path / 'run'
  args = [*TINY[:-2], '--rounds=40', '--eval_every=2', f'--out={out}']
  first = subprocess.Popen([sys.executable, '-m', 'launch.simulate', *args], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=dict(os.environ, JAX_PLATFORMS='cpu'))
  deadline = time.time() + 60
  while not list(tmp_path.glob('.run.staging-*')) and not out.exists():
    assert time.time() < deadline and first.poll() is None
    time.sleep(0.05)
  first.send_signal(signal.SIGSTOP)  # holds the lock however fast its rounds are (cached)
  try:
    second = _launch('launch.simulate', [*args[:-1], '--lr=0.5', f'--out={out}'])
  finally:
    first.send_signal(signal.SIGCONT)
  first_err = first.communicate(timeout=120)[1]
  assert first.returncode == 0, first_err
  assert second.returncode == 2 and 'in use by another decsim run' in _one_error_line(
      second.stderr)
  rows = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines()]
  assert [r['round'] for r in rows] == list(range(0, 42, 2))
  assert json.loads((out / 'config.json').read_text())['lr'] == 0.05


# --- SIGINT and SIGTERM at any moment, then --resume ----------------------------------

INTERRUPT_ARGS = [*TINY[:-2], '--rounds=60', '--eval_every=2', '--checkpoint_every=2']


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  out = tmp_path_factory.mktemp('whole') / 'run'
  proc = _launch('launch.simulate', [*INTERRUPT_ARGS, f'--out={out}'])
  assert proc.returncode == 0, proc.stderr
  return (out / 'metrics.jsonl').read_bytes()


SLOW = pytest.mark.slow  # the same path as a case CI runs; kept for pytest -m slow


@pytest.mark.parametrize('sig,delay', [
    (signal.SIGINT, 'compile'), pytest.param(signal.SIGTERM, 'compile', marks=SLOW),
    pytest.param(signal.SIGINT, 'rows', marks=SLOW), pytest.param(signal.SIGTERM, 'rows', marks=SLOW)])
def test_signal_then_resume_gives_identical_metrics(sig, delay, uninterrupted, tmp_path):
  out = tmp_path / 'run'
  args = [*INTERRUPT_ARGS, f'--out={out}']
  proc = subprocess.Popen([sys.executable, '-m', 'launch.simulate', *args], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'))
  if delay == 'compile':  # the staging directory exists: data loaded, compiling next
    deadline = time.time() + 60
    while not list(tmp_path.glob('.run.staging-*')):
      assert time.time() < deadline and proc.poll() is None
      time.sleep(0.01)
  else:  # a few rows (and checkpoints, maybe one in flight) are written
    proc.stdout.readline()
    proc.stdout.readline()
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=120)
  if proc.returncode == 0:  # the run had finished before the signal arrived
    assert (out / 'metrics.jsonl').read_bytes() == uninterrupted
    return
  assert proc.returncode == 128 + sig, err
  assert 'interrupted by' in _one_error_line(err)
  assert json.loads((out / 'summary.json').read_text())['status'] == 'interrupted'
  resumed = _launch('launch.simulate', [*args, '--resume'])
  assert resumed.returncode == 0, resumed.stderr
  assert (out / 'metrics.jsonl').read_bytes() == uninterrupted
