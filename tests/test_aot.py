"""Ahead-of-time compile-and-fit (`jaxgpt.aot.compile_fit`, `tools/aot.py`) on tiny configs.

On the 8 CPU devices; the TPU cases compile for a v5p-8 slice (the train step, then the
splash attention kernel inside it, the sampler in both decode layouts) when libtpu is
installed (`pip install -e '.[tpu-aot]'`) and are skipped otherwise.
"""

import os
import subprocess
import sys

import jax
import pytest

import helpers
import xla_test_flags
from jaxgpt import sharding
from jaxgpt import config as config_lib
from jaxgpt import model as model_lib
from jaxgpt.aot import collectives, targets
from jaxgpt.aot import compile_fit as aot
from jaxgpt.aot.plans import plan


def hand_computed_state_bytes(cfg, devices: int) -> float:
  """float32 parameters and AdamW's two moments, split evenly over the devices."""
  n = model_lib.count_params(model_lib.abstract_model(model_lib.ModelConfig.from_config(cfg))[1])
  return 3 * 4 * n / devices


def measure_train_step(cfg, devices):
  config_lib.validate(cfg, len(devices))
  p = plan(cfg, 'pretrain', sharding.make_mesh(cfg, devices))
  return p, aot.measure(p, p.steps[0])


def test_train_step_memory_on_8_cpu_devices_is_parameters_and_adam_moments():
  cfg = helpers.tiny_config(mesh=(1, 8, 1))
  p, train = measure_train_step(cfg, jax.devices())
  hand = hand_computed_state_bytes(cfg, 8)
  assert train.step == 'train' and train.shape == '16x16'
  assert abs(p.state_bytes - hand) / hand < 0.1
  assert abs(train.argument_bytes - hand) / hand < 0.1  # the compiler's own count
  assert train.total_bytes >= train.argument_bytes and not train.refused
  lookup = cfg.model.vocab_size * cfg.model.d_model  # the untied embedding is no matmul
  assert train.flops > 6 * (p.n_params - lookup) * 16 * 16  # 6N a token plus attention


def test_a_lora_sft_step_holds_optimizer_state_for_the_adapters_only():
  cfg = helpers.tiny_config(mesh=(1, 8, 1))
  config_lib.validate(cfg, 8)
  mesh = sharding.make_mesh(cfg, jax.devices())
  full = plan(cfg, 'sft', mesh)
  with cfg.unlocked():
    cfg.lora.rank = 2
  adapted = plan(cfg, 'sft', mesh)
  assert adapted.params_bytes > full.params_bytes  # the base and its adapters
  adapter_bytes = adapted.params_bytes - full.params_bytes
  assert adapted.opt_bytes == pytest.approx(2 * adapter_bytes, rel=0.1)  # AdamW's moments of
  assert adapted.opt_bytes < 0.3 * full.opt_bytes                        # the adapters alone
  train = aot.measure(adapted, adapted.steps[0])
  assert train.argument_bytes < full.state_bytes and not train.refused


def test_state_larger_than_a_device_fails_in_one_line_before_compiling(monkeypatch):
  cfg = helpers.tiny_config(mesh=(1, 8, 1))
  monkeypatch.setattr(targets, '_host_memory_bytes', lambda: 8 * 2 ** 10)  # 1 KiB a device
  with pytest.raises(aot.DoesNotFit) as e:
    aot.check_fits(cfg, compile_steps=False)
  message = str(e.value)
  assert '\n' not in message
  assert message.startswith('pretrain needs ') and 'GiB per device' in message
  monkeypatch.undo()
  assert aot.check_fits(cfg, compile_steps=False) == []  # fits: nothing compiled


def test_slice_names_map_to_libtpu_topologies():
  v5p, v5e = targets.FAMILIES['v5p'], targets.FAMILIES['v5e']
  assert targets.slice_shape(v5p, 4) == (2, 2, 1)      # v5p-8: 4 chips
  assert targets.slice_shape(v5p, 32) == (2, 4, 4)     # v5p-64
  assert targets.slice_shape(v5e, 8) == (2, 4)         # v5e-8
  assert targets.slice_shape(v5e, 1) == (1, 1)         # Colab's v5e-1
  for bad in ('v9-8', 'v5p', 'v2-16', 'v5e-3'):
    with pytest.raises(config_lib.ConfigError, match='--topology'):
      targets.tpu_target(bad)


