"""ReasoningGYM questions for SAPO, scored by ReasoningGYM itself (optional extra ``[rl]``).

SAPO (Gensyn, 2025) trains on ReasoningGYM tasks (``reasoning-gym``: procedural
generators, each with its own ``score_answer``). This adapter pre-generates a
pool of short items offline (no download) and exposes it as a
``decsim.rl.tasks.TaskSource`` (``make_source``): questions are drawn from the pool by index
inside the jit-compiled round, and completions are scored on the host by the
item's own dataset through ``jax.pure_callback``.

The English question is replaced by a compact prompt built from the item's
metadata, because a policy of a few ten thousand parameters reads characters,
not sentences; the answer and its scoring are ReasoningGYM's:

  basic_arithmetic  ``7*4=``       -> ``28``   two 1-digit terms, + - *
  chain_sum         ``4+1+7=``     -> ``12``   two or three 1-digit terms
  count_bits        ``k37=``       -> ``3``    ones in the binary form of 1..63
  gcd               ``g24,18=``    -> ``6``    two numbers in 1..30
  base_conversion   ``1011:2>5=``  -> ``21``   0..30 from base 2..10 to base 2..10
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from decsim.rl import tasks

NAMES = ('basic_arithmetic', 'chain_sum', 'count_bits', 'gcd', 'base_conversion')
# Generator settings that keep prompts and answers short (the package's defaults
# go up to 4-digit, 6-term problems).
SETTINGS: dict[str, dict[str, Any]] = {
    'basic_arithmetic': dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1,
                             operators=('+', '-', '*'), allow_parentheses=False,
                             allow_negation=False),
    'chain_sum': dict(min_terms=2, max_terms=3, min_digits=1, max_digits=1),
    'count_bits': dict(min_n=1, max_n=63),
    'gcd': dict(min_numbers=2, max_numbers=2, min_value=1, max_value=30),
    'base_conversion': dict(min_base=2, max_base=10, min_value=0, max_value=30),
}
CHARS = tasks.CHARS + '-*,gk:>'  # extends the procedural vocabulary: PAD, EOS, digits keep their ids
PROMPT_LEN = 12  # longest: '11110:2>9=' (10)
ANSWER_LEN = 5  # longest: '11110' (30 in base 2)


def _require():
  try:
    import reasoning_gym
  except ImportError:
    raise ImportError('reasoning-gym is not installed: pip install -e ".[rl]" (it generates '
                      'its tasks offline; nothing is downloaded)') from None
  return reasoning_gym


def compact_prompt(name: str, entry: dict) -> str:
  """The character prompt of one ReasoningGYM item (ends with '=')."""
  m = entry['metadata']
  if name in ('basic_arithmetic', 'chain_sum'):
    return m['expression'].replace(' ', '') + '='
  if name == 'count_bits':
    return f'k{m["number"]}='
  if name == 'gcd':
    return 'g' + ','.join(str(x) for x in m['numbers']) + '='
  if name == 'base_conversion':
    return f'{m["source_repr"]}:{m["source_base"]}>{m["target_base"]}='
  raise ValueError(f'no compact prompt for ReasoningGYM task {name!r}: choose from {", ".join(NAMES)}')


def encode(text: str, size: int) -> np.ndarray:
  ids = [CHARS.index(c) for c in text]
  if len(ids) > size:
    raise ValueError(f'{text!r} is longer than {size} characters')
  return np.asarray(ids + [tasks.PAD] * (size - len(ids)), np.int32)


def decode(tokens) -> str:
  return ''.join(CHARS[int(t)] for t in np.asarray(tokens))


@dataclasses.dataclass(frozen=True, eq=False)
class Pool:
  """Pre-generated items: token arrays for the device, entries and datasets for scoring."""

  prompt: np.ndarray  # [M, PROMPT_LEN] left-padded, ends with '='
  oracle: np.ndarray  # [M, ANSWER_LEN] left-aligned, PAD after
  oracle_len: np.ndarray  # [M]
  kind: np.ndarray  # [M] index into names
  names: tuple[str, ...]
  entries: tuple[dict, ...]  # the ReasoningGYM items, for score_answer
  datasets: tuple[Any, ...]  # one dataset per name: its score_answer scores that kind
  cache_id: str  # package version, names, size and seed: what determines the items

  def score(self, items: np.ndarray, answers: np.ndarray) -> np.ndarray:
    """Rewards of completions ``answers [..., G, T]`` (tokens) for items ``[...]``."""
    items = np.asarray(items)
    answers = np.asarray(answers)
    out = np.zeros(answers.shape[:-1], np.float32)
    for index in np.ndindex(*answers.shape[:-1]):
      item = int(items[index[:-1]])
      text = decode(answers[index][: int(tasks.answer_length(answers[index]))])
      out[index] = self.datasets[int(self.kind[item])].score_answer(text, self.entries[item])
    return out


def build_pool(names: tuple[str, ...] = NAMES, size: int = 2000, seed: int = 0) -> Pool:
  """``size`` items of each task in ``names``, generated offline by ReasoningGYM."""
  rg = _require()
  unknown = [n for n in names if n not in SETTINGS]
  if unknown:
    raise ValueError(f'ReasoningGYM task {unknown[0]!r} has no short setting here: choose from '
                     f'{", ".join(NAMES)}')
  prompts, oracles, lengths, kinds, entries, datasets = [], [], [], [], [], []
  for k, name in enumerate(names):
    ds = rg.create_dataset(name, size=size, seed=seed + k, **SETTINGS[name])
    datasets.append(ds)
    for entry in ds:
      prompt = compact_prompt(name, entry)
      ids = encode(prompt, PROMPT_LEN)
      prompts.append(np.concatenate([np.full(PROMPT_LEN - len(prompt), tasks.PAD, np.int32),
                                     ids[: len(prompt)]]))
      oracles.append(encode(entry['answer'], ANSWER_LEN))
      lengths.append(len(entry['answer']))
      kinds.append(k)
      entries.append(entry)
  cache_id = f'reasoning_gym {_version()} {",".join(names)} size={size} seed={seed} {CHARS}'
  return Pool(np.stack(prompts), np.stack(oracles), np.asarray(lengths, np.int32),
              np.asarray(kinds, np.int32), tuple(names), tuple(entries), tuple(datasets),
              cache_id)


def _version() -> str:
  from importlib.metadata import version
  return version('reasoning-gym')


def make_source(pool: Pool) -> tasks.TaskSource:
  """The pool as SAPO's task source: a kind drawn by the mix, then an item of that kind."""
  prompt, oracle, oracle_len = (jnp.asarray(x) for x in (pool.prompt, pool.oracle,
                                                          pool.oracle_len))
  counts = np.bincount(pool.kind, minlength=len(pool.names))
  starts = jnp.asarray(np.concatenate([[0], np.cumsum(counts)[:-1]]), jnp.int32)  # [K]
  counts = jnp.asarray(counts, jnp.int32)
  scorer = make_scorer(pool)

  def sample(key, shape, mix) -> tasks.Questions:
    k_kind, k_item = jax.random.split(key)
    p = jnp.asarray(mix, jnp.float32)
    kind = jax.random.choice(k_kind, len(pool.names), shape, p=p / p.sum()).astype(jnp.int32)
    item = starts[kind] + jax.random.randint(k_item, shape, 0, counts[kind])
    return tasks.Questions(prompt[item], oracle[item], oracle_len[item], kind, item)

  return tasks.TaskSource(sample=sample, score=lambda completions, q: scorer(completions, q.item),
                          names=pool.names, prompt_len=PROMPT_LEN, answer_len=ANSWER_LEN,
                          vocab_size=len(CHARS), cache_id=pool.cache_id)


def make_scorer(pool: Pool):
  """``score(completions [..., G, T], items [...]) -> [..., G]`` for jit: a host callback
  to each item's own ``score_answer``."""

  def score(completions: jax.Array, items: jax.Array) -> jax.Array:
    shape = jax.ShapeDtypeStruct(completions.shape[:-1], jnp.float32)
    return jax.pure_callback(pool.score, shape, items, completions, vmap_method='sequential')

  return score
