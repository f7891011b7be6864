"""Qwen2 checkpoints from a Hugging Face directory on disk, offline: weights, tokenizer, chat template.

A user downloads a model once (``config.json``, ``*.safetensors``, ``tokenizer.json``,
``tokenizer_config.json``, optionally ``generation_config.json`` and
``chat_template.jinja``) and passes the directory as ``--policy_path``; nothing is
fetched at run time and neither PyTorch nor transformers is imported. Weights
are read with the ``safetensors`` package's NumPy API (``ml_dtypes`` — imported by
JAX — gives NumPy the bfloat16 of real checkpoints), text is tokenized with the
``tokenizers`` library, and the chat template shipped with the model is rendered
with ``jinja2`` as transformers renders it (a sandboxed environment with
``trim_blocks`` and ``lstrip_blocks``); a directory without a template gets
Qwen2's fixed ChatML form (``<|im_start|>role\\ncontent<|im_end|>\\n``).

Linear weights are stored ``[out, in]`` in the checkpoint and ``[in, out]`` here;
the layers' tensors are stacked on a leading ``[layers]`` axis (``qwen2.Qwen2``
scans over it).
"""

import json
import pathlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy for safetensors' NumPy API)
import numpy as np

from decsim.errors import ConfigError
from decsim.rl import qwen2
from decsim.types import Params

FLAG = '--policy_path'
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_LAYER_TENSORS = {  # our name under params['layers'] -> (checkpoint name in layer i, transpose)
    ('q_proj', 'kernel'): ('self_attn.q_proj.weight', True),
    ('q_proj', 'bias'): ('self_attn.q_proj.bias', False),
    ('k_proj', 'kernel'): ('self_attn.k_proj.weight', True),
    ('k_proj', 'bias'): ('self_attn.k_proj.bias', False),
    ('v_proj', 'kernel'): ('self_attn.v_proj.weight', True),
    ('v_proj', 'bias'): ('self_attn.v_proj.bias', False),
    ('o_proj', 'kernel'): ('self_attn.o_proj.weight', True),
    ('gate_proj', 'kernel'): ('mlp.gate_proj.weight', True),
    ('up_proj', 'kernel'): ('mlp.up_proj.weight', True),
    ('down_proj', 'kernel'): ('mlp.down_proj.weight', True),
    ('input_layernorm', 'weight'): ('input_layernorm.weight', False),
    ('post_attention_layernorm', 'weight'): ('post_attention_layernorm.weight', False),
}


def _fail(path: pathlib.Path, problem: str) -> ConfigError:
  return ConfigError(f'{FLAG}={path}: {problem}; point it to a Hugging Face Qwen2 checkpoint '
                     'directory (config.json, *.safetensors, tokenizer.json) downloaded once')


def _read_json(path: pathlib.Path, name: str, required: bool = True) -> dict[str, Any]:
  file = path / name
  if not file.is_file():
    if required:
      raise _fail(path, f'no {name} there')
    return {}
  try:
    return json.loads(file.read_text())
  except (OSError, ValueError) as e:
    raise _fail(path, f'{name} is unreadable ({type(e).__name__})') from None


