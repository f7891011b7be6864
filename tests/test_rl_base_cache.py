"""SAPO's base-model cache under concurrent runs: a run that finds the cache entry written
by another run while it was warming up keeps its models and leaves the entry intact."""

import jax
import numpy as np

from decsim.rl import base, policy as policy_lib, tasks

TINY = policy_lib.PolicyConfig(max_len=tasks.PROMPT_LEN + 4, dim=8, layers=1, mlp=16)


def test_a_cache_entry_written_meanwhile_by_another_run_is_not_an_error(tmp_path, monkeypatch):
  import orbax.checkpoint as ocp
  policy, config = policy_lib.make_policy(TINY), base.WarmupConfig(steps_min=1, steps_max=2)
  args = (0, 2, policy, 4, config, (1.0,) + (0.0,) * (len(tasks.TASKS) - 1))
  final = base.cache_path(*args[:2], TINY, *args[3:], cache_dir=tmp_path)
  save = ocp.StandardCheckpointer.save

  def other_run_finishes_first(self, path, params, *a, **kw):
    if not final.exists():  # another process's rename lands while this one warms up
      other = ocp.StandardCheckpointer()
      save(other, final, params)
      other.wait_until_finished()
    return save(self, path, params, *a, **kw)

  monkeypatch.setattr(ocp.StandardCheckpointer, 'save', other_run_finishes_first)
  params = base.base_models(*args, cache_dir=tmp_path, log=lambda *a: None)
  monkeypatch.undo()
  restored = base.base_models(*args, cache_dir=tmp_path, log=lambda *a: None)
  jax.tree.map(np.testing.assert_array_equal, params, restored)
  assert [p.name for p in tmp_path.iterdir()] == [final.name]  # no temporary left behind
