"""Hugging Face LLaMA (GQA) and GPT-2 weights give the same logits in jaxgpt, both ways.

The reference models are random-init `LlamaForCausalLM` / `GPT2LMHeadModel` built
offline from a config, with every parameter perturbed (biases and norm weights too,
which a fresh init leaves at 0 / 1), eager attention, float32.
"""

import dataclasses
import functools
import re

import jax
import numpy as np
import pytest

import helpers
from jaxgpt import sharding
from jaxgpt import config as config_lib
from jaxgpt import model as model_lib
from jaxgpt.hf import weights as hf

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

MESH = (2, 2, 2)
BATCH, SEQ = 4, 16


def hf_config(family):
  common = dict(vocab_size=256, attn_implementation='eager', dtype=torch.float32)
  if family == 'llama':
    return transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=32, rms_norm_eps=1e-5,
        rope_theta=10000.0, **common)
  return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=8, n_positions=32,
                                 bos_token_id=0, eos_token_id=0, **common)


def hf_model(family, seed=None):
  """A float32 HF model in eval mode; with `seed`, every parameter perturbed."""
  cls = transformers.LlamaForCausalLM if family == 'llama' else transformers.GPT2LMHeadModel
  model = cls(hf_config(family)).to(torch.float32).eval()
  assert model.config._attn_implementation == 'eager'
  if seed is not None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
      for p in model.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=gen))
  return model


def hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.from_numpy(np.asarray(tokens, np.int64))).logits.numpy()


def jax_config(family, mesh=MESH):
  cfg = config_lib.base_config()
  cfg.model.update(hf.model_config_from_hf(hf_config(family)))
  cfg.tokenizer.vocab_size = cfg.model.vocab_size
  cfg.data.seq_len = SEQ
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh
  cfg.train.batch_size = BATCH
  return cfg


@functools.cache
def forward(family, mesh_shape):
  """(jitted forward, mesh, mcfg) for the family on a mesh of that shape."""
  cfg = jax_config(family, mesh_shape)
  config_lib.validate(cfg, int(np.prod(mesh_shape)))
  mcfg = model_lib.ModelConfig.from_config(cfg)
  mesh = sharding.make_mesh(cfg, helpers.devices_for(mesh_shape))
  graphdef, abstract, logical = model_lib.abstract_model(mcfg)
  param_sh = sharding.param_shardings(abstract, logical, mesh, mcfg.rules)
  fn = jax.jit(lambda p, t: model_lib.merge(graphdef, p)(t),
               in_shardings=(param_sh, sharding.batch_sharding(mesh, mcfg.rules)))

  def run(params, tokens):
    with jax.set_mesh(mesh):
      return np.asarray(fn(params, tokens))

  return run, mcfg


@pytest.fixture(scope='module', params=['llama', 'gpt2'])
def case(request):
  family = request.param
  model = hf_model(family, seed=1)
  state_dict = {k: v.numpy() for k, v in model.state_dict().items()}
  tokens = np.random.default_rng(0).integers(0, 256, (BATCH, SEQ)).astype(np.int32)
  _, mcfg = forward(family, (1, 1, 1))
  return dict(family=family, model=model, state_dict=state_dict, tokens=tokens,
              mcfg=mcfg, params=hf.from_hf(state_dict, mcfg), ref=hf_logits(model, tokens))


def assert_logits_close(got, want):
  assert got.shape == want.shape and got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_params_have_the_model_tree(case):
  _, abstract, _ = model_lib.abstract_model(case['mcfg'])
  assert jax.tree.structure(case['params']) == jax.tree.structure(abstract)
  for got, want in zip(jax.tree.leaves(case['params']), jax.tree.leaves(abstract)):
    assert got.shape == want.shape and got.dtype == want.dtype


@pytest.mark.parametrize('mesh_shape', [(1, 1, 1), MESH], ids=['1dev', '2x2x2'])
def test_logits_match_hf(case, mesh_shape):
  run, _ = forward(case['family'], mesh_shape)
  assert_logits_close(run(case['params'], case['tokens']), case['ref'])


def test_hf_to_jaxgpt_to_hf_is_exact(case):
  back = hf.to_hf(case['params'], case['mcfg'])
  assert back.keys() == case['state_dict'].keys()
  for k, want in case['state_dict'].items():
    assert back[k].dtype == want.dtype, k
    np.testing.assert_array_equal(back[k], want, err_msg=k)


def test_jaxgpt_to_hf_to_jaxgpt_is_exact(case):
  """jaxgpt params -> HF model (strict load) -> state_dict -> jaxgpt params, bit-exact,
  and the HF model computes the jaxgpt logits."""
  run, mcfg = forward(case['family'], (1, 1, 1))
  params = helpers.random_params(mcfg, seed=7, std=0.05)
  model = hf_model(case['family'])
  sd = {k: torch.from_numpy(v) for k, v in hf.to_hf(params, mcfg).items()}
  model.load_state_dict(sd, strict=True)
  again = hf.from_hf({k: v.numpy() for k, v in model.state_dict().items()}, mcfg)
  jax.tree.map(np.testing.assert_array_equal, again, params)
  assert_logits_close(run(params, case['tokens']), hf_logits(model, case['tokens']))


