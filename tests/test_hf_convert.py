"""Hugging Face model directories in and out: `tools/convert_hf.py import/export` and
`init_from='hf:DIR'`, on tiny random models that `transformers` saves as safetensors.

Each reference model has every parameter perturbed, a 257-token byte-level tokenizer
without jaxgpt's chat tokens (so importing adds 5 rows), eager attention, float32.
"""

import dataclasses
import functools
import json
import os
import shutil

import jax
import numpy as np
import pytest

import helpers
from jaxgpt import sharding
from jaxgpt import config as config_lib
from jaxgpt import model as model_lib

from jaxgpt.data.tokenizer import hf_tokenizer
from jaxgpt.hf import exporter as hf_export
from jaxgpt.hf import importer as hf_import
from jaxgpt.hf import weights as hf

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
tokenizers = pytest.importorskip('tokenizers')
convert_hf = helpers.load_tool('convert_hf')

V = 257                     # the reference tokenizer: 256 bytes + <|endoftext|>
ADDED = len(hf_tokenizer.CHAT_TOKENS)
BATCH, SEQ = 4, 16
MESH = (2, 2, 2)
MESSAGES = [{'role': 'system', 'content': 'Be brief.'},
            {'role': 'user', 'content': 'Hello there, 你好! What is 2 + 3?'},
            {'role': 'assistant', 'content': ' Five.'},
            {'role': 'user', 'content': 'Привет'}]


def byte_tokenizer(directory):
  """GPT-2's byte-level BPE with no merges: one token per byte, then <|endoftext|>."""
  printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
               *range(ord('®'), ord('ÿ') + 1)]
  chars = [b if b in printable else 256 + sum(c not in printable for c in range(b))
           for b in range(256)]
  tk = tokenizers.Tokenizer(tokenizers.models.BPE(
      vocab={chr(c): i for i, c in enumerate(chars)}, merges=[]))
  tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = tokenizers.decoders.ByteLevel()
  tk.add_special_tokens([tokenizers.AddedToken('<|endoftext|>', special=True, normalized=False)])
  tk.save(os.path.join(directory, 'tokenizer.json'))
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w', encoding='utf-8') as f:
    json.dump({'tokenizer_class': 'PreTrainedTokenizerFast', 'eos_token': '<|endoftext|>'}, f)


def hf_model(kind, **changes):
  common = dict(vocab_size=V, dtype=torch.float32, attn_implementation='eager',
                bos_token_id=V - 1, eos_token_id=V - 1)
  if kind in ('llama', 'llama_tied'):
    # grouped-query attention, head_dim 12 != 64 / 8, rope_theta 5e5
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, head_dim=12, max_position_embeddings=256, rope_theta=5e5,
        tie_word_embeddings=kind == 'llama_tied', **common)
    cls = transformers.LlamaForCausalLM
  elif kind == 'mistral':  # a window shorter than the test rows
    config = transformers.MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=256, sliding_window=8, **common)
    cls = transformers.MistralForCausalLM
  elif kind == 'qwen2':
    config = transformers.Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True, **common)
    cls = transformers.Qwen2ForCausalLM
  elif kind == 'gemma3':  # a sliding-window layer (window 8), then a global one
    config = transformers.Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, head_dim=16, max_position_embeddings=256, sliding_window=8,
        layer_types=['sliding_attention', 'full_attention'], query_pre_attn_scalar=16,
        **common)
    cls = transformers.Gemma3ForCausalLM
  else:
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=8, n_positions=256,
                                     **common)
    cls = transformers.GPT2LMHeadModel
  for k, v in changes.items():
    setattr(config, k, v)
  model = cls(config).to(torch.float32).eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=gen))
  return model


def save_hf(model, directory, **kw):
  model.save_pretrained(directory, **kw)
  byte_tokenizer(directory)
  return str(directory)


def hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()


@pytest.fixture(scope='module')
def hf_dirs(tmp_path_factory):
  """{kind: (directory, torch model)} for llama (GQA), llama_tied, mistral (a window),
  qwen2 (q/k/v biases, tied), gemma3 (tied, windows, (1 + w) norms), gpt2."""
  out = {}
  for kind in ('llama', 'llama_tied', 'mistral', 'qwen2', 'gemma3', 'gpt2'):
    model = hf_model(kind)
    out[kind] = (save_hf(model, tmp_path_factory.mktemp(kind)), model)
  return out


@pytest.fixture(scope='module')
def tokens():
  return np.random.default_rng(0).integers(0, V, (BATCH, SEQ)).astype(np.int32)


