"""Procedural verifiable tasks, generated in JAX on the device, and their verifier.

SAPO (Gensyn, 2025, "Sharing is Caring: Efficient LM Post-Training with Collective
RL Experience Sharing") trains on ReasoningGYM tasks: questions drawn from a
generator, answers checked by a program. These are the same kind of tasks, short
enough for a policy of a few ten thousand parameters, generated from a key inside
the jit-compiled round (no host round trip, no data set):

  add     ``37+5=``     -> ``42``     two numbers below 100
  chain   ``3+8+6=``    -> ``17``     a chain of three digits
  bits    ``b10110=``   -> ``3``      count the ones of a 5-bit string
  rev     ``r583=``     -> ``385``    reverse a 3-digit string
  mod     ``47%6=``     -> ``5``      a number below 100 modulo 2..9

Text is character level over one vocabulary shared by all tasks and nodes. A
prompt is left-padded to ``PROMPT_LEN`` and ends with the answer delimiter ``=``;
a completion is the answer followed by ``EOS``. The verifier follows
ReasoningGYM's default ``score_answer``: 1.0 for the exact answer, otherwise
``len(oracle) / len(answer)`` when the oracle appears inside the answer, else 0.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from decsim.types import PRNGKey

PAD, EOS = 0, 1
CHARS = ' $0123456789+%=brc'  # index = token id; ' ' is PAD, '$' is EOS
VOCAB_SIZE = len(CHARS)
DELIMITER = CHARS.index('=')
PROMPT_LEN = 8  # longest prompt 'b10110=' is 7 characters
ANSWER_LEN = 3  # longest oracle '198' (99+99)
TASKS = ('add', 'chain', 'bits', 'rev', 'mod')


class Questions(NamedTuple):
  prompt: jax.Array  # [..., PROMPT_LEN] int32, left-padded, ends with '='
  oracle: jax.Array  # [..., ANSWER_LEN] int32, left-aligned, PAD after
  oracle_len: jax.Array  # [...] int32
  kind: jax.Array  # [...] int32 index into the source's task names
  item: jax.Array | None = None  # [...] int32 index into a pre-generated pool (pool sources)


def _tok(c: str) -> int:
  return CHARS.index(c)


def digit_tokens(x: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
  """Decimal digits of ``x >= 0`` left-aligned in ``[width]`` (PAD after), and their count."""
  x = jnp.asarray(x, jnp.int32)
  length = jnp.maximum(1, jnp.floor(jnp.log10(jnp.maximum(x, 1)) + 1e-6).astype(jnp.int32) + 1)
  j = jnp.arange(width)
  power = jnp.maximum(length - 1 - j, 0)
  digits = (x // (10 ** power)) % 10
  return jnp.where(j < length, digits + _tok('0'), PAD).astype(jnp.int32), length


def _concat(pieces, size: int) -> tuple[jax.Array, jax.Array]:
  """Variable-length pieces ``[(tokens [w], length)]`` joined left-aligned in ``[size]``."""
  j = jnp.arange(size)
  out = jnp.full((size,), PAD, jnp.int32)
  offset = jnp.int32(0)
  for tokens, length in pieces:
    tokens = jnp.atleast_1d(jnp.asarray(tokens, jnp.int32))
    inside = (j >= offset) & (j < offset + length)
    out = jnp.where(inside, tokens[jnp.clip(j - offset, 0, tokens.shape[0] - 1)], out)
    offset = offset + length
  return out, offset


def _lit(c: str):
  return jnp.array([_tok(c)], jnp.int32), jnp.int32(1)


def _bits(key: PRNGKey, width: int):
  b = jax.random.bernoulli(key, 0.5, (width,)).astype(jnp.int32)
  return b + _tok('0'), jnp.int32(width), b


def _add(key):
  a, b = jax.random.randint(key, (2,), 0, 100)
  prompt = [digit_tokens(a, 2), _lit('+'), digit_tokens(b, 2), _lit('=')]
  return prompt, a + b


def _chain(key):
  a, b, c = jax.random.randint(key, (3,), 0, 10)
  prompt = [digit_tokens(a, 1), _lit('+'), digit_tokens(b, 1), _lit('+'), digit_tokens(c, 1),
            _lit('=')]
  return prompt, a + b + c


def _count_bits(key):
  tokens, width, b = _bits(key, 5)
  return [_lit('b'), (tokens, width), _lit('=')], jnp.sum(b)


def _mod(key):
  ka, kb = jax.random.split(key)
  a = jax.random.randint(ka, (), 0, 100)
  m = jax.random.randint(kb, (), 2, 10)
  return [digit_tokens(a, 2), _lit('%'), digit_tokens(m, 1), _lit('=')], a % m


def _kind_fn(fn):
  def make(key):
    pieces, value = fn(key)
    prompt, length = _concat(pieces, PROMPT_LEN)
    oracle, oracle_len = digit_tokens(value, ANSWER_LEN)
    return _left_pad(prompt, length), oracle, oracle_len
  return make


def _reverse(key):
  d = jax.random.randint(key, (3,), 0, 10).astype(jnp.int32) + _tok('0')
  prompt, length = _concat([_lit('r'), (d, jnp.int32(3)), _lit('=')], PROMPT_LEN)
  return _left_pad(prompt, length), d[::-1], jnp.int32(3)


def _left_pad(tokens: jax.Array, length: jax.Array) -> jax.Array:
  """Moves the first ``length`` tokens to the right end of the row (PAD on the left)."""
  size = tokens.shape[0]
  src = jnp.arange(size) - (size - length)
  return jnp.where(src >= 0, tokens[jnp.clip(src, 0, size - 1)], PAD)


_GENERATORS = {'add': _kind_fn(_add), 'chain': _kind_fn(_chain), 'bits': _kind_fn(_count_bits),
               'rev': _reverse, 'mod': _kind_fn(_mod)}


def parse_task_mix(spec: str, names: tuple[str, ...] = TASKS) -> tuple[float, ...]:
  """``'add,chain'`` or ``'add:2,bits:1'`` -> probabilities over ``names``.

  Raises ValueError naming the unknown task.
  """
  weights = dict.fromkeys(names, 0.0)
  for item in spec.split(','):
    name, _, w = item.strip().partition(':')
    if name not in weights:
      raise ValueError(f'--task_mix: unknown task {name!r}: choose from {", ".join(names)}')
    weights[name] += float(w) if w else 1.0
  total = sum(weights.values())
  if total <= 0:
    raise ValueError('--task_mix: weights must sum to more than 0, e.g. --task_mix=add,chain')
  return tuple(w / total for w in weights.values())


def sample_questions(key: PRNGKey, shape: tuple[int, ...],
                     mix: tuple[float, ...] | jax.Array = (1.0,) * len(TASKS)) -> Questions:
  """Draws questions of the mixed kinds (weights ``[len(TASKS)]``); every leaf has leading ``shape``."""
  probs = jnp.asarray(mix, jnp.float32)
  probs = probs / probs.sum()
  count = int(np.prod(shape)) if shape else 1
  keys = jax.random.split(key, count)

  def one(k):
    k_kind, k_q = jax.random.split(k)
    kind = jax.random.choice(k_kind, len(TASKS), p=probs)
    branches = [_GENERATORS[name] for name in TASKS]
    prompt, oracle, oracle_len = jax.lax.switch(kind, branches, k_q)
    return Questions(prompt, oracle, oracle_len, kind.astype(jnp.int32))

  q = jax.vmap(one)(keys)
  return jax.tree.map(lambda x: x.reshape(*shape, *x.shape[1:]), q)


def answer_length(completion: jax.Array) -> jax.Array:
  """Tokens before the first EOS (all of them when there is none). ``[..., T] -> [...]``."""
  t = completion.shape[-1]
  is_eos = completion == EOS
  return jnp.where(is_eos.any(-1), jnp.argmax(is_eos, -1), t).astype(jnp.int32)


def score(completion: jax.Array, oracle: jax.Array, oracle_len: jax.Array) -> jax.Array:
  """Reward of one completion ``[T]`` against its oracle ``[A]``: 1, partial credit, or 0.

  Partial credit ``len(oracle) / len(answer)`` when the oracle occurs inside the
  answer (the text before EOS); 1.0 is the case answer == oracle.
  """
  t, a = completion.shape[-1], oracle.shape[-1]
  length = answer_length(completion)
  starts = jnp.arange(t)
  window = jnp.arange(a)
  # tokens at start s + j, PAD past the end (never equal to a digit)
  pos = starts[:, None] + window[None, :]  # [T, A]
  seen = jnp.where(pos < t, completion[jnp.clip(pos, 0, t - 1)], -1)
  match = jnp.where(window[None, :] < oracle_len, seen == oracle[None, :], True).all(-1)  # [T]
  match &= starts + oracle_len <= length
  found = match.any() & (oracle_len > 0)
  return jnp.where(found, oracle_len / jnp.maximum(length, 1), 0.0).astype(jnp.float32)


def score_groups(completions: jax.Array, oracle: jax.Array, oracle_len: jax.Array) -> jax.Array:
  """Verifier over ``[..., G, T]`` completions with ``[..., A]`` oracles -> ``[..., G]``."""
  lead = completions.shape[:-2]
  g, t = completions.shape[-2:]
  flat_c = completions.reshape(-1, g, t)
  flat_o = oracle.reshape(-1, oracle.shape[-1])
  flat_l = oracle_len.reshape(-1)
  s = jax.vmap(lambda c, o, l: jax.vmap(lambda cc: score(cc, o, l))(c))(flat_c, flat_o, flat_l)
  return s.reshape(*lead, g)


class TaskSource(NamedTuple):
  """Where SAPO's questions come from and what scores the completions.

  ``sample(key, shape, mix) -> Questions`` (leaves with leading ``shape``; ``mix``
  weights ``names``); ``score(completions [..., G, T], questions [...]) -> [..., G]``.
  The procedural source below is the default; ``decsim.rl.reasoning_gym`` builds
  one over a ReasoningGYM pool. Token ids of PAD, EOS and digits are shared.
  """

  sample: Callable[..., Questions]
  score: Callable[[jax.Array, Questions], jax.Array]
  names: tuple[str, ...]
  prompt_len: int
  answer_len: int
  vocab_size: int
  cache_id: str  # what determines the questions (base-model cache keys)


PROCEDURAL = TaskSource(sample=sample_questions,
                        score=lambda completions, q: score_groups(completions, q.oracle,
                                                                  q.oracle_len),
                        names=TASKS, prompt_len=PROMPT_LEN, answer_len=ANSWER_LEN,
                        vocab_size=VOCAB_SIZE, cache_id=CHARS)


# Text helpers for tests, demonstrations and logs (host side).

def encode(text: str, size: int | None = None) -> np.ndarray:
  ids = [CHARS.index(c) for c in text]
  if size is not None:
    ids = ids[:size] + [PAD] * (size - len(ids))
  return np.asarray(ids, np.int32)


def decode(tokens) -> str:
  return ''.join(CHARS[int(t)] for t in np.asarray(tokens))


def score_text(answer: str, oracle: str) -> float:
  """The verifier on strings (ReasoningGYM's default rule), for reference."""
  if answer == oracle:
    return 1.0
  if oracle and oracle in answer:
    return len(oracle) / len(answer)
  return 0.0


def oracle_text(q: Questions, index=()) -> str:
  oracle = np.asarray(q.oracle)[index]
  return decode(oracle[: int(np.asarray(q.oracle_len)[index])])