@pytest.mark.skipif(not targets.libtpu_installed(),
                    reason="libtpu is not installed (pip install -e '.[tpu-aot]')")
def test_small_train_step_compiles_for_a_v5p_slice_without_a_tpu():
  # Every weight's last two dims a multiple of TPU tiles (8, 128) on each device, so
  # padding does not blur the comparison with the hand-computed bytes.
  cfg = helpers.tiny_config(vocab=1024)
  m = cfg.model
  m.d_model, m.n_heads, m.n_kv_heads, m.head_dim, m.d_ff = 512, 8, 8, 128, 1024
  cfg.tokenizer.vocab_size = 1024
  cfg.mesh.fsdp = -1
  target = targets.tpu_target('v5p-8')
  assert len(target.devices) == 4 and target.device_kind.startswith('TPU v5')
  _, train = measure_train_step(cfg, target.devices)
  hand = hand_computed_state_bytes(cfg, 4)
  assert abs(train.argument_bytes - hand) / hand < 0.1
  assert train.fits(target.hbm_bytes) and train.temp_bytes > 0


@pytest.mark.skipif(not targets.libtpu_installed(),
                    reason="libtpu is not installed (pip install -e '.[tpu-aot]')")
@pytest.mark.parametrize('attention', ['splash', 'auto'])
def test_splash_attention_compiles_inside_the_train_step_for_a_tpu_slice(attention):
  """The Pallas kernel (forward and backward) lowers to a Mosaic custom call inside the
  scanned, sharded train step and compiles for v5p: rows over 'data', heads over
  'tensor' (shard_map), 16 positions padded to a 128-block, GQA. On a TPU mesh, 'auto'
  picks splash for rows of a block or more."""
  cfg = helpers.tiny_config(mesh=(2, 1, 2), seq_len=16 if attention == 'splash' else 128)
  cfg.model.max_seq_len = 128
  cfg.model.attention = attention
  target = targets.tpu_target('v5p-8')
  config_lib.validate(cfg, len(target.devices))
  p = plan(cfg, 'pretrain', sharding.make_mesh(cfg, target.devices))
  lowered = p.steps[0].lower(p.steps[0].rows)
  # One kernel forward, its dq and dkv kernels in the backward pass (scanned layers: once).
  assert lowered.as_text().count('tpu_custom_call') == 3
  assert lowered.compile().memory_analysis().temp_size_in_bytes > 0