def imported_config(hf_dir, tokenizer_dir, mesh_shape, vocab_multiple=1):
  cfg = config_lib.base_config()
  hf_import.adopt_hf_model(cfg, hf_dir, str(tokenizer_dir))
  cfg.model.vocab_multiple = vocab_multiple
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh_shape
  cfg.train.batch_size = BATCH
  config_lib.validate(cfg, int(np.prod(mesh_shape)))
  return cfg


@functools.cache
def _forward(mcfg):
  graphdef = model_lib.abstract_model(mcfg)[0]
  return jax.jit(lambda p, t: model_lib.merge(graphdef, p)(t))


def forward(params, mcfg, tokens):
  fn = _forward(mcfg)  # built outside the mesh context: NNX would apply logical names to it
  with jax.set_mesh(jax.tree.leaves(params)[0].sharding.mesh):
    return np.asarray(fn(params, tokens))


# -- import ---------------------------------------------------------------------------------


@pytest.mark.parametrize('kind,mesh_shape', [
    pytest.param(kind, mesh, id=f'{kind}-{"x".join(map(str, mesh))}')
    for kind in ('llama', 'mistral', 'gpt2') for mesh in ((1, 1, 1), MESH)
] + [pytest.param(kind, (1, 1, 1), id=f'{kind}-1x1x1') for kind in ('llama_tied', 'qwen2')]
   + [pytest.param('gemma3', MESH, id='gemma3-2x2x2')])
def test_import_logits_equal_hf(hf_dirs, tokens, tmp_path, kind, mesh_shape):
  """On the (2,2,2) mesh the 262-token vocabulary is padded to 384 so 'tensor' splits it."""
  hf_dir, model = hf_dirs[kind]
  padded = mesh_shape == MESH
  cfg = imported_config(hf_dir, tmp_path / 'tok', mesh_shape, vocab_multiple=128 if padded else 1)
  tied = kind in ('llama_tied', 'qwen2', 'gemma3', 'gpt2')
  assert cfg.model.vocab_size == V + ADDED and cfg.model.tie_embeddings == tied
  mcfg = model_lib.ModelConfig.from_config(cfg)
  mesh = sharding.make_mesh(cfg, helpers.devices_for(mesh_shape))
  params = hf_import.load_params(hf_dir, mesh, mcfg)
  logits = forward(params, mcfg, tokens)
  assert logits.shape == (BATCH, SEQ, 384 if padded else V + ADDED)
  np.testing.assert_allclose(logits[..., :V], hf_logits(model, tokens), rtol=1e-5, atol=1e-5)
  assert (logits[..., V + ADDED:] == -1e9).all()  # padding is never a token
  embed = np.asarray(params['embed'])
  np.testing.assert_allclose(embed[V:V + ADDED], np.broadcast_to(embed[:V].mean(0), (ADDED, 64)),
                             rtol=1e-6, atol=1e-7)  # added tokens start at the mean row
  assert ('lm_head' in params) == (not tied)


def test_sharded_checkpoint_with_index_equals_single_file(hf_dirs, tmp_path):
  hf_dir, model = hf_dirs['llama']
  sharded = save_hf(model, tmp_path / 'sharded', max_shard_size='40KB')
  assert os.path.exists(os.path.join(sharded, 'model.safetensors.index.json'))
  assert len([f for f in os.listdir(sharded) if f.endswith('.safetensors')]) > 2
  cfg = imported_config(hf_dir, tmp_path / 'tok', (1, 1, 1))
  mcfg = model_lib.ModelConfig.from_config(cfg)
  mesh = sharding.make_mesh(cfg, helpers.devices_for((1, 1, 1)))
  jax.tree.map(np.testing.assert_array_equal, hf_import.load_params(sharded, mesh, mcfg),
               hf_import.load_params(hf_dir, mesh, mcfg))


# -- export ---------------------------------------------------------------------------------


