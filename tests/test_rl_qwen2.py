"""Qwen2 in Flax against transformers (stored oracle), its KV cache, vmap over nodes, loading.

The checkpoints in tests/data/qwen2_tiny* and their ``oracle.npz`` were written by
tests/scripts/make_qwen2_oracle.py with PyTorch and transformers; these tests need
neither.
"""

import functools
import json
import pathlib
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip('safetensors')
pytest.importorskip('tokenizers')
pytest.importorskip('jinja2')

from decsim.errors import ConfigError  # noqa: E402
from decsim.rl import hf_checkpoint, qwen2  # noqa: E402

DATA = pathlib.Path(__file__).parent / 'data'
CHECKPOINTS = ('qwen2_tiny', 'qwen2_tiny_tied')


class Jitted:
  """One model's functions, each compiled once per shape (eager dispatch is slow on the CI CPU)."""

  def __init__(self, model):
    self.config = model.config
    self.apply = jax.jit(model.apply, static_argnames='logits_from')
    self.forward = jax.jit(model.forward, static_argnames='logits_from')
    self.init_cache = model.init_cache
    self.sample = jax.jit(functools.partial(qwen2.sample, model), static_argnums=4)
    self.token_logprobs = jax.jit(functools.partial(qwen2.token_logprobs, model))


def load(name: str):
  ckpt = hf_checkpoint.load(DATA / name)
  model = qwen2.make_model(ckpt.config)
  return ckpt, model, Jitted(model), dict(np.load(DATA / name / 'oracle.npz'))


@pytest.fixture(scope='module', params=CHECKPOINTS)
def loaded(request):
  return load(request.param)


@pytest.fixture(scope='module')
def untied():
  return load('qwen2_tiny')


def chat_batch(oracle):
  """The oracle's chat prompts, left-padded: ids, valid ``[3, P]``."""
  ids = np.split(oracle['chat_ids'], np.cumsum(oracle['chat_len'])[:-1])
  p = max(len(x) for x in ids)
  tokens = np.zeros((len(ids), p), np.int32)
  valid = np.zeros((len(ids), p), bool)
  for row, x in enumerate(ids):
    tokens[row, p - len(x):], valid[row, p - len(x):] = x, True
  return jnp.asarray(tokens), jnp.asarray(valid)


def test_config_read_from_checkpoint(loaded):
  ckpt, _, _, _ = loaded
  c = ckpt.config
  assert (c.num_heads, c.num_kv_heads, c.head_dim, c.num_layers) == (4, 2, 8, 2)
  assert c.rope_theta == 10_000.0  # not the default: read from config.json
  assert ('lm_head' in ckpt.params) == (not c.tie_word_embeddings)


def test_logits_match_transformers(loaded):
  ckpt, _, jitted, oracle = loaded
  logits = jitted.apply(ckpt.params, jnp.asarray(oracle['ids']))
  np.testing.assert_allclose(logits, oracle['logits'], atol=1e-4, rtol=0)


def test_left_padded_logits_match_transformers(loaded):
  ckpt, _, jitted, oracle = loaded
  mask = oracle['pad_mask'].astype(bool)
  logits = jitted.apply(ckpt.params, jnp.asarray(oracle['pad_ids']), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(logits)[mask], oracle['pad_logits'][mask], atol=1e-4,
                             rtol=0)


def test_chat_template_and_tokens_match_transformers(loaded):
  ckpt, _, _, oracle = loaded
  tok = ckpt.tokenizer
  assert tok.template_source == 'chat_template.jinja'
  ids = np.split(oracle['chat_ids'], np.cumsum(oracle['chat_len'])[:-1])
  for text, expected, question in zip(oracle['chat_text'], ids, (
      'What is 37 + 5?', 'Reverse the digits of 583.',
      'How many ones are in the binary string 10110?')):
    rendered = tok.render([{'role': 'user', 'content': question}])
    assert rendered == str(text)
    assert tok.encode(rendered) == expected.tolist()


def test_greedy_generation_matches_transformers_token_for_token(loaded):
  ckpt, _, jitted, oracle = loaded
  assert float(oracle['greedy_gap']) > 1e-3  # argmax is decided well above float32 error
  tokens, valid = chat_batch(oracle)
  out = jitted.sample(ckpt.params, jax.random.key(0), tokens, valid,
                     qwen2.Sampling(completion_len=12, temperature=0.0))
  np.testing.assert_array_equal(out, oracle['greedy'])


def test_kv_cache_decode_equals_full_forward(untied):
  ckpt, _, model, oracle = untied
  tokens, valid = jnp.asarray(oracle['pad_ids']), jnp.asarray(oracle['pad_mask'].astype(bool))
  full = model.apply(ckpt.params, tokens, valid)
  logits, cache = model.forward(ckpt.params, tokens[:, :6], valid[:, :6],
                                model.init_cache(3, tokens.shape[1]))
  steps = [logits]
  for t in range(6, tokens.shape[1]):
    logits, cache = model.forward(ckpt.params, tokens[:, t:t + 1], valid[:, t:t + 1], cache)
    steps.append(logits)
  cached = jnp.concatenate(steps, axis=1)
  mask = np.asarray(valid)
  np.testing.assert_allclose(np.asarray(cached)[mask], np.asarray(full)[mask], atol=1e-5, rtol=0)


