"""Writes the tiny Qwen2 checkpoints and transformers' reference outputs that tests/test_rl_qwen2.py reads.

Needs PyTorch and transformers, which the CI install does not have (PyTorch is
gigabytes); run it in a separate environment and commit what it writes:

  python3 -m venv /tmp/oracle-venv
  /tmp/oracle-venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
  /tmp/oracle-venv/bin/pip install transformers safetensors tokenizers jinja2 numpy
  /tmp/oracle-venv/bin/python tests/scripts/make_qwen2_oracle.py

For each of two random Qwen2 configurations — untied head with float32 weights
(``tests/data/qwen2_tiny``) and tied head with bfloat16 weights, as Qwen2.5-0.5B
ships (``tests/data/qwen2_tiny_tied``) — it saves, with ``save_pretrained``, the
model and a small byte-level BPE tokenizer trained here with ``tokenizers`` and
carrying a ChatML chat template, and ``oracle.npz`` with transformers' float32
outputs (eager attention):

* ``ids [2, 20]`` random token ids and their ``logits [2, 20, V]``;
* ``pad_ids, pad_mask [3, 12]`` left-padded rows and their ``pad_logits``;
* ``chat_text`` the template rendered by ``apply_chat_template`` for three
  questions, ``chat_ids`` its token ids (ragged, flattened with ``chat_len``);
* ``greedy [3, 12]``: ``generate(do_sample=False)`` of each prompt alone, no EOS stop;
* ``greedy_gap``: the smallest top-1 minus top-2 logit along those generations
  (a greedy comparison is only meaningful if this is well above float32 error).
"""

import json
import pathlib
import sys

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

OUT = pathlib.Path(__file__).resolve().parents[1] / 'data'
SPECIAL = ['<|endoftext|>', '<|im_start|>', '<|im_end|>']
TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QUESTIONS = ['What is 37 + 5?', 'Reverse the digits of 583.',
             'How many ones are in the binary string 10110?']
CORPUS = ['system user assistant You are a helpful assistant.', *QUESTIONS,
          'The answer is 42. Count the bits, add the numbers, reverse the string.'] * 20


def make_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer)
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token='<|im_end|>', pad_token='<|endoftext|>')
  fast.chat_template = TEMPLATE
  return fast


def model_config(vocab: int, tied: bool) -> transformers.Qwen2Config:
  return transformers.Qwen2Config(
      vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
      rope_theta=10_000.0, rms_norm_eps=1e-6, tie_word_embeddings=tied,
      initializer_range=0.2, eos_token_id=2, bos_token_id=0, attn_implementation='eager')


@torch.no_grad()
def reference(model, tokenizer, rng: np.random.Generator) -> dict[str, np.ndarray]:
  vocab = model.config.vocab_size
  ids = rng.integers(0, vocab, (2, 20))
  logits = model(torch.tensor(ids)).logits.numpy()
  pad_mask = np.ones((3, 12), np.int64)
  pad_mask[0, :5], pad_mask[1, :1] = 0, 0
  pad_ids = np.where(pad_mask == 1, rng.integers(0, vocab, (3, 12)), 0)
  pad_logits = model(torch.tensor(pad_ids), attention_mask=torch.tensor(pad_mask)).logits.numpy()
  chats = [[{'role': 'user', 'content': q}] for q in QUESTIONS]
  chat_text = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
               for c in chats]
  chat_ids = [tokenizer(t, add_special_tokens=False)['input_ids'] for t in chat_text]
  greedy, gaps = [], []
  for prompt in chat_ids:
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                         do_sample=False, max_new_tokens=12, min_new_tokens=12,
                         eos_token_id=None, pad_token_id=0, output_scores=True,
                         return_dict_in_generate=True)
    greedy.append(out.sequences[0, len(prompt):].numpy())
    top2 = torch.stack(out.scores)[:, 0].topk(2, dim=-1).values
    gaps.append(float((top2[:, 0] - top2[:, 1]).min()))
  return {'ids': ids, 'logits': logits, 'pad_ids': pad_ids, 'pad_mask': pad_mask,
          'pad_logits': pad_logits, 'chat_text': np.array(chat_text),
          'chat_ids': np.concatenate(chat_ids), 'chat_len': np.array([len(c) for c in chat_ids]),
          'greedy': np.stack(greedy), 'greedy_gap': np.array(min(gaps))}


def write(name: str, tied: bool, dtype: torch.dtype, seed: int) -> None:
  torch.manual_seed(seed)
  out = OUT / name
  out.mkdir(parents=True, exist_ok=True)
  tokenizer = make_tokenizer(300)
  model = transformers.Qwen2ForCausalLM(model_config(len(tokenizer), tied)).eval()
  model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids('<|im_end|>')
  model.to(dtype).save_pretrained(out)
  tokenizer.save_pretrained(out)
  reloaded = transformers.Qwen2ForCausalLM.from_pretrained(
      out, dtype=torch.float32, attn_implementation='eager').eval()
  ref = reference(reloaded, tokenizer, np.random.default_rng(seed))
  np.savez_compressed(out / 'oracle.npz', **ref)
  (out / 'oracle.json').write_text(json.dumps(
      {'transformers': transformers.__version__, 'torch': torch.__version__,
       'greedy_gap': float(ref['greedy_gap'])}, indent=1) + '\n')
  print(f'{out}: vocab {len(tokenizer)}, greedy gap {float(ref["greedy_gap"]):.4f}')


def main() -> None:
  write('qwen2_tiny', tied=False, dtype=torch.float32, seed=0)
  write('qwen2_tiny_tied', tied=True, dtype=torch.bfloat16, seed=1)


if __name__ == '__main__':
  sys.exit(main())
