"""The optional ReasoningGYM pool (extra ``[rl]``): compact prompts determine the answers,
and the jit scorer is each item's own ``score_answer``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip('reasoning_gym')

from decsim.rl import reasoning_gym as rgp  # noqa: E402
from decsim.rl import tasks  # noqa: E402


@pytest.fixture(scope='module')
def pool():
  return rgp.build_pool(size=300, seed=0)


def test_pool_covers_every_task_with_short_prompts_that_determine_the_answer(pool):
  assert pool.prompt.shape == (5 * 300, rgp.PROMPT_LEN)
  assert np.bincount(pool.kind).tolist() == [300] * 5
  assert np.all(pool.prompt[:, -1] == rgp.CHARS.index('='))
  answers = {}
  for prompt, entry in zip(map(rgp.decode, pool.prompt), pool.entries):
    assert answers.setdefault(prompt, entry['answer']) == entry['answer'], prompt
  for i in range(len(pool.entries)):
    assert rgp.decode(pool.oracle[i][: pool.oracle_len[i]]) == pool.entries[i]['answer']


def test_jit_scorer_is_reasoning_gyms_own_score_answer(pool):
  rng = np.random.default_rng(0)
  items = rng.integers(0, len(pool.entries), size=(3, 4))  # [3, 4]
  completions = np.zeros((3, 4, 3, 7), np.int32)  # [3, 4, G=3, T]
  texts = {}
  for index in np.ndindex(3, 4):
    oracle = pool.entries[items[index]]['answer']
    for g, text in enumerate([oracle, '9' + oracle, '']):  # exact, partial credit, empty
      completions[index + (g,)][: len(text)] = [rgp.CHARS.index(c) for c in text]
      completions[index + (g,)][len(text)] = tasks.EOS
      texts[index + (g,)] = text
  scores = np.asarray(jax.jit(rgp.make_scorer(pool))(jnp.asarray(completions), jnp.asarray(items)))
  for index, text in texts.items():
    item = items[index[:2]]
    dataset = pool.datasets[pool.kind[item]]
    assert scores[index] == pytest.approx(dataset.score_answer(text, pool.entries[item]))
  assert np.all(scores[..., 0] == 1.0) and np.all(scores[..., 2] == 0.0)
  assert np.all((scores[..., 1] > 0) & (scores[..., 1] < 1))  # partial credit, as its default rule


def test_unknown_task_names_the_choices():
  with pytest.raises(ValueError, match='choose from basic_arithmetic'):
    rgp.build_pool(names=('sudoku',), size=2)


@pytest.mark.slow  # 18 s of compilation; the scorer itself is tested above
def test_sapo_round_on_the_pool_scores_with_reasoning_gym(pool):
  """One SAPO round (3 nodes, I = J = 2) over the pool: each node's reward is the mean of
  ReasoningGYM's scores of its own rollouts, recomputed outside with the node's keys."""
  from decsim import rng
  from decsim.rl import policy as policy_lib
  from decsim.rl import sapo as sapo_lib

  source = rgp.make_source(pool)
  mix = (1.0,) * len(source.names)
  policy = policy_lib.make_policy(policy_lib.PolicyConfig(
      vocab=source.vocab_size, max_len=source.prompt_len + 6, dim=16, heads=2, layers=1, mlp=32))
  params = jax.vmap(policy.init)(jax.random.split(jax.random.key(0), 3))
  sapo = sapo_lib.sapo(policy, sapo_lib.SapoConfig(nodes=3, local_groups=2, external_groups=2,
                                                    generations=4, task_mix=mix, source=source))
  state = sapo.init(jax.random.key(5), params)
  _, metrics = jax.jit(sapo.round)(state)
  total = 0.0
  for n in range(3):
    qkey = rng.node_keys(state.key, 0, jnp.arange(3), rng.Stream.TASK)[n]
    skey = rng.node_keys(state.key, 0, jnp.arange(3), rng.Stream.ROLLOUT)[n]
    q = source.sample(qkey, (2,), mix)
    out = policy_lib.sample(policy, jax.tree.map(lambda x: x[n], params), skey,
                            jnp.repeat(q.prompt, 4, 0), 6).reshape(2, 4, 6)
    expected = pool.score(np.asarray(q.item), np.asarray(out)).mean()
    assert float(metrics.node_reward[n]) == pytest.approx(float(expected), abs=1e-6)
    total += float(expected)
  assert total > 0  # random completions earn partial credit: the comparison is not 0 == 0
  assert float(metrics.external_groups) > 0 and np.isfinite(float(metrics.loss))


def test_flags_name_the_source_and_its_tasks():
  from decsim.experiment import ConfigError
  from decsim.rl.experiment import SapoRunConfig, validate
  with pytest.raises(ConfigError, match='--task_source=.hf. is unknown'):
    validate(SapoRunConfig(task_source='hf'))
  with pytest.raises(ConfigError, match="unknown task 'rev': choose from basic_arithmetic"):
    validate(SapoRunConfig(task_source='reasoning_gym'))  # the procedural default mix
  mix = validate(SapoRunConfig(task_source='reasoning_gym', task_mix='gcd:3,count_bits'))
  assert mix == pytest.approx((0, 0, 0.25, 0.75, 0))