def check_directory(path) -> pathlib.Path:
  """The checkpoint directory, or a one-line error naming what is missing."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise _fail(path, 'no such directory')
  for name in ('config.json', 'tokenizer.json'):
    if not (path / name).is_file():
      raise _fail(path, f'no {name} there (incomplete download?)')
  if not list(path.glob('*.safetensors')):
    raise _fail(path, 'no *.safetensors weights there (incomplete download?)')
  return path


def read_config(path: pathlib.Path, precision: str = 'float32') -> qwen2.Qwen2Config:
  """``Qwen2Config`` from ``config.json`` (rope_theta top-level or under rope_parameters)."""
  c = _read_json(path, 'config.json')
  if c.get('model_type') != 'qwen2':
    raise _fail(path, f'model_type is {c.get("model_type")!r}, not qwen2')
  rope = c.get('rope_parameters') or c.get('rope_scaling') or {}
  if rope.get('rope_type', rope.get('type', 'default')) != 'default':
    raise _fail(path, f'rope type {rope.get("rope_type")!r} is not supported (only default)')
  try:
    heads = int(c['num_attention_heads'])
    return qwen2.Qwen2Config(
        vocab_size=int(c['vocab_size']), hidden_size=int(c['hidden_size']),
        intermediate_size=int(c['intermediate_size']), num_layers=int(c['num_hidden_layers']),
        num_heads=heads, num_kv_heads=int(c.get('num_key_value_heads', heads)),
        head_dim=int(c.get('head_dim') or c['hidden_size'] // heads),
        rope_theta=float(c.get('rope_theta', rope.get('rope_theta', 10000.0))),
        rms_norm_eps=float(c.get('rms_norm_eps', 1e-6)),
        tie_word_embeddings=bool(c.get('tie_word_embeddings', False)), precision=precision)
  except KeyError as e:
    raise _fail(path, f'config.json lacks {e.args[0]}') from None


def read_tensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  """Every tensor of the directory's ``*.safetensors`` files (one file or shards), by name."""
  from safetensors.numpy import load_file
  tensors = {}
  for file in sorted(path.glob('*.safetensors')):
    try:
      tensors.update(load_file(str(file)))
    except Exception as e:  # safetensors raises its own error types for a damaged file
      raise _fail(path, f'{file.name} is unreadable ({type(e).__name__})') from None
  return tensors


def _tensor(path, tensors, name, shape) -> np.ndarray:
  for prefix in ('model.', ''):
    if prefix + name in tensors:
      x = tensors[prefix + name]
      if tuple(x.shape) != tuple(shape):
        raise _fail(path, f'tensor {name} has shape {tuple(x.shape)}, config.json implies {shape}')
      return x
  raise _fail(path, f'tensor {name} is missing from the *.safetensors files')


def _layer_shapes(c: qwen2.Qwen2Config) -> dict[tuple[str, str], tuple[int, ...]]:
  """Checkpoint (``[out, in]``) shape of each per-layer tensor."""
  q, kv, d, f = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.hidden_size, \
      c.intermediate_size
  return {('q_proj', 'kernel'): (q, d), ('q_proj', 'bias'): (q,), ('k_proj', 'kernel'): (kv, d),
          ('k_proj', 'bias'): (kv,), ('v_proj', 'kernel'): (kv, d), ('v_proj', 'bias'): (kv,),
          ('o_proj', 'kernel'): (d, q), ('gate_proj', 'kernel'): (f, d),
          ('up_proj', 'kernel'): (f, d), ('down_proj', 'kernel'): (d, f),
          ('input_layernorm', 'weight'): (d,), ('post_attention_layernorm', 'weight'): (d,)}


def to_params(path: pathlib.Path, c: qwen2.Qwen2Config, tensors: dict[str, np.ndarray]) -> Params:
  """The ``qwen2.Qwen2`` parameter tree of a checkpoint's tensors, in ``c.param_dtype``."""
  cast = lambda x: jnp.asarray(np.asarray(x, np.float32), c.param_dtype)
  layers: dict[str, dict[str, Any]] = {}
  for (module, leaf), shape in _layer_shapes(c).items():
    name, transpose = _LAYER_TENSORS[(module, leaf)]
    per_layer = [_tensor(path, tensors, f'layers.{i}.{name}', shape) for i in range(c.num_layers)]
    stacked = np.stack([x.T if transpose else x for x in per_layer])  # [layers, ...]
    layers.setdefault(module, {})[leaf] = cast(stacked)
  params = {'embed_tokens': {'embedding': cast(_tensor(path, tensors, 'embed_tokens.weight',
                                                       (c.vocab_size, c.hidden_size)))},
            'layers': layers,
            'norm': {'weight': cast(_tensor(path, tensors, 'norm.weight', (c.hidden_size,)))}}
  if not c.tie_word_embeddings:
    head = _tensor(path, tensors, 'lm_head.weight', (c.vocab_size, c.hidden_size))
    params['lm_head'] = {'kernel': cast(head.T)}
  return params


