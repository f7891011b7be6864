"""The notebooks run top to bottom with tiny settings (DECSIM_NOTEBOOK_TINY=1)."""

import pathlib

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / 'notebooks').glob('*.ipynb'))
# CI time: these two run code that other CI tests cover (the variance study's runs, SAPO
# through the run loop); the slow suite runs them.
SLOW = {'vanishing_variance', 'sapo', 'modest'}


@pytest.mark.parametrize('path', [
    pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if p.stem in SLOW else [])
    for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
  monkeypatch.setenv('DECSIM_NOTEBOOK_TINY', '1')
  nb = nbformat.read(path, as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': str(tmp_path)}}).execute()
  errors = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])
            if o.get('output_type') == 'error']
  assert not errors
  assert (tmp_path / 'runs').exists()  # the notebook wrote its runs where it was run
