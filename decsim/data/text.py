"""``text``: generated Shakespeare-style lines of many roles, for next-character prediction.

LEAF's Shakespeare task (Caldas et al., 2018, arXiv:1812.01097, after McMahan et al.,
2017) gives every speaking role of the plays to one client; a sample is 80
characters of the role's lines and its label the character that follows. The plays
cannot be downloaded here, so this module writes lines of the same kind from a small
embedded lexicon and sentence templates: every role draws its own preferences over
the words and templates (Dirichlet, so roles speak differently: non-IID by
construction, like the plays' roles), then speaks sentences of one to three clauses
until it has enough characters. Spelling, capitals after a full stop, the pronoun
"I", punctuation and which word class follows which are what a model can learn;
the next character is often ambiguous, so accuracy stays well below 1.

* Samples: windows of ``CONTEXT`` characters of one role's text, ``x`` = their
  character ids ``[M, CONTEXT]`` int32, ``y`` = the id of the next character ``[M]``
  (``num_classes`` = the vocabulary); the windows of a role overlap (stride 1), as
  LEAF's do.
* Roles: as many as ``nodes`` (LEAF: one role per client), with lognormal sizes;
  ``groups`` holds each train sample's role, so ``--partition=natural`` gives every
  node one role's lines.
* Test set: 20% of every role's samples, cut from a separate stretch of its text, so
  no test window overlaps a train window.

Generation is host-side numpy and Python, deterministic in ``seed``; under a second for
10,000 samples.
"""

import string

import numpy as np

from decsim.data.sources import ArrayDataset, DataError

VOCAB = '\n !\',.:;?' + string.ascii_lowercase + string.ascii_uppercase  # 61 characters
CONTEXT = 40  # characters a sample sees (LEAF: 80; halved to keep an LSTM step cheap)
DEFAULT_SAMPLES = 10_000
DEFAULT_ROLES = 100  # when load_dataset is called without nodes
TEST_FRACTION = 0.2
MIN_SAMPLES_PER_ROLE = 5  # at least one test and four train windows per role
WORD_CONCENTRATION = 0.3  # Dirichlet of a role's word preferences (small: idiosyncratic)

_WORDS = {
    'subject': 'I thou he she we you they none all',
    'verb': ('love hate know fear seek swear call bear give take speak hear see mark kill '
             'praise curse serve keep find leave follow pardon trust remember weep dream'),
    'aux': 'dost doth hath shall will must may wouldst canst',
    'determiner': 'the thy my his her our your this that no every',
    'adjective': ('sweet noble gentle fair foul false true dear poor good brave cruel wise '
                  'honest bloody sad merry proud young old dead royal'),
    'noun': ('lord lady king queen love heart night day death life blood crown sword '
             'father mother son daughter friend villain fool grace honour soul eyes hand '
             'tongue world heaven earth time tears'),
    'object': 'me thee him her us them it',
    'adverb': 'well now here there never ever still yet too indeed',
    'preposition': 'of to with from for upon in by against',
    'interjection': 'O alas ay fie hark nay marry peace come',
    'name': ('Romeo Juliet Hamlet Horatio Lear Cordelia Portia Brutus Cassius Antonio '
             'Viola Orsino Prospero Miranda Iago Othello Banquo Kent Edmund Ophelia'),
    'question': 'what why how where when who',
    'conjunction': 'and but for or yet',
}
# One clause of a sentence: word classes and literal punctuation, in order.
_TEMPLATES = (
    'subject verb determiner adjective noun',
    'subject aux verb object , name',
    'interjection , name , subject verb determiner noun',
    'determiner noun preposition determiner noun aux verb object',
    'verb object adverb , name',
    'question aux subject verb determiner adjective noun',
    'subject aux adverb verb determiner noun preposition object',
    'determiner adjective noun verb adverb',
)
_ENDS, _END_WEIGHTS = '.!;', (0.7, 0.2, 0.1)  # a question ends with '?'