@pytest.mark.parametrize('kind', ['llama', 'gemma3', 'gpt2'])
def test_import_then_export_loads_in_transformers(hf_dirs, tokens, tmp_path, kind):
  """The command line both ways: the exported model's logits (added tokens included) and
  tokenizer (text and chat template) are jaxgpt's; original tensors come back bit-exact."""
  hf_dir, model = hf_dirs[kind]
  ckpt, out = str(tmp_path / 'ckpt'), str(tmp_path / 'hf')
  assert convert_hf.main(['import', '--hf', hf_dir, '--out', ckpt,
                          '--mesh', 'fsdp=4,tensor=2']) == 0
  assert convert_hf.main(['export', '--checkpoint', ckpt, '--out', out, '--max_shard_gb',
                          '0.0001', '--mesh', 'tensor=2,fsdp=-1']) == 0
  assert os.path.exists(os.path.join(out, 'model.safetensors.index.json'))
  params, mcfg, tok, _ = hf_export.load_for_export(checkpoint=ckpt, mesh={'tensor': 2, 'fsdp': 4})
  assert mcfg.padded_vocab_size == 384 and tok.vocab_size == V + ADDED

  back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                           attn_implementation='eager')
  assert type(back) is type(model)
  with_added = np.concatenate([tokens, np.full((BATCH, 2), V + 3, np.int32)], axis=1)
  np.testing.assert_allclose(hf_logits(back.eval(), with_added),
                             forward(params, mcfg, with_added)[..., :V + ADDED],
                             rtol=1e-5, atol=1e-5)
  sd = back.state_dict()
  for key, want in model.state_dict().items():
    if key.endswith(('.attn.bias', '.attn.masked_bias')):
      continue
    got = sd[key].numpy()
    if got.shape[0] == V + ADDED:
      got = got[:V]
    np.testing.assert_array_equal(got, want.numpy(), err_msg=key)

  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  text = 'Hello, wörld!  Ça va? 你好 <|endoftext|>'
  assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
  got = hf_tok.apply_chat_template(MESSAGES, add_generation_prompt=True)['input_ids']
  assert got == tok.chat.prompt(MESSAGES)
  assert hf_tok.decode(got) == tok.chat.render_text(MESSAGES, add_generation_prompt=True)
  generation = json.load(open(os.path.join(out, 'generation_config.json'), encoding='utf-8'))
  assert generation['eos_token_id'] == [tok.end_of_turn_id, tok.eot_id]


@pytest.mark.parametrize('kind,bias', [('llama', 0.0), ('gpt2', 0.7), ('llama', 0.7),
                                       ('gemma3', 0.0)])
def test_reward_model_exports_as_sequence_classifier(hf_dirs, tmp_path, kind, bias):
  """The score at the readout (the last non-pad token) equals jaxgpt's (Gemma 3: as a
  Gemma3TextForSequenceClassification). A nonzero bias of the scalar head folds into
  GPT-2's final LayerNorm; LLaMA has no place for it (noted in config.json, the scores
  differ by exactly it)."""
  cfg = imported_config(hf_dirs[kind][0], tmp_path / 'tok', (1, 1, 1))
  tok = hf_tokenizer.load(str(tmp_path / 'tok'))
  mcfg = model_lib.ModelConfig.from_config(cfg, scalar_head=True, lm_head=False)
  params = helpers.random_params(mcfg, seed=3, std=0.05)
  params['scalar_head']['bias'] = np.float32(bias)
  out = str(tmp_path / 'rm')
  got = hf_export.export(params, mcfg, tok, out, head='score')
  left = bias if kind == 'llama' else 0.0
  assert got['score_bias'] == pytest.approx(left)

  rows = [tok.chat.render(MESSAGES[:3])[0] + [tok.reward_id],
          tok.chat.render(MESSAGES[1:3])[0] + [tok.reward_id]]
  width = max(map(len, rows))
  ids = np.full((2, width), tok.pad_id, np.int32)
  for i, r in enumerate(rows):
    ids[i, :len(r)] = r
  readout = np.array([len(r) - 1 for r in rows], np.int32)
  ours = np.asarray(model_lib.merge(model_lib.abstract_model(mcfg)[0], params).score(
      ids, np.broadcast_to(np.arange(width), ids.shape), (ids != tok.pad_id).astype(np.int32),
      readout))
  rm = transformers.AutoModelForSequenceClassification.from_pretrained(
      out, dtype=torch.float32, attn_implementation='eager').eval()
  assert rm.config.num_labels == 1 and rm.config.pad_token_id == tok.pad_id
  with torch.no_grad():
    theirs = rm(torch.from_numpy(ids.astype(np.int64)),
                attention_mask=torch.from_numpy((ids != tok.pad_id).astype(np.int64))).logits
  np.testing.assert_allclose(theirs.numpy()[:, 0], ours - left, rtol=1e-4, atol=1e-4)


# -- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize('kind,change,match', [
    ('gpt2', dict(tie_word_embeddings=False), 'tie_word_embeddings=False'),
    ('llama', dict(model_type='qwen2_moe'), r"model_type='qwen2_moe' \(mixture-of-experts"),
    ('llama', dict(rope_scaling={'rope_type': 'dynamic', 'factor': 2.0}), "rope_type='dynamic'"),
    ('llama', dict(rope_scaling={'rope_type': 'llama3', 'factor': 8.0}),
     'rope_parameters.low_freq_factor=None'),
])
def test_unsupported_configs_fail_naming_the_setting(hf_dirs, kind, change, match):
  config = json.load(open(os.path.join(hf_dirs[kind][0], 'config.json'), encoding='utf-8'))
  config.update(change)
  config.pop('rope_parameters', None) if 'rope_scaling' in change else None
  with pytest.raises(hf.ConversionError, match=match):
    hf.model_config_from_hf(config)