def test_from_hf_accepts_torch_tensors_and_the_experiment_config(case):
  sd = {k: torch.from_numpy(v) for k, v in case['state_dict'].items()}
  jax.tree.map(np.testing.assert_array_equal, hf.from_hf(sd, case['mcfg']), case['params'])
  cfg = jax_config(case['family'])
  jax.tree.map(np.testing.assert_array_equal, hf.from_hf(sd, cfg), case['params'])
  # bfloat16 checkpoints load (numpy has no bfloat16 of its own) into float32 params
  bf16 = {k: v.to(torch.bfloat16) for k, v in sd.items()}
  want = hf.from_hf({k: v.float().numpy() for k, v in bf16.items()}, case['mcfg'])
  jax.tree.map(np.testing.assert_array_equal, hf.from_hf(bf16, case['mcfg']), want)


def test_config_from_hf():
  for family in ('llama', 'gpt2'):
    cfg = jax_config(family)
    config_lib.validate(cfg, 8)  # the fields are real config.model fields, and consistent
    m = cfg.model
    assert (m.family, m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.max_seq_len) == (
        family, 256, 64, 2, 8, 32)
    assert m.n_kv_heads == (4 if family == 'llama' else 8)
    assert m.d_ff == (128 if family == 'llama' else 256)
    # a plain dict (config.json) gives the same fields
    assert hf.model_config_from_hf(hf_config(family).to_dict()) == hf.model_config_from_hf(
        hf_config(family))
  llama = hf_config('llama')
  assert hf.model_config_from_hf(llama)['rope_theta'] == 10000.0
  odd = dict(llama.to_dict(), head_dim=16)
  assert hf.model_config_from_hf(odd)['head_dim'] == 16


@pytest.mark.parametrize('change,match', [
    (dict(model_type='bert'), "model_type='bert'"),
    (dict(attention_bias=True), 'attention_bias'),
    (dict(hidden_act='gelu'), 'hidden_act'),
    (dict(rope_parameters={'rope_type': 'yarn', 'factor': 2.0, 'rope_theta': 1e4}),
     "rope_type='yarn'"),
    (dict(rope_parameters={'rope_type': 'default', 'rope_theta': 1e4,
                           'partial_rotary_factor': 0.5}), 'partial_rotary_factor=0.5'),
    (dict(num_local_experts=8), 'num_local_experts=8'),
])
def test_config_from_hf_rejects_unsupported_llama(change, match):
  with pytest.raises(hf.ConversionError, match=match):
    hf.model_config_from_hf(dict(hf_config('llama').to_dict(), **change))


def test_config_from_hf_rejects_exact_gelu():
  with pytest.raises(hf.ConversionError, match='activation_function'):
    hf.model_config_from_hf(dict(hf_config('gpt2').to_dict(), activation_function='gelu'))


def test_bad_state_dicts_name_the_key(case):
  sd, mcfg = dict(case['state_dict']), case['mcfg']
  key = ('model.layers.1.self_attn.k_proj.weight' if case['family'] == 'llama'
         else 'transformer.h.1.attn.c_attn.weight')
  shape = (32, 64) if case['family'] == 'llama' else (64, 192)

  missing = {k: v for k, v in sd.items() if k != key}
  with pytest.raises(hf.ConversionError,
                     match=re.escape(f"no key '{key}' (expected shape {shape})")):
    hf.from_hf(missing, mcfg)

  wrong = dict(sd, **{key: sd[key][:-1]})
  with pytest.raises(hf.ConversionError,
                     match=re.escape(f"'{key}' has shape {sd[key][:-1].shape}, expected {shape}")):
    hf.from_hf(wrong, mcfg)

  extra = dict(sd, **{'model.layers.0.self_attn.q_proj.bias': np.zeros(64, np.float32)})
  with pytest.raises(hf.ConversionError, match='q_proj.bias'):
    hf.from_hf(extra, mcfg)
  hf.from_hf(extra, mcfg, strict=False)

  if case['family'] == 'gpt2':
    untied = dict(sd, **{'lm_head.weight': sd['lm_head.weight'] + 1})
    with pytest.raises(hf.ConversionError, match='lm_head.weight'):
      hf.from_hf(untied, mcfg)
  else:
    # no head of its own: only a model that says it ties them (tie_word_embeddings) loads
    tied = {k: v for k, v in sd.items() if k != 'lm_head.weight'}
    with pytest.raises(hf.ConversionError, match="'lm_head.weight'.*tie_word_embeddings"):
      hf.from_hf(tied, mcfg)
    params = hf.from_hf(tied, dataclasses.replace(mcfg, tie_embeddings=True))
    assert 'lm_head' not in params
