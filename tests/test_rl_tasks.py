"""Procedural tasks and the verifier (ReasoningGYM's default rule, incl. partial credit)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from decsim.rl import tasks

_questions = jax.jit(tasks.sample_questions, static_argnums=(1, 2))  # eager vmap(switch) is slow

HAND = [  # (answer text before EOS, oracle, expected score)
    ('42', '42', 1.0),
    ('142', '42', 2 / 3),  # oracle inside the answer: len(oracle) / len(answer)
    ('4242', '42', 0.5),
    ('x', '7', 0.0),
    ('4', '42', 0.0),  # a prefix of the oracle is not the oracle
    ('', '5', 0.0),
    ('  7', '7', 1 / 3),
    ('123', '123', 1.0),
]


def _score(answer: str, oracle: str, eos: bool = True, t: int = 6) -> float:
  text = (answer + '$') if eos else answer
  completion = jnp.asarray(tasks.encode(text.replace('x', '+'), t))
  return float(tasks.score(completion, jnp.asarray(tasks.encode(oracle, tasks.ANSWER_LEN)),
                           jnp.int32(len(oracle))))


@pytest.mark.parametrize('answer,oracle,expected', HAND)
def test_verifier_hand_made_answers(answer, oracle, expected):
  assert _score(answer, oracle) == pytest.approx(expected, abs=1e-6)
  assert tasks.score_text(answer.replace('x', '+'), oracle) == pytest.approx(expected, abs=1e-6)


def test_verifier_ignores_text_after_eos_and_counts_all_without_eos():
  assert _score('7$99', '7') == 1.0  # after the first EOS nothing counts
  assert _score('7', '7', eos=False, t=3) == pytest.approx(1 / 3)  # no EOS: the whole row, PAD incl.
  assert _score('97', '7', eos=False, t=2) == pytest.approx(1 / 2)


def test_generated_questions_are_correct_for_every_kind():
  q = _questions(jax.random.key(0), (400,))
  kinds = np.asarray(q.kind)
  assert set(kinds.tolist()) == set(range(len(tasks.TASKS)))  # >= 4 kinds, all drawn
  for k in range(400):
    prompt = tasks.decode(q.prompt[k])
    assert len(prompt) == tasks.PROMPT_LEN and prompt.endswith('=')
    body = prompt.strip()[:-1]
    name = tasks.TASKS[kinds[k]]
    if name in ('add', 'chain'):
      expected = str(sum(int(x) for x in body.split('+')))
    elif name == 'bits':
      expected = str(body[1:].count('1'))
    elif name == 'rev':
      expected = body[1:][::-1]
    else:
      a, m = body.split('%')
      expected = str(int(a) % int(m))
    assert tasks.oracle_text(q, k) == expected, (prompt, name)


def test_task_mix_restricts_kinds_and_rejects_unknown():
  mix = tasks.parse_task_mix('bits,mod:3')
  q = _questions(jax.random.key(1), (300,), mix)
  counts = np.bincount(np.asarray(q.kind), minlength=len(tasks.TASKS))
  assert counts[tasks.TASKS.index('add')] == 0 and counts[tasks.TASKS.index('rev')] == 0
  assert counts[tasks.TASKS.index('mod')] > 2 * counts[tasks.TASKS.index('bits')] > 0
  with pytest.raises(ValueError, match='--task_mix'):
    tasks.parse_task_mix('add,sort')


def test_digit_tokens():
  toks, n = tasks.digit_tokens(jnp.int32(105), 3)
  assert tasks.decode(toks) == '105' and int(n) == 3
  toks, n = tasks.digit_tokens(jnp.int32(0), 3)
  assert tasks.decode(toks) == '0  ' and int(n) == 1