def test_tied_and_untied_heads_are_checked(hf_dirs, tmp_path):
  """A checkpoint without lm_head.weight loads only under a config that says it ties; a
  tied config with a separate, different head is refused."""
  hf_dir, model = hf_dirs['llama']
  untied_without_head = shutil.copytree(hf_dir, tmp_path / 'no_head')
  sd = {k: v for k, v in model.state_dict().items() if k != 'lm_head.weight'}
  from safetensors.torch import save_file
  save_file({k: v.contiguous() for k, v in sd.items()},
            os.path.join(untied_without_head, 'model.safetensors'), metadata={'format': 'pt'})
  cfg = imported_config(hf_dir, tmp_path / 'tok', (1, 1, 1))
  mesh = sharding.make_mesh(cfg, helpers.devices_for((1, 1, 1)))
  mcfg = model_lib.ModelConfig.from_config(cfg)
  with pytest.raises(hf.ConversionError, match="'lm_head.weight'.*tie_word_embeddings"):
    hf_import.load_params(str(untied_without_head), mesh, mcfg)
  with pytest.raises(hf.ConversionError, match="'lm_head.weight' differs"):
    hf_import.load_params(hf_dir, mesh, dataclasses.replace(mcfg, tie_embeddings=True))


def test_damaged_or_mismatched_files_name_file_and_tensor(hf_dirs, tmp_path):
  hf_dir, _ = hf_dirs['gpt2']
  cfg = imported_config(hf_dir, tmp_path / 'tok', (1, 1, 1))
  mesh = sharding.make_mesh(cfg, helpers.devices_for((1, 1, 1)))
  mcfg = model_lib.ModelConfig.from_config(cfg)

  def broken(name, edit):
    d = shutil.copytree(hf_dir, tmp_path / name)
    edit(d)
    return str(d)

  weights = 'model.safetensors'

  def truncate(d):
    data = open(os.path.join(d, weights), 'rb').read()
    open(os.path.join(d, weights), 'wb').write(data[:len(data) // 2])

  def garble(d):
    data = bytearray(open(os.path.join(d, weights), 'rb').read())
    data[8:40] = b'#' * 32  # the JSON header
    open(os.path.join(d, weights), 'wb').write(bytes(data))

  for d in (broken('truncated', truncate), broken('garbled', garble)):
    with pytest.raises(hf.ConversionError, match=f'{d}/{weights}: not a readable safetensors'):
      hf_import.load_params(d, mesh, mcfg)
  smaller = dataclasses.replace(mcfg, d_ff=64)
  with pytest.raises(hf.ConversionError,
                     match=r"model.safetensors tensor 'transformer.h.0.mlp.c_fc.weight' has "
                           r'shape \(64, 256\), expected \(64, 64\)'):
    hf_import.load_params(hf_dir, mesh, smaller)
  with pytest.raises(hf.ConversionError, match="no tensor 'transformer.h.2.attn.c_attn.weight'"):
    hf_import.load_params(hf_dir, mesh, dataclasses.replace(mcfg, n_layers=3))

  def bad_index(d):
    json.dump({'weight_map': {'transformer.wte.weight': 'model-00002-of-00002.safetensors'}},
              open(os.path.join(d, 'model.safetensors.index.json'), 'w'))
  with pytest.raises(hf.ConversionError, match='lists model-00002-of-00002.safetensors, which'):
    hf_import.load_params(broken('bad_index', bad_index), mesh, mcfg)
  with pytest.raises(config_lib.ConfigError, match='has no config.json'):
    hf_import.adopt_hf_model(config_lib.base_config(), str(tmp_path), str(tmp_path / 't'))


# -- a stage from hf:DIR --------------------------------------------------------------------


def test_runs_take_the_architecture_and_tokenizer_from_the_import(hf_dirs, tmp_path):
  """init_from='hf:DIR' or an imported checkpoint sets config.model and config.tokenizer;
  the later stages of the same workdir (no init_from) keep them."""
  hf_dir, _ = hf_dirs['gpt2']
  direct = config_lib.base_config()
  direct.checkpoint.init_from, direct.model.vocab_multiple = f'hf:{hf_dir}', 8
  hf_import.adopt_init_settings(direct, str(tmp_path / 'run'))
  assert (direct.model.family, direct.model.vocab_size, direct.model.d_ff) == ('gpt2', 262, 256)
  assert direct.tokenizer.path == str(tmp_path / 'run' / 'hf_tokenizer')
  later = config_lib.base_config()
  hf_import.adopt_init_settings(later, str(tmp_path / 'run'))
  assert later.model == direct.model and later.tokenizer == direct.tokenizer
  # A record written before the families' switches were fields builds the same model.
  path = tmp_path / 'run' / hf_import.WORKDIR_RECORD
  record = json.loads(path.read_text())
  before = hf_import.ARCH_FIELDS[:hf_import.ARCH_FIELDS.index('tie_embeddings') + 1]
  record['model'] = {k: v for k, v in record['model'].items() if k in before}
  path.write_text(json.dumps(record))
  old = config_lib.base_config()
  hf_import.adopt_init_settings(old, str(tmp_path / 'run'))
  assert model_lib.ModelConfig.from_config(old) == model_lib.ModelConfig.from_config(direct)

  record = hf_import.import_checkpoint(hf_dir, str(tmp_path / 'ckpt'), vocab_multiple=128)
  assert record['n_params'] == model_lib.count_params(
      model_lib.abstract_model(model_lib.ModelConfig.from_config(later))[1]) + 120 * 64
  imported = config_lib.base_config()
  imported.checkpoint.init_from = str(tmp_path / 'ckpt')
  hf_import.adopt_init_settings(imported, str(tmp_path / 'run2'))
  assert imported.model.vocab_multiple == 128 and imported.model.d_model == 64
  assert imported.tokenizer.path == str(tmp_path / 'ckpt' / 'tokenizer')




@pytest.mark.slow
def test_sft_from_hf_dir_exports_a_model_that_generates_the_same(hf_dirs, tmp_path):
  """init_from='hf:DIR' (a tokenizer without chat tokens: they are added), four SFT steps on
  a (2,2,2) mesh, export: transformers' greedy generation from its chat template equals
  jaxgpt's greedy sampling."""
  from jaxgpt.inference import loading as inference, sampling  # pylint: disable=import-outside-toplevel
  from jaxgpt import run as run_lib
  hf_dir, _ = hf_dirs['llama']
  workdir, out = str(tmp_path / 'run'), str(tmp_path / 'hf')
  run_lib.run(helpers.smoke_config(**{
      'stage': 'sft', 'checkpoint.init_from': f'hf:{hf_dir}', 'model.vocab_multiple': 8,
      'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2, 'sft.eval_per_task': 1}), workdir)
  assert convert_hf.main(['export', '--workdir', workdir, '--stage', 'sft', '--out', out]) == 0
  loaded = inference.load(workdir, 'sft')
  assert loaded.mcfg.vocab_size == V + ADDED
  prompts = [[{'role': 'user', 'content': q}] for q in ('What is 2 + 3?', 'Say hi!')]
  ours = sampling.generate_text(loaded.graphdef, loaded.params, loaded.mcfg, loaded.tokenizer,
                                [loaded.tokenizer.chat.prompt(p) for p in prompts],
                                max_new_tokens=12)
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  for messages, want in zip(prompts, ours):
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True,
                                     return_tensors='pt')['input_ids']
    assert ids[0].tolist() == loaded.tokenizer.chat.prompt(messages)
    gen = back.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
    stops = (loaded.tokenizer.end_of_turn_id, loaded.tokenizer.eot_id)
    gen = gen[:next((i for i, t in enumerate(gen) if t in stops), len(gen))]
    assert hf_tok.decode(gen) == want


def test_continued_pretraining_starts_from_the_hf_weights(hf_dirs, tmp_path):
  """stage=pretrain with init_from='hf:DIR' starts from the imported weights."""
  from jaxgpt.stages import pretrain  # pylint: disable=import-outside-toplevel
  hf_dir, _ = hf_dirs['gpt2']
  for i in range(12):
    (tmp_path / f'doc{i}.txt').write_text(f'Document {i}: to be, or not to be. ' * 40)
  cfg = helpers.smoke_config(**{
      'stage': 'pretrain', 'checkpoint.init_from': f'hf:{hf_dir}', 'data.source': 'files',
      'data.paths': str(tmp_path / 'doc*.txt'), 'data.val_fraction': 0.2})
  hf_import.adopt_init_settings(cfg, str(tmp_path / 'run'))
  stage = pretrain.build(cfg, str(tmp_path / 'run'))
  mesh = sharding.make_mesh(cfg)
  jax.tree.map(np.testing.assert_array_equal, stage.init_params(),
               hf_import.load_params(hf_dir, mesh, stage.mcfg))