class ChatTokenizer(NamedTuple):
  """The model's tokenizer and chat template; ``eos_ids`` end a completion."""

  tokenizer: Any  # tokenizers.Tokenizer
  template: Any  # jinja2 Template
  eos_ids: tuple[int, ...]
  pad_id: int
  template_source: str  # 'chat_template.jinja', 'tokenizer_config.json' or 'fixed ChatML'

  def render(self, messages: list[dict[str, str]]) -> str:
    """The chat as the model expects it, ending with the assistant's turn opened."""
    return self.template.render(messages=messages, add_generation_prompt=True, tools=None)

  def encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text, add_special_tokens=False).ids

  def decode(self, ids) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def _template_text(path: pathlib.Path, tok_config: dict[str, Any]) -> tuple[str, str]:
  file = path / 'chat_template.jinja'
  if file.is_file():
    return file.read_text(), file.name
  template = tok_config.get('chat_template')
  if isinstance(template, list):  # named templates: the default one
    template = next((t['template'] for t in template if t.get('name') == 'default'), None)
  if isinstance(template, str):
    return template, 'tokenizer_config.json'
  return CHATML, 'fixed ChatML'


def compile_template(text: str):
  """A chat template compiled as transformers compiles it (sandboxed, trimmed blocks)."""
  from jinja2.exceptions import TemplateError
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise TemplateError(message)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.globals['raise_exception'] = raise_exception
  return env.from_string(text)


def _token_id(tokenizer, token) -> int | None:
  if isinstance(token, dict):  # AddedToken serialised as a dict
    token = token.get('content')
  return None if token is None else tokenizer.token_to_id(token)


def _eos_ids(path, config, gen_config, tok_config, tokenizer) -> tuple[int, ...]:
  eos = gen_config.get('eos_token_id', config.get('eos_token_id'))
  if eos is None:
    eos = _token_id(tokenizer, tok_config.get('eos_token'))
  ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
  if not ids:
    raise _fail(path, 'no eos_token_id in generation_config.json, config.json or the tokenizer')
  return ids


def read_tokenizer(path: pathlib.Path) -> ChatTokenizer:
  """The tokenizer (``tokenizer.json``), chat template, EOS and padding ids of a checkpoint."""
  from tokenizers import Tokenizer
  try:
    tokenizer = Tokenizer.from_file(str(path / 'tokenizer.json'))
  except Exception as e:  # tokenizers raises a bare Exception for a malformed file
    raise _fail(path, f'tokenizer.json is unreadable ({type(e).__name__})') from None
  tok_config = _read_json(path, 'tokenizer_config.json', required=False)
  eos = _eos_ids(path, _read_json(path, 'config.json'),
                 _read_json(path, 'generation_config.json', required=False), tok_config,
                 tokenizer)
  pad = _token_id(tokenizer, tok_config.get('pad_token'))
  text, source = _template_text(path, tok_config)
  return ChatTokenizer(tokenizer, compile_template(text), eos, eos[0] if pad is None else pad,
                       source)


class Checkpoint(NamedTuple):
  config: qwen2.Qwen2Config
  params: Params  # one model's parameters
  tokenizer: ChatTokenizer


def load(path, precision: str = 'float32') -> Checkpoint:
  """Reads a Qwen2 checkpoint directory; a one-line ``ConfigError`` if it is missing or incomplete."""
  path = check_directory(path)
  config = read_config(path, precision)
  params = to_params(path, config, read_tensors(path))
  return Checkpoint(config, params, read_tokenizer(path))


def stack(params: Params, nodes: int) -> Params:
  """N copies of one model's parameters, leaves ``[N, ...]`` (every node starts from the checkpoint)."""
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (nodes, *x.shape)).copy(), params)
