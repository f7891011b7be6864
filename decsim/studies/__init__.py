"""Paper reproductions: each study runs several labelled experiments and writes
``DIR/study.json`` as ``{"study": NAME, "runs": {LABEL: <that run's summary.json>}}``,
a table on stdout and a plot. ``launch/reproduce.py --study=NAME`` runs one.

A study module defines ``run(out_dir, **options) -> dict`` and registers it in
``STUDIES`` below (one line per study).
"""

from collections.abc import Callable

STUDIES: dict[str, str] = {
    # name -> module path of a function run(out_dir: pathlib.Path, quick: bool) -> dict
    'modest': 'decsim.studies.modest:run',
    'modest_churn': 'decsim.studies.modest:run_churn',
    'modest_population': 'decsim.studies.modest_population:run',
    'variance': 'decsim.studies.variance:run',
    'variance_small': 'decsim.studies.variance:run_small',
    'variance_clock': 'decsim.studies.variance:run_clock',
    'variance_sweep': 'decsim.studies.variance:run_sweep',
    'variance_sweep_small': 'decsim.studies.variance:run_sweep_small',
    'sapo': 'decsim.studies.sapo:run',
    'epidemic': 'decsim.studies.epidemic:run',
}


def get_study(name: str) -> Callable:
  import importlib
  if name not in STUDIES:
    known = ', '.join(sorted(STUDIES)) or 'none yet'
    raise ValueError(f'unknown study {name!r}: choose one of {known}')
  module, _, function = STUDIES[name].rpartition(':')
  return getattr(importlib.import_module(module), function)
