"""The open families jaxgpt imports, against transformers' own models: Llama 3 (llama3 RoPE
scaling, tied), Mistral (sliding window), Qwen 2 (q/k/v biases, tied), Qwen 3 (q/k norms,
head_dim of its own) and Gemma 3 (Gemma3ForCausalLM: (1 + w) norms before and after
attention and MLP, q/k norms, scaled embeddings, GeGLU, query_pre_attn_scalar, sliding and
global layers with their own RoPE bases and linear scaling on the global ones).

Each reference is built here from a random config: 3 layers, d 64, 8 query / 4 key-value
heads, an odd vocabulary of 97 (padded to 104 rows in jaxgpt so 'tensor' splits it), every
parameter perturbed so norms and biases are not trivial, eager attention, float32; the
windows (5 and 6 tokens) are shorter than the sequences. Checked: logits on one device and
on the (2,2,2) and (1,2,4) meshes, greedy KV-cache decoding against `generate` for 24
tokens past the window, HF -> jaxgpt -> HF state dicts, and a sharded train step's
gradients against one device's.
"""

import functools

import jax
import numpy as np
import pytest

import helpers
from jaxgpt import sharding
from jaxgpt import config as config_lib
from jaxgpt import model as model_lib
from jaxgpt.hf import weights as hf
from jaxgpt.inference import sampling
from jaxgpt.train import trainer

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

V, BATCH, SEQ = 97, 4, 16
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
              rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA3_ROPE = {'rope_type': 'llama3', 'rope_theta': 5e5, 'factor': 8.0, 'low_freq_factor': 1.0,
               'high_freq_factor': 4.0, 'original_max_position_embeddings': 32}
# name -> (config class, model class, what the family's config adds)
CASES = {
    'llama3': ('LlamaConfig', 'LlamaForCausalLM',
               dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)),
    'mistral': ('MistralConfig', 'MistralForCausalLM', dict(sliding_window=5)),
    'qwen2': ('Qwen2Config', 'Qwen2ForCausalLM', dict(tie_word_embeddings=True)),
    'qwen3': ('Qwen3Config', 'Qwen3ForCausalLM', dict(head_dim=16, rope_parameters={
        'rope_type': 'default', 'rope_theta': 1e6})),
    'gemma3': ('Gemma3TextConfig', 'Gemma3ForCausalLM', dict(
        head_dim=16, query_pre_attn_scalar=24, sliding_window=6,
        layer_types=['sliding_attention', 'full_attention', 'sliding_attention'],
        rope_parameters={'full_attention': {'rope_type': 'linear', 'factor': 8.0,
                                            'rope_theta': 1e6},
                         'sliding_attention': {'rope_type': 'default', 'rope_theta': 1e4}})),
}
WINDOW = {'mistral': 5, 'gemma3': 6}


def hf_config(name):
  config_cls, _, extra = CASES[name]
  return getattr(transformers, config_cls)(**COMMON, **extra, attn_implementation='eager',
                                           dtype=torch.float32)


@functools.cache
def hf_model(name):
  """The float32 reference in eval mode, every parameter perturbed. Its random init is
  seeded, and in a forked RNG so it neither depends on nor changes what ran before."""
  with torch.random.fork_rng():
    torch.manual_seed(0)
    model = getattr(transformers, CASES[name][1])(hf_config(name)).to(torch.float32).eval()
  assert model.config._attn_implementation == 'eager'
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))
  return model


def jax_config(name, mesh=(1, 1, 1)):
  cfg = config_lib.base_config()
  cfg.model.update(hf.model_config_from_hf(hf_config(name)))
  cfg.model.vocab_multiple = 8
  cfg.tokenizer.vocab_size = V
  cfg.data.seq_len = SEQ
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh
  cfg.train.batch_size = BATCH
  config_lib.validate(cfg, int(np.prod(mesh)))
  return cfg


@functools.cache
def case(name):
  """(mcfg, HF state dict as numpy, jaxgpt params from it)."""
  mcfg = model_lib.ModelConfig.from_config(jax_config(name))
  state_dict = {k: v.numpy() for k, v in hf_model(name).state_dict().items()}
  return mcfg, state_dict, hf.from_hf(state_dict, mcfg)


@functools.cache
def tokens():
  return np.random.default_rng(0).integers(0, V, (BATCH, SEQ)).astype(np.int32)


@functools.cache
def hf_logits(name):
  with torch.no_grad():
    return hf_model(name)(torch.from_numpy(tokens().astype(np.int64))).logits.numpy()