def test_token_logprobs_are_the_sampler_logits(untied):
  """Teacher-forced log-probs of a greedy completion == log-softmax of the cached decode's logits."""
  ckpt, _, model, oracle = untied
  tokens, valid = chat_batch(oracle)
  completions = jnp.asarray(oracle['greedy'])
  logp = model.token_logprobs(ckpt.params, tokens, valid, completions)  # [3, 12]
  seq = jnp.concatenate([tokens, completions], 1)
  seq_valid = jnp.concatenate([valid, jnp.ones(completions.shape, bool)], 1)
  logits, _ = model.forward(ckpt.params, seq, seq_valid, model.init_cache(*seq.shape))
  p = tokens.shape[1]
  expected = jnp.take_along_axis(jax.nn.log_softmax(logits[:, p - 1:-1]), completions[..., None],
                                 -1)[..., 0]
  np.testing.assert_allclose(logp, expected, atol=1e-5, rtol=0)
  assert logp.shape == (3, 12) and bool((logp <= 0).all())


def test_vmapped_over_stacked_nodes_equals_per_node(untied):
  """The untied checkpoint on two nodes (node 1's weights perturbed, leaves ``[2, ...]``)."""
  ckpt, model, jitted, oracle = untied
  rng = np.random.default_rng(7)
  stacked = jax.tree.map(lambda x: np.stack([x, x + 0.05 * rng.standard_normal(x.shape)]),
                         ckpt.params)
  tokens, valid = chat_batch(oracle)
  s = qwen2.Sampling(completion_len=6, temperature=1.0, top_p=0.9,
                     eos_ids=ckpt.tokenizer.eos_ids, pad_id=ckpt.tokenizer.pad_id)
  keys = jax.random.split(jax.random.key(3), 2)
  def node_sample(p, k):
    return qwen2.sample(model, p, k, tokens, valid, s)

  sample = jax.jit(jax.vmap(chex.assert_max_traces(node_sample, n=1)))
  logprobs = jax.jit(jax.vmap(lambda p, c: qwen2.token_logprobs(model, p, tokens, valid, c)))
  out = sample(stacked, keys)  # [2, 3, 6]
  logp = logprobs(stacked, out)  # [2, 3, 6]
  for n in range(2):
    node = jax.tree.map(lambda x: x[n], stacked)
    np.testing.assert_array_equal(out[n], jitted.sample(node, keys[n], tokens, valid, s))
    np.testing.assert_allclose(logp[n], jitted.token_logprobs(node, tokens, valid, out[n]),
                               atol=1e-5, rtol=0)
  assert not np.array_equal(logp[0], logp[1])  # the two nodes really differ
  again = sample(stacked, jax.random.split(jax.random.key(4), 2))  # new keys: no new trace
  assert again.shape == out.shape


def test_eos_ends_a_row_and_the_mask_keeps_it():
  completions = jnp.array([[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]])
  np.testing.assert_array_equal(qwen2.completion_mask(completions, (2,)),
                                [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])


def test_top_p_keeps_the_smallest_set_reaching_p():
  logits = jnp.log(jnp.array([[0.5, 0.05, 0.3, 0.15], [0.97, 0.01, 0.01, 0.01]]))
  kept = np.isfinite(qwen2.top_p_filter(logits, 0.8))
  np.testing.assert_array_equal(kept, [[True, False, True, False], [True, False, False, False]])
  assert np.isfinite(qwen2.top_p_filter(logits, 1.0)).all()
  draws = jax.jit(jax.vmap(lambda k: qwen2.draw(k, logits, 1.0, 1e-6)))(jax.random.split(
      jax.random.key(0), 50))
  assert (draws == 0).all()  # a tiny nucleus is greedy


def test_precisions(untied):
  ckpt, _, _, oracle = untied
  ids = jnp.asarray(oracle['ids'])
  for precision, param_dtype in (('bfloat16', jnp.bfloat16), ('bfloat16_master', jnp.float32)):
    c = ckpt.config._replace(precision=precision)
    params = hf_checkpoint.to_params(DATA, c, hf_checkpoint.read_tensors(DATA / 'qwen2_tiny'))
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(param_dtype)}
    logits = jax.jit(qwen2.make_model(c).apply)(params, ids)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, oracle['logits'], atol=0.15, rtol=0)  # bfloat16 error


