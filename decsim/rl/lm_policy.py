"""A pretrained Qwen2 model as a SAPO policy: task prompts in its chat template, answers back to text.

SAPO (Gensyn, 2025) post-trains Qwen2.5-0.5B on ReasoningGYM: each question is
put to the model in its chat template and its answer is scored by the task's
verifier. decsim's task sources generate questions on the device as tokens of a
small character alphabet (``tasks.CHARS``; ReasoningGYM's pool uses an extension
of it) and score answers in that alphabet, so this module translates both ways
with two lookup tables built once on the host from the model's tokenizer:

* prompt: ``chat_template(user: INSTRUCTION + question)`` — the rendered text
  before and after the question is encoded once; each question character is one
  model token (the tokenizer's own encoding of that character: Qwen2's splits
  digits into single tokens anyway), and the question's left padding becomes
  padding the model does not attend to (``qwen2`` takes a validity mask);
* completion: each model token's text, character by character, in the task
  alphabet (whitespace dropped, as a verifier strips it; any other character
  outside the alphabet becomes ``OTHER``, which no answer contains), the model's
  EOS becoming the task's EOS; the pieces are packed left (``task_tokens``).

Everything is array algebra inside the jitted round; the policy exposes the
same ``Rollouts`` functions as the small transformer (``policy.Rollouts``), so
SAPO and GRPO run it unchanged, vmapped over the node axis.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from decsim.errors import ConfigError
from decsim.rl import hf_checkpoint, qwen2, tasks
from decsim.rl.policy import Rollouts, fit_text
from decsim.types import Params, PRNGKey

INSTRUCTION = 'Answer with the result only. '
OTHER = 'c'  # a task character standing for any character outside the alphabet
MAX_CHARS = 16  # characters kept of one model token's text


class PromptTables(NamedTuple):
  prefix: np.ndarray  # [A] model tokens of the chat text before the question
  suffix: np.ndarray  # [S] model tokens after it (closing the user turn, opening the assistant's)
  char_token: np.ndarray  # [C] model token of each task character (PAD: pad_id)


def _render_split(tok: hf_checkpoint.ChatTokenizer) -> tuple[str, str]:
  marker = '\x00'
  text = tok.render([{'role': 'user', 'content': INSTRUCTION + marker}])
  before, after = text.split(marker)
  return before, after


def prompt_tables(tok: hf_checkpoint.ChatTokenizer, alphabet: str) -> PromptTables:
  """The chat text around a question, and each task character as one model token."""
  before, after = _render_split(tok)
  char_token = np.full((len(alphabet),), tok.pad_id, np.int32)
  for i, ch in enumerate(alphabet):
    if i in (tasks.PAD, tasks.EOS):
      continue
    ids = tok.encode(ch)
    if len(ids) != 1:
      raise ConfigError(f'--policy_path: the tokenizer encodes the task character {ch!r} as '
                        f'{len(ids)} tokens, not one; this checkpoint cannot read the task prompts')
    char_token[i] = ids[0]
  return PromptTables(np.asarray(tok.encode(before), np.int32),
                      np.asarray(tok.encode(after), np.int32), char_token)


def answer_table(tok: hf_checkpoint.ChatTokenizer, vocab: int, alphabet: str) -> np.ndarray:
  """``[V, MAX_CHARS]`` task characters of each model token's text (-1: none)."""
  table = np.full((vocab, MAX_CHARS), -1, np.int32)
  other = alphabet.index(OTHER)
  for token in range(min(vocab, tok.tokenizer.get_vocab_size())):
    if token in tok.eos_ids:
      table[token, 0] = tasks.EOS
      continue
    text = ''.join(c for c in tok.decode([token]) if not c.isspace())[:MAX_CHARS]
    chars = [alphabet.index(c) if c in alphabet[2:] else other for c in text]
    table[token, :len(chars)] = chars
  return table