def load_text(num_samples: int | None, roles: int | None, seed: int) -> ArrayDataset:
  """The ``text`` dataset: ``num_samples`` windows (train and test, 80/20) of ``roles``
  roles' generated lines (``None``: 10,000 samples, 100 roles)."""
  num_samples = num_samples or DEFAULT_SAMPLES
  roles = roles or DEFAULT_ROLES
  if num_samples < MIN_SAMPLES_PER_ROLE * roles:
    raise DataError(f'--dataset=text with {roles} nodes (one role each) needs --num_samples >= '
                    f'{MIN_SAMPLES_PER_ROLE * roles} ({MIN_SAMPLES_PER_ROLE} per role), got '
                    f'{num_samples}: raise --num_samples or lower --nodes')
  rng = np.random.default_rng([seed, 0x7E47])
  sizes = _role_sizes(rng, roles, num_samples)  # [K], summing to num_samples
  parts = {'x_train': [], 'y_train': [], 'x_test': [], 'y_test': [], 'groups': []}
  for k, size in enumerate(sizes):  # host-side, once
    style = _role_style(rng)
    n_test = max(1, int(round(TEST_FRACTION * size)))
    ids = encode(_speak(rng, style, size + 2 * CONTEXT))  # [size + 2C]: train | test text
    x_tr, y_tr = windows(ids[:size - n_test + CONTEXT])
    x_te, y_te = windows(ids[-(n_test + CONTEXT):])
    for key, value in zip(parts, (x_tr, y_tr, x_te, y_te, np.full(len(y_tr), k))):
      parts[key].append(value)
  cat = {key: np.concatenate(value) for key, value in parts.items()}
  return ArrayDataset(name='text', x_train=cat['x_train'], y_train=cat['y_train'],
                      x_test=cat['x_test'], y_test=cat['y_test'], num_classes=len(VOCAB),
                      groups=cat['groups'].astype(np.int32))


def encode(text: str) -> np.ndarray:
  """Character ids of ``text`` ([len] int32); every character must be in ``VOCAB``."""
  table = {c: i for i, c in enumerate(VOCAB)}
  return np.fromiter((table[c] for c in text), np.int32, len(text))


def decode(ids) -> str:
  return ''.join(VOCAB[int(i)] for i in np.asarray(ids).reshape(-1))


def windows(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Every window of ``CONTEXT`` ids and the id after it: ([n, CONTEXT], [n]),
  n = len(ids) - CONTEXT."""
  x = np.lib.stride_tricks.sliding_window_view(ids[:-1], CONTEXT)  # [n, C]
  return np.ascontiguousarray(x, np.int32), ids[CONTEXT:].astype(np.int32)


def _role_sizes(rng: np.random.Generator, roles: int, total: int) -> np.ndarray:
  """Samples per role [K]: lognormal(0, 1) shares, at least the minimum, summing to total."""
  share = rng.lognormal(0.0, 1.0, roles)  # [K]
  extra = total - MIN_SAMPLES_PER_ROLE * roles
  sizes = np.floor(extra * share / share.sum()).astype(np.int64)
  sizes[:extra - int(sizes.sum())] += 1  # the samples lost to flooring, one each
  return sizes + MIN_SAMPLES_PER_ROLE


def _role_style(rng: np.random.Generator) -> dict[str, tuple[list[str], np.ndarray]]:
  """A role's words of each class with its own preference weights, and its templates."""
  style = {}
  for kind, words in _WORDS.items():
    words = words.split()
    style[kind] = (words, rng.dirichlet(np.full(len(words), WORD_CONCENTRATION)))
  style['template'] = (list(_TEMPLATES), rng.dirichlet(np.ones(len(_TEMPLATES))))
  return style


def _speak(rng: np.random.Generator, style, length: int) -> str:
  """At least ``length`` characters of the role's lines, one speech per line."""
  lines, total = [], 0
  while total < length:
    line = ' '.join(_sentence(rng, style) for _ in range(rng.integers(1, 4)))
    lines.append(line)
    total += len(line) + 1
  text = '\n'.join(lines) + '\n'
  return text[:length]


def _draw(rng: np.random.Generator, style, kind: str) -> str:
  words, weights = style[kind]
  return words[rng.choice(len(words), p=weights)]


def _sentence(rng: np.random.Generator, style) -> str:
  """One or two clauses of the role's templates, capitalised and ended."""
  clauses = []
  for _ in range(rng.integers(1, 3)):
    template = _draw(rng, style, 'template')
    tokens = [t if t == ',' else _draw(rng, style, t) for t in template.split()]
    clauses.append(' '.join(tokens).replace(' ,', ','))
  text = f' {_draw(rng, style, "conjunction")} '.join(clauses)
  end = '?' if template.startswith('question') else _ENDS[rng.choice(3, p=_END_WEIGHTS)]
  return text[0].upper() + text[1:] + end