@pytest.mark.parametrize('damage, message', [
    ('missing', 'no such directory'),
    ('config.json', 'no config.json'),
    ('tokenizer.json', 'no tokenizer.json'),
    ('model.safetensors', 'no *.safetensors'),
])
def test_missing_or_incomplete_directory_is_one_line(tmp_path, damage, message):
  path = tmp_path / 'ckpt'
  if damage != 'missing':
    shutil.copytree(DATA / 'qwen2_tiny', path)
    (path / damage).unlink()
  with pytest.raises(ConfigError) as e:
    hf_checkpoint.load(path)
  assert message in str(e.value) and '--policy_path' in str(e.value)
  assert '\n' not in str(e.value)


def test_missing_tensor_and_wrong_family_are_one_line(tmp_path):
  path = tmp_path / 'ckpt'
  shutil.copytree(DATA / 'qwen2_tiny', path)
  from safetensors.numpy import load_file, save_file
  tensors = load_file(str(path / 'model.safetensors'))
  del tensors['model.layers.1.mlp.up_proj.weight']
  save_file(tensors, str(path / 'model.safetensors'))
  with pytest.raises(ConfigError, match='layers.1.mlp.up_proj.weight is missing'):
    hf_checkpoint.load(path)
  config = (path / 'config.json').read_text().replace('"qwen2"', '"llama"')
  (path / 'config.json').write_text(config)
  with pytest.raises(ConfigError, match="model_type is 'llama'"):
    hf_checkpoint.load(path)


def test_fixed_chatml_without_a_template(tmp_path):
  path = tmp_path / 'ckpt'
  shutil.copytree(DATA / 'qwen2_tiny', path)
  (path / 'chat_template.jinja').unlink()
  tok = hf_checkpoint.read_tokenizer(path)
  assert tok.template_source == 'fixed ChatML'
  assert tok.render([{'role': 'user', 'content': 'hi'}]) == (
      '<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n')


def test_task_prompts_become_the_chat_template_and_answers_become_task_text():
  from decsim.rl import lm_policy, tasks
  ckpt = hf_checkpoint.load(DATA / 'qwen2_tiny')
  tok = ckpt.tokenizer
  tables = lm_policy.prompt_tables(tok, tasks.CHARS)
  prompts = jnp.asarray(np.stack([tasks.encode('  37+5='), tasks.encode('r583=', 7)]))
  ids, valid = lm_policy.lm_prompts(tables, prompts)
  for row, question in enumerate(('37+5=', 'r583=')):
    text = tok.tokenizer.decode(np.asarray(ids[row])[np.asarray(valid[row])].tolist(),
                                skip_special_tokens=False)
    assert text == tok.render([{'role': 'user', 'content': lm_policy.INSTRUCTION + question}])
  table = jnp.asarray(lm_policy.answer_table(tok, ckpt.config.vocab_size, tasks.CHARS))
  answer = lambda text, eos: jnp.asarray(tok.encode(text) + ([tok.eos_ids[0]] if eos else []))
  decode = lambda t: tasks.decode(lm_policy.task_tokens(table, t)).rstrip(' ')
  assert decode(answer(' 42', True)) == '42$'  # whitespace dropped, the model's EOS kept
  assert decode(answer('42', False)) == '42$'  # a cut completion: its text is the answer
  assert decode(answer('4 is x', True)) == '4ccc$'  # letters outside the alphabet: OTHER
  assert float(tasks.score(lm_policy.task_tokens(table, answer('42', True)),
                           jnp.asarray(tasks.encode('42', 3)), 2)) == 1.0


def test_qwen2_policy_flags_are_checked_before_anything_runs(tmp_path):
  from decsim.rl.experiment import SapoRunConfig
  with pytest.raises(ConfigError, match='--policy=qwen2 needs --policy_path'):
    SapoRunConfig(policy='qwen2')
  with pytest.raises(ConfigError, match='no such directory'):
    SapoRunConfig(policy='qwen2', policy_path=str(tmp_path / 'absent'))
  with pytest.raises(ConfigError, match='--lm_precision'):
    SapoRunConfig(policy='qwen2', policy_path=str(DATA / 'qwen2_tiny'), lm_precision='fp8')


@pytest.mark.slow
def test_sapo_runs_with_the_qwen2_policy(tmp_path):
  """Two nodes start from the tiny checkpoint and take two SAPO rounds through the shared loop."""
  from decsim.rl import experiment
  c = experiment.SapoRunConfig(policy='qwen2', policy_path=str(DATA / 'qwen2_tiny'), nodes=2,
                               local_groups=2, external_groups=1, generations=2, rounds=2,
                               log_every=2, completion_len=6, top_p=0.95)
  summary = experiment.run(c, out_dir=tmp_path / 'run', log=lambda *a: None)
  assert summary['status'] == 'completed' and summary['rounds'] == 2
  rows = [json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert [r['round'] for r in rows] == [1, 2]
  assert all(np.isfinite(r['loss']) and r['bytes_shared'] > 0 for r in rows)
