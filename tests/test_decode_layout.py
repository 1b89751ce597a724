"""The sampler's own sharding (config.mesh.decode_rules) gives the training layout's tokens
and log-probs, batched and streamed, on meshes with an 'fsdp' axis; bad entries fail
naming the field. (That it moves fewer bytes per decode step: tests/test_aot.py.)"""

import jax
import numpy as np
import pytest

import helpers
from jaxgpt import sharding
from jaxgpt import config as config_lib
from jaxgpt import model as model_lib
from jaxgpt.inference import sampling
from jaxgpt.inference.sampling import SamplingConfig

B, P, N = 4, 8, 8
LENGTHS = np.array([8, 3, 5, 1], np.int32)
LAYOUTS = {'replicated': config_lib.DEFAULT_DECODE_RULES,
           'fsdp_as_tensor': config_lib.DECODE_RULES_FSDP_AS_TENSOR}
SETTINGS = [SamplingConfig(max_new_tokens=N, temperature=0.0),
            SamplingConfig(max_new_tokens=N, temperature=1.0, top_k=20, stop_ids=(7,))]


def decode(family, mesh_shape, decode_rules, settings):
  cfg = helpers.tiny_config(family, mesh=mesh_shape)
  cfg.model.init_std = 0.3
  cfg.mesh.decode_rules = decode_rules
  config_lib.validate(cfg, int(np.prod(mesh_shape)))
  mcfg = model_lib.ModelConfig.from_config(cfg)
  assert (mcfg.decode_rules is None) == (decode_rules == ())
  mesh = sharding.make_mesh(cfg, helpers.devices_for(mesh_shape))
  graphdef = model_lib.abstract_model(mcfg)[0]
  params = helpers.place(helpers.random_params(mcfg, std=0.3), mcfg, mesh)  # training layout
  prompts = np.random.default_rng(1).integers(1, 256, size=(B, P)).astype(np.int32)
  out = sampling.sample(graphdef, params, mcfg, prompts, LENGTHS, jax.random.PRNGKey(0),
                        settings)
  streamed = None
  if settings.temperature == 0.0:  # the stream draws differently when it samples
    streamed = list(sampling.stream(graphdef, params, mcfg, prompts[0, :LENGTHS[0]].tolist(),
                                    settings=settings))
  return jax.device_get(out), streamed


# Each layout on each family and mesh, greedy (with the stream) or top-k, once each: the
# suite's time goes to compiling, and every pairing adds two samplers.
@pytest.mark.parametrize('family,mesh_shape,layout,settings', [
    ('llama', (2, 2, 2), 'replicated', SETTINGS[0]),
    ('llama', (2, 2, 2), 'fsdp_as_tensor', SETTINGS[1]),
    ('gpt2', (1, 2, 4), 'replicated', SETTINGS[1]),
    ('gpt2', (1, 2, 4), 'fsdp_as_tensor', SETTINGS[0]),
], ids=['llama-replicated-greedy', 'llama-fsdp_as_tensor-top_k', 'gpt2-replicated-top_k',
        'gpt2-fsdp_as_tensor-greedy'])
def test_decode_layout_gives_the_training_layouts_results(family, mesh_shape, layout, settings):
  old, old_stream = decode(family, mesh_shape, (), settings)
  new, new_stream = decode(family, mesh_shape, LAYOUTS[layout], settings)
  for field in ('tokens', 'response_mask', 'lengths', 'finished'):
    np.testing.assert_array_equal(getattr(new, field), getattr(old, field), err_msg=field)
  np.testing.assert_allclose(new.logprobs, old.logprobs, atol=2e-5)
  if settings.temperature == 0.0:
    assert new_stream == old_stream == old.tokens[0].tolist()


@pytest.mark.parametrize('entry,match', [
    (('embd', None), r"config\.mesh\.decode_rules: \('embd', None\) is not a"),
    (('embed', 'fsd'), r"config\.mesh\.decode_rules: .* names mesh axes other than"),
    (('act_batch', ('data', 'fsdp', 'tensor')), r"maps 'act_batch' to .*not more"),
])
def test_bad_decode_rules_fail_naming_the_field(entry, match):
  cfg = helpers.tiny_config(mesh=(1, 2, 4))
  cfg.mesh.decode_rules = (entry,)
  with pytest.raises(config_lib.ConfigError, match=match) as e:
    config_lib.validate(cfg, 8)
  assert '\n' not in str(e.value)


def test_a_decode_layout_the_model_does_not_divide_names_decode_rules():
  cfg = helpers.tiny_config('llama', mesh=(1, 2, 4))  # 4 kv heads over tensor * fsdp = 8
  cfg.mesh.decode_rules = config_lib.DECODE_RULES_FSDP_AS_TENSOR
  mcfg = model_lib.ModelConfig.from_config(cfg)
  mesh = sharding.make_mesh(cfg, helpers.devices_for((1, 2, 4)))
  with pytest.raises(config_lib.ConfigError,
                     match=r"n_kv_heads=4 .* config\.mesh\.decode_rules maps its logical axis"):
    sampling.decode_param_shardings(mcfg, mesh, sampling.decode_layout(mcfg))