def lm_prompts(tables: PromptTables, prompts: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Model tokens and validity ``[B, A + P + S]`` of task prompts ``[B, P]`` (left-padded)."""
  b = prompts.shape[0]
  tile = lambda x: jnp.broadcast_to(jnp.asarray(x), (b, len(x)))
  ids = jnp.concatenate([tile(tables.prefix), jnp.asarray(tables.char_token)[prompts],
                         tile(tables.suffix)], axis=1)
  valid = jnp.concatenate([jnp.ones((b, len(tables.prefix)), bool), prompts != tasks.PAD,
                           jnp.ones((b, len(tables.suffix)), bool)], axis=1)
  return ids, valid


def task_tokens(table: jax.Array, completions: jax.Array) -> jax.Array:
  """Completions ``[..., T]`` (model tokens) as task characters ``[..., T * MAX_CHARS]``: the
  text packed left and ended by EOS (the model's, or one after the text of a completion cut
  at T tokens: the verifier scores the text it has), PAD after."""
  chars = table[completions].reshape(*completions.shape[:-1], -1)  # [..., T*K], -1: nothing
  order = jnp.argsort(chars < 0, axis=-1, stable=True)  # present characters first, in order
  packed = jnp.take_along_axis(chars, order, axis=-1)
  count = (chars >= 0).sum(-1, keepdims=True)  # [..., 1]
  has_eos = (packed == tasks.EOS).any(-1, keepdims=True)
  end = (jnp.arange(packed.shape[-1]) == count) & ~has_eos
  return jnp.where(end, tasks.EOS, jnp.where(packed < 0, tasks.PAD, packed)).astype(jnp.int32)


def text_table(tables: PromptTables, tok: hf_checkpoint.ChatTokenizer) -> np.ndarray:
  """``[C]`` the model token of each task character, as in prompts; EOS: the model's EOS."""
  table = tables.char_token.copy()
  table[tasks.EOS] = tok.eos_ids[0]
  return table


def from_text(table: jax.Array, text: jax.Array, completion_len: int) -> jax.Array:
  """Shared task text ``[..., L]`` as this model's completions ``[..., T]``: one token per
  character (the tokenizer's own token of it; a canonical BPE merge of several characters is
  not searched for inside the jit), cut after T characters; PAD becomes the model's padding."""
  return table[fit_text(text, completion_len)]


class LMPolicy(NamedTuple):
  """A Qwen2 checkpoint as a policy; ``params`` is the checkpoint's (every node starts there)."""

  config: qwen2.Qwen2Config
  model: qwen2.LanguageModel
  params: Params
  rollouts: Rollouts
  tokenizer: Any  # hf_checkpoint.ChatTokenizer


def make_lm_policy(checkpoint: hf_checkpoint.Checkpoint, alphabet: str,
                   top_p: float = 1.0) -> LMPolicy:
  """SAPO's ``Rollouts`` of a loaded checkpoint for tasks over ``alphabet``."""
  model = qwen2.make_model(checkpoint.config)
  tok = checkpoint.tokenizer
  tables = prompt_tables(tok, alphabet)
  answers = jnp.asarray(answer_table(tok, checkpoint.config.vocab_size, alphabet))

  def sample(params: Params, key: PRNGKey, prompts: jax.Array, completion_len: int,
             temperature: float = 1.0) -> jax.Array:
    ids, valid = lm_prompts(tables, prompts)
    s = qwen2.Sampling(completion_len, temperature, top_p, tok.eos_ids, tok.pad_id)
    return qwen2.sample(model, params, key, ids, valid, s)

  def token_logprobs(params: Params, prompts: jax.Array, completions: jax.Array) -> jax.Array:
    ids, valid = lm_prompts(tables, prompts)
    return qwen2.token_logprobs(model, params, ids, valid, completions)

  rollouts = Rollouts(sample=sample, token_logprobs=token_logprobs,
                      completion_mask=functools.partial(qwen2.completion_mask,
                                                        eos_ids=tok.eos_ids),
                      task_tokens=functools.partial(task_tokens, answers),
                      from_text=functools.partial(from_text, jnp.asarray(text_table(tables, tok))))
  return LMPolicy(checkpoint.config, model, checkpoint.params, rollouts, tok)