def test_config_maps_each_family_both_ways():
  """config.json -> config.model sets each family's switches; the exported config.json
  rebuilds the same config.model; dicts (config.json) read as the config objects do."""
  want = {'llama3': dict(rope_scaling='llama3', rope_factor=8.0, rope_original_max_len=32,
                         tie_embeddings=True),
          'mistral': dict(sliding_window=5, window_pattern='S'),
          'qwen2': dict(bias='qkv', tie_embeddings=True),
          'qwen3': dict(qk_norm=True, head_dim=16, rope_theta=1e6),
          'gemma3': dict(norm_plus_one=True, post_norms=True, qk_norm=True, embed_scale=True,
                         mlp_activation='gelu_tanh', sliding_window=6, window_pattern='SG',
                         attn_scale_dim=24.0, rope_theta=1e6, local_rope_theta=1e4,
                         rope_scaling='linear', tie_embeddings=True)}
  for name, fields in want.items():
    got = hf.model_config_from_hf(hf_config(name))
    assert got['family'] == (name[:-1] if name == 'llama3' else name)
    assert {k: got[k] for k in fields} == fields, name
    assert hf.model_config_from_hf(hf_config(name).to_dict()) == got, name
    back = hf.hf_config_from_model(model_lib.ModelConfig.from_config(jax_config(name)))
    assert hf.model_config_from_hf(back) == got, name
    rebuilt = transformers.AutoConfig.for_model(back.pop('model_type'), **back)
    assert hf.model_config_from_hf(rebuilt) == got, name


@pytest.mark.parametrize('name', CASES)
def test_hf_to_jaxgpt_to_hf_is_exact(name):
  mcfg, state_dict, params = case(name)
  back = hf.to_hf(params, mcfg)
  assert back.keys() == state_dict.keys()
  for k, want in state_dict.items():
    np.testing.assert_array_equal(back[k], want, err_msg=k)


@functools.cache
def forward(name, mesh_shape):
  cfg = jax_config(name, mesh_shape)
  mcfg = model_lib.ModelConfig.from_config(cfg)
  mesh = sharding.make_mesh(cfg, helpers.devices_for(mesh_shape))
  graphdef = model_lib.abstract_model(mcfg)[0]
  fn = jax.jit(lambda p, t: model_lib.merge(graphdef, p)(t))
  with jax.set_mesh(mesh):
    return np.asarray(fn(helpers.place(case(name)[2], mcfg, mesh), tokens()))


@pytest.mark.parametrize('mesh_shape', [(1, 1, 1), (2, 2, 2), (1, 2, 4)],
                         ids=['1dev', '2x2x2', '1x2x4'])
@pytest.mark.parametrize('name', CASES)
def test_logits_equal_transformers(name, mesh_shape):
  logits = forward(name, mesh_shape)
  assert logits.shape == (BATCH, SEQ, 104) and (logits[..., V:] == -1e9).all()
  np.testing.assert_allclose(logits[..., :V], hf_logits(name), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name', CASES)
def test_greedy_kv_cache_decoding_equals_generate(name):
  """Two prompts of different lengths in one batch (the shorter right-padded), greedy,
  until 24 tokens past the window (past position 24 without one): the tokens of
  transformers' `generate` on each prompt alone, and each token's log-prob under its
  logits (which a wrong window changes even where the argmax stays). The reference runs
  with no eos (`min_new_tokens` would instead mask eos out of its logits, which jaxgpt's
  greedy step does not), so both take the argmax for every one of the tokens."""
  mcfg, _, params = case(name)
  new = WINDOW.get(name, 0) + 24
  prompts = [tokens()[0, :7], tokens()[1, :4]]
  ids, lengths = sampling.pad_prompts(prompts, 0, bucket=8)
  graphdef = model_lib.abstract_model(mcfg)[0]
  out = sampling.sample(graphdef, jax.device_put(params), mcfg, ids, lengths,
                        jax.random.PRNGKey(0),
                        sampling.SamplingConfig(max_new_tokens=new, temperature=0.0))
  got, got_logprobs = np.asarray(out.tokens), np.asarray(out.logprobs)
  for row, prompt in enumerate(prompts):
    with torch.no_grad():
      want = hf_model(name).generate(
          torch.from_numpy(prompt[None].astype(np.int64)), max_new_tokens=new, do_sample=False,
          eos_token_id=None, attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
          output_logits=True, return_dict_in_generate=True)
    assert got[row].tolist() == want.sequences[0, len(prompt):].tolist(), f'row {row}'
    logprobs = torch.log_softmax(torch.cat(want.logits)[:, :V], -1).numpy()
    np.testing.assert_allclose(got_logprobs[row], logprobs[np.arange(new), got[row]],
                               rtol=1e-4, atol=1e-4, err_msg=f'row {row}')


@pytest.mark.parametrize('name', ['gemma3'])
def test_sharded_train_step_equals_one_device(name):
  """Gradients and the update of one step (scanned layers, full remat, packed segments) on
  the (2,2,2) mesh equal one device's: q/k norms, post norms, scaled embeddings and
  windows (q/k/v biases: GPT-2's, tests/test_sharding_parity.py)."""
  loss_fn = trainer.lm_loss_fn(z_loss=1e-4, use_segment_ids=True)

  def step(mesh_shape):
    cfg = jax_config(name, mesh_shape)
    cfg.model.remat = 'full'
    mcfg = model_lib.ModelConfig.from_config(cfg)
    return helpers.one_train_step(cfg, mcfg, loss_fn, helpers.random_batch(cfg, segments=True))

  helpers.assert_same_step(step((2, 2, 2)), step((1, 1, 1)))