def test_tool_prints_the_table_for_this_machine():
  env = dict(os.environ, XLA_FLAGS=xla_test_flags.flags(devices=2))
  proc = subprocess.run(
      [sys.executable, 'tools/aot.py', '--config=experiments/tiny.py:smoke', '--stage=pretrain',
       '--steps=eval', '--search=false', '--peak_tflops=1'],
      cwd=helpers.ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'local = 2 x cpu' in proc.stdout
  row = next(line for line in proc.stdout.splitlines() if line.startswith('| eval | 8x64 |'))
  assert '| yes |' in row


# A decode loop (scope 'decode_loop') whose body gathers a weight twice (sync and async)
# and runs a 3-trip layer loop with one all-reduce; an all-gather outside it, and another
# loop, do not count.
DECODE_HLO = """
HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%layer (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %ar = f32[4,8]{1,0} all-reduce(%x), channel_id=1, to_apply=%add
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%i, %ar)
}

%step (p: (s32[], f32[4,8], bf16[2,8])) -> (s32[], f32[4,8], bf16[2,8]) {
  %p = (s32[], f32[4,8]{1,0}, bf16[2,8]{1,0}) parameter(0)
  %w = bf16[2,8]{1,0} get-tuple-element(%p), index=2
  %ag = bf16[8,8]{1,0} all-gather(%w), channel_id=2, dimensions={0}
  %ags = (bf16[2,8]{1,0}, bf16[8,8]{1,0}) all-gather-start(bf16[2,8]{1,0} %w), dimensions={0}
  %agd = bf16[8,8]{1,0} all-gather-done(%ags)
  %l = (s32[], f32[4,8]{1,0}) while(%p), condition=%c, body=%layer, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %r = (s32[], f32[4,8]{1,0}, bf16[2,8]{1,0}) tuple(%p)
}

ENTRY %main (x: f32[8,8]) -> f32[64,8] {
  %x = f32[8,8]{1,0} parameter(0)
  %g = f32[64,8]{1,0} all-gather(%x), dimensions={0}
  %d = (s32[], f32[4,8]{1,0}, bf16[2,8]{1,0}) while(%t), condition=%c, body=%step, metadata={op_name="jit(run)/decode_loop/while" stack_frame_id=3}
  %o = (s32[], f32[4,8]{1,0}) while(%t), condition=%c, body=%layer, metadata={op_name="jit(run)/while"}
  ROOT %y = f32[64,8]{1,0} copy(%g)
}
"""


def test_collectives_of_one_decode_step_from_hlo_text():
  step = collectives.loop_body_collectives(DECODE_HLO, 'decode_loop')
  assert dict(step.bytes_by_kind) == {'all-gather': 2 * 8 * 8 * 2, 'all-reduce': 3 * 4 * 8 * 4}
  assert dict(step.count_by_kind) == {'all-gather': 2, 'all-reduce': 3}
  assert collectives.loop_body_collectives(DECODE_HLO, 'prefill_loop') is None


@pytest.mark.skipif(not targets.libtpu_installed(),
                    reason="libtpu is not installed (pip install -e '.[tpu-aot]')")
def test_decode_layout_moves_fewer_bytes_per_decode_step_on_a_tpu_slice():
  """FSDP over the 4 chips of a v5p-8. In the training layout the TPU compiler gathers
  every weight inside the per-token loop (XLA:CPU hoists the gathers out of it, so the
  CPU mesh cannot show the difference); the decode layout gathers them once, before the
  loop, and holds them whole: 4x the bytes of a training shard."""
  target = targets.tpu_target('v5p-8')

  def generate(decode_rules):
    cfg = helpers.tiny_config(mesh=(1, 4, 1))
    cfg.mesh.decode_rules = decode_rules
    cfg.train.sample_tokens = 8
    config_lib.validate(cfg, len(target.devices))
    p = plan(cfg, 'pretrain', sharding.make_mesh(cfg, target.devices), prompt_len=8)
    step = next(s for s in p.steps if s.name == 'generate')
    return p, step, aot.measure(p, step)

  p, train_layout, before = generate(())
  _, decode_layout, after = generate(config_lib.DEFAULT_DECODE_RULES)
  assert before.decode_step.bytes_by_kind['all-gather'] > 0.5 * p.params_bytes * 4
  assert after.decode_step.total_bytes < before.decode_step.total_bytes
  assert after.decode_step.bytes_by_kind.get('all-gather', 0) == 0
  assert train_layout.decode_weight_bytes == p.params_bytes
  assert decode_layout.decode_weight_bytes == 4 * p.n_params  # float32, whole on every chip
  assert after.fits(target.hbm_bytes)


@pytest.mark.skipif(not targets.libtpu_installed(),
                    reason="libtpu is not installed (pip install -e '.[tpu-aot]')")
@pytest.mark.parametrize('variant', ['smoke', None], ids=['smoke', 'tiny'])
def test_every_program_of_the_shipped_tiny_configs_compiles_and_fits_a_tpu_chip(variant):
  """experiments/tiny.py (and its smoke variant), as shipped, on Colab's v5e-1: the SFT
  stage's train and eval steps and the sampler's prefill and generation."""
  cfg = helpers.load_experiment('tiny').get_config(variant)
  target = targets.tpu_target('v5e-1')
  config_lib.validate(cfg, len(target.devices))
  p = plan(cfg, 'sft', sharding.make_mesh(cfg, target.devices))
  assert [s.name for s in p.steps] == ['train', 'eval', 'prefill', 'generate']
  for step in p.steps:
    measured = aot.measure(p, step)
    assert measured.fits(target.hbm_bytes) and measured.total_bytes >= measured.argument_bytes, (
        step.name)
