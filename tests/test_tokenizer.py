"""Tokenizer: lossless round trips, atomic special tokens, LLaMA-layout fallbacks."""

import importlib.util
import io
import os
import pathlib
import random

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxgpt.data import tokenizer as tokenizer_lib
from jaxgpt.data.tokenizer import SPECIAL_TOKENS, Tokenizer, check_vocab, train_tokenizer

WORDS = ('the king is dead long live the queen where art thou romeo to be or not '
         'that is the question all the world a stage men women players 2024 café').split()
TRICKY = [' ', '  ', '\n', '\t', '\r\n', '\u2581', '\u2581\u2581', 'a', 'é', '中', '😀', '\x00',
          '<', '|', '>', '<|', '|>', '<0x41>', '<unk>', '</s>'] + list(SPECIAL_TOKENS.values())


def synthetic_texts(n=200, seed=0):
  rng = random.Random(seed)
  return [' '.join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) + '\n'
          for _ in range(n)]


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp('tok') / 'tok.model'
  return train_tokenizer(synthetic_texts(), str(path), vocab_size=400)


@pytest.fixture(scope='module')
def llama_tok(tmp_path_factory):
  """A LLaMA-layout model: <unk>=0 <s>=1 </s>=2, byte fallback, dummy prefix."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(synthetic_texts()), model_writer=model, model_type='bpe',
      vocab_size=350, byte_fallback=True, normalization_rule_name='identity',
      remove_extra_whitespaces=False, add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2,
      pad_id=-1, hard_vocab_limit=False, minloglevel=2)
  path = tmp_path_factory.mktemp('llama') / 'tokenizer.model'
  path.write_bytes(model.getvalue())
  return Tokenizer.load(path)


tricky_text = st.one_of(
    st.text(),
    st.lists(st.sampled_from(TRICKY), max_size=30).map(''.join),
    st.lists(st.one_of(st.sampled_from(TRICKY), st.text(max_size=5)), max_size=20).map(''.join),
)


@settings(max_examples=400, deadline=None)
@given(tricky_text, st.booleans())
def test_round_trip_is_lossless(tok, text, allow_special):
  assert tok.decode(tok.encode(text, allow_special=allow_special)) == text


@settings(max_examples=200, deadline=None)
@given(tricky_text)
def test_llama_layout_round_trip(llama_tok, text):
  assert llama_tok.decode(llama_tok.encode(text)) == text


def test_layout_and_special_ids(tok):
  ids = {name: tok.encode(s) for name, s in SPECIAL_TOKENS.items()}
  assert all(len(v) == 1 for v in ids.values()), ids
  assert len({v[0] for v in ids.values()}) == len(SPECIAL_TOKENS)
  assert tok.pad_id == 0 == ids['pad'][0]
  assert tok.eot_id == ids['endoftext'][0]
  assert tok.end_of_turn_id == ids['end_of_turn'][0]
  assert tok.reward_id == ids['reward'][0]
  for role in ('system', 'user', 'assistant'):
    assert tok.role_id(role) == ids[role][0]
  with pytest.raises(ValueError, match='role'):
    tok.role_id('robot')
  assert tok.vocab_size == 400


@pytest.mark.parametrize('left,right', [('', ''), ('abc', 'def'), ('the', ' '), ('\n', 'x'),
                                        ('<', '>'), ('|', '|'), ('\u2581', '\u2581')])
def test_special_tokens_are_atomic_next_to_text(tok, left, right):
  for name, special in SPECIAL_TOKENS.items():
    ids = tok.encode(left + special + right)
    special_id = tok.encode(special)[0]
    assert ids.count(special_id) == 1, (name, ids)
    assert tok.decode(ids) == left + special + right


def test_adjacent_special_tokens(tok):
  text = ''.join(SPECIAL_TOKENS.values()) * 2
  assert tok.encode(text) == [tok.encode(s)[0] for s in SPECIAL_TOKENS.values()] * 2


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(TRICKY + WORDS), max_size=25).map(''.join))
def test_plain_text_never_yields_special_ids(tok, text):
  special_ids = {tok.encode(s)[0] for s in SPECIAL_TOKENS.values()}
  ids = tok.encode(text, allow_special=False)
  assert not special_ids & set(ids)
  assert tok.decode(ids) == text


def test_out_of_vocab_ids_decode_to_replacement_char(tok):
  ids = tok.encode('to be') + [tok.vocab_size + 5] + tok.encode(' or not')
  assert tok.decode(ids) == 'to be\ufffd or not'


def test_vocab_size_mismatch_message(tok):
  check_vocab(tok, tok.vocab_size)
  check_vocab(tok, 4096)
  with pytest.raises(ValueError) as err:
    check_vocab(tok, tok.vocab_size - 1)
  msg = str(err.value)
  assert 'config.model.vocab_size' in msg and 'config.tokenizer.path' in msg
  assert str(tok.vocab_size) in msg


def test_load_pickle_and_missing_file(tok, tmp_path):
  loaded = Tokenizer.load(tok.path)
  assert loaded.encode('where art thou\n') == tok.encode('where art thou\n')
  import pickle  # grain worker processes receive the tokenizer pickled
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.encode('<|user|>hi') == tok.encode('<|user|>hi') and clone.path == tok.path
  with pytest.raises(FileNotFoundError, match='config.tokenizer.path'):
    Tokenizer.load(tmp_path / 'nope.model')


def test_llama_layout_fallbacks(llama_tok):
  assert llama_tok.eot_id == 2 and llama_tok.id_to_piece(2) == '</s>'
  assert llama_tok.pad_id == 0
  for get in (lambda t: t.end_of_turn_id, lambda t: t.reward_id, lambda t: t.role_id('user')):
    with pytest.raises(ValueError, match='tools/train_tokenizer.py'):
      get(llama_tok)
  # The special strings are plain text to this model.
  assert llama_tok.decode(llama_tok.encode('a<|user|>b')) == 'a<|user|>b'


def test_vocab_too_small(tmp_path):
  with pytest.raises(ValueError, match='too small'):
    train_tokenizer(['hello'], str(tmp_path / 't.model'), vocab_size=100)
  assert tokenizer_lib.MIN_VOCAB_SIZE == 256 + 1 + len(SPECIAL_TOKENS)


def test_cli_trains_from_files(tmp_path, monkeypatch):
  monkeypatch.setenv('JAXGPT_CACHE', str(tmp_path / 'cache'))
  (tmp_path / 'a.txt').write_text(''.join(synthetic_texts(30, seed=1)))
  (tmp_path / 'b.jsonl').write_text('\n'.join(
      f'{{"body": "{t.strip()}"}}' for t in synthetic_texts(30, seed=2)))
  script = pathlib.Path(__file__).parent.parent / 'tools' / 'train_tokenizer.py'
  spec = importlib.util.spec_from_file_location('train_tokenizer_cli', script)
  cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cli)
  out = tmp_path / 'out' / 'tok.model'
  assert cli.main(['--out', str(out), '--vocab_size', '300', '--text_field', 'body',
                   '--input', str(tmp_path / '*.txt'), str(tmp_path / '*.jsonl')]) == 0
  tok = Tokenizer.load(out)
  assert tok.vocab_size <= 300 and tok.decode(tok.encode('romeo\tthou')) == 'romeo\tthou'
  assert os.listdir(out.parent) == ['tok.model']  # no temporary file left behind
