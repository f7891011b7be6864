"""decsim plot: any metric against rounds, seconds, bytes or node-steps; replicas as a mean
with a 95% t-interval named in the legend; one-column paper figures; --help; bad flags."""

import json
import math

import pytest
from PIL import Image

from decsim import plotting
from launch import plot


def _run(path, rows):
  path.mkdir(parents=True)
  (path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return path


def _rows(scale=1.0, replicas=None):
  rows = []
  for k in range(1, 5):
    row = {'round': 10 * k, 'accuracy': 0.2 * k * scale, 'sim_seconds': 3.0 * k,
           'bytes_total': 10 ** (k + 5), 'node_steps': 50}
    if replicas:
      row.update(replicas=len(replicas), accuracy_replicas=[v * k for v in replicas])
    rows.append(row)
  return rows


def test_node_steps_accumulate_and_replicas_give_a_t_interval():
  assert plotting.x_values(_rows(), 'node_steps') == [50, 100, 150, 200]
  assert plotting.x_values(_rows(), 'bytes') == [1e6, 1e7, 1e8, 1e9]
  y, band, count = plotting.mean_and_band(_rows(replicas=[0.1, 0.2, 0.3]), 'accuracy')
  assert count == 3 and len(band) == 4
  half = 4.302652729749462 * 0.1 / math.sqrt(3)  # t(0.975, 2 dof) * sample std / sqrt(3)
  assert band[0] == pytest.approx((0.2 - half, 0.2 + half))
  assert plotting.mean_and_band(_rows(), 'accuracy')[1] is None  # one run: no band


def test_legend_names_the_interval_of_a_replicated_run():
  fig, ax = plotting.plt.subplots()
  plotting._draw_run(ax, _rows(replicas=[0.1, 0.3]), 'accuracy', 'rounds', 'fedavg')
  plotting._draw_run(ax, _rows(), 'accuracy', 'rounds', 'dpsgd')
  assert ax.get_legend_handles_labels()[1] == ['fedavg (mean, 95% CI of 2)', 'dpsgd']
  plotting.plt.close(fig)


def test_paper_style_writes_one_column_panels(tmp_path, capsys):
  a, b = _run(tmp_path / 'a', _rows()), _run(tmp_path / 'b', _rows(0.5))
  plot.main(['decsim plot', str(a), str(b), '--metric=accuracy', '--x=seconds', '--style=paper',
             '--labels=FL,MoDeST', '--target=0.5', '--formats=png', '--formats=pdf',
             f'--out={tmp_path / "fig"}'])
  assert (tmp_path / 'fig.pdf').stat().st_size > 0
  assert Image.open(tmp_path / 'fig.png').size[0] == round(3.3 * 300)  # one column at 300 dpi
  plot.main(['decsim plot', str(a), '--x=rounds,node_steps', f'--out={tmp_path / "two"}'])
  assert Image.open(tmp_path / 'two.png').size[0] == 2 * 5 * 120  # two default panels
  assert 'wrote' in capsys.readouterr().out


def test_help_prints_the_flags(capsys):
  plot.main(['decsim plot', '--help'])
  out = capsys.readouterr().out
  assert all(f'--{name}' in out for name in ('metric', 'x', 'labels', 'style', 'formats'))


@pytest.mark.parametrize('args,named', [
    (['--x=time'], '--x=time'),
    (['--labels=a,b'], '--labels has 2 labels for 1'),
    (['--metric=consensus_accuracy'], 'no rows with'),
    (['--style=poster'], '--style'),
], ids=['x', 'labels', 'metric', 'style'])
def test_bad_plot_flags_are_one_line(args, named, tmp_path, capsys):
  run = _run(tmp_path / 'a', _rows())
  with pytest.raises(SystemExit) as exit_:
    plot.main(['decsim plot', str(run), *args, f'--out={tmp_path / "p"}'])
  err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert exit_.value.code == 2 and len(err) == 1 and named in err[0], err
  assert not (tmp_path / 'p.png').exists()
