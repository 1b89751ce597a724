"""Every config mistake fails at start-up with a message that names the field."""

import os
import pathlib
import re

import jax
import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

import helpers
from jaxgpt import sharding
from jaxgpt import config as config_lib
from jaxgpt import model as model_lib
from jaxgpt.config import ConfigError

# ml_collections loads experiment files with the deprecated importlib load_module().
pytestmark = pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (ROOT / 'experiments').glob('*.py'))


def _set(**fields):
  """A config change: dotted field name -> value."""
  return lambda cfg: helpers.set_fields(cfg, **fields)


def _unknown_section(cfg):
  cfg.optimizer = ml_collections.ConfigDict({'lr': 1e-3})


# (id, change to tiny_config, devices, a regex the message must match)
CASES = [
    ('unknown-field', _set(**{'model.n_layerz': 3}), 1,
     r"unknown field 'model\.n_layerz'\. Did you mean 'model\.n_layers'\?"),
    ('unknown-train-field', _set(**{'train.learning_rate': 1e-3}), 1,
     r"unknown field 'train\.learning_rate'"),
    ('unknown-section', _unknown_section, 1, r"unknown field 'optimizer\.lr'"),
    ('stage', _set(stage='pretrian'), 1, r"config\.stage='pretrian' must be one of"),
    ('family', _set(**{'model.family': 'gpt3'}), 1, r"config\.model\.family='gpt3'"),
    ('remat', _set(**{'model.remat': 'everything'}), 1, r"config\.model\.remat='everything'"),
    ('dtype', _set(**{'model.dtype': 'float16'}), 1, r"config\.model\.dtype='float16'"),
    ('param-dtype', _set(**{'model.param_dtype': 'int8'}), 1,
     r"config\.model\.param_dtype='int8'"),
    ('decode-dtype', _set(**{'model.decode_dtype': 'bfloat17'}), 1,
     r"config\.model\.decode_dtype='bfloat17'"),
    ('heads-divide-width', _set(**{'model.n_heads': 7}), 1,
     r'config\.model\.n_heads=7 does not divide config\.model\.d_model=64'),
    ('kv-heads-divide-heads', _set(**{'model.n_kv_heads': 3}), 1,
     r'config\.model\.n_kv_heads=3 must divide config\.model\.n_heads=8'),
    ('kv-heads-zero', _set(**{'model.n_kv_heads': 0}), 1, r'config\.model\.n_kv_heads=0'),
    ('odd-rope-head-dim', _set(**{'model.head_dim': 7}), 1,
     r'config\.model\.head_dim=7 must be even for RoPE'),
    ('odd-rope-derived', _set(**{'model.d_model': 72}), 1,
     r'config\.model\.head_dim=9 must be even for RoPE \(it is d_model / n_heads'),
    ('seq-len', _set(**{'data.seq_len': 64}), 1,
     r'config\.data\.seq_len=64 exceeds config\.model\.max_seq_len=32'),
    ('tokenizer-vocab', _set(**{'tokenizer.vocab_size': 300}), 1,
     r'config\.tokenizer\.vocab_size=300 exceeds config\.model\.vocab_size=256'),
    ('mesh-product', _set(**{'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 1}), 8,
     r'config\.mesh: data\*fsdp\*tensor = 4 but there are 8 devices'),
    ('mesh-two-free', _set(**{'mesh.data': -1, 'mesh.fsdp': -1}), 8,
     r"config\.mesh: at most one axis may be -1, got \['data', 'fsdp'\]"),
    ('mesh-zero', _set(**{'mesh.tensor': 0}), 8, r'config\.mesh\.tensor=0'),
    ('mesh-free-indivisible', _set(**{'mesh.fsdp': -1, 'mesh.tensor': 3}), 8,
     r'config\.mesh: fixed axes multiply to 3, which does not divide the 8 devices'),
    ('micro-batches', _set(**{'train.micro_batches': 3}), 1,
     r'config\.train\.batch_size=16 is not divisible by config\.train\.micro_batches=3'),
    ('micro-batches-zero', _set(**{'train.micro_batches': 0}), 1,
     r'config\.train\.micro_batches=0'),
    ('micro-batch-vs-data-parallel',
     _set(**{'train.batch_size': 8, 'train.micro_batches': 2, 'mesh.data': 2,
             'mesh.fsdp': 4, 'mesh.tensor': 1}), 8,
     r'config\.train\.batch_size=8 / micro_batches=2 = 4 rows per micro-batch is not a '
     r"positive multiple of 8, the devices rule \('act_batch', \('data', 'fsdp'\)\) of "
     r'config\.mesh\.rules spreads rows over \(data=2\*fsdp=4\)'),
    ('zero-steps', _set(**{'train.steps': 0}), 1, r'config\.train\.steps=0 must be >= 1'),
    ('negative-ppo-steps', _set(**{'ppo.steps': -1}), 1, r'config\.ppo\.steps=-1'),
    ('log-every-zero', _set(**{'train.log_every': 0}), 1, r'config\.train\.log_every=0'),
    ('on-damaged', _set(**{'checkpoint.on_damaged': 'delete'}), 1,
     r"config\.checkpoint\.on_damaged='delete' must be one of \('fallback', 'stop'\)"),
    ('max-invalid-utf8', _set(**{'data.max_invalid_utf8': 1.5}), 1,
     r'config\.data\.max_invalid_utf8=1\.5'),
    ('sft-bad-row', _set(**{'sft.on_bad_row': 'ignore'}), 1, r"config\.sft\.on_bad_row='ignore'"),
    ('sft-long-row', _set(**{'sft.on_long_row': 'cut'}), 1, r"config\.sft\.on_long_row='cut'"),
    ('decay', _set(**{'train.decay': 'biases'}), 1, r"config\.train\.decay='biases'"),
    ('old-logp', _set(**{'ppo.old_logp': 'cached'}), 1,
     r"config\.ppo\.old_logp='cached' must be one of \('recompute', 'sampler'\)"),
    ('grpo-base-steps', _set(**{'grpo_base.steps': 0}), 1,
     r'config\.grpo\.steps=0 must be >= 1\. \(in the grpo_base stage: config\.grpo with the '
     r'fields config\.grpo_base sets'),
]


@pytest.mark.parametrize('change,devices,message', [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_validate_names_the_field(change, devices, message):
  cfg = helpers.tiny_config()
  if devices > 1:
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, -1, 1
  config_lib.validate(cfg, devices)  # the unchanged config is fine
  change(cfg)
  with pytest.raises(ConfigError, match=message) as err:
    config_lib.validate(cfg, devices)
  assert '\n' not in str(err.value)  # one line


def test_grpo_base_takes_grpo_fields_but_those_it_sets():
  cfg = helpers.tiny_config()
  cfg.grpo.lr, cfg.grpo.steps = 3e-4, 7
  cfg.grpo_base.steps, cfg.grpo_base.reward = 40, 'partial'
  stage_cfg = config_lib.with_grpo_base(cfg)
  assert (stage_cfg.grpo.steps, stage_cfg.grpo.reward, stage_cfg.grpo.lr) == (40, 'partial', 3e-4)
  assert (cfg.grpo.steps, cfg.grpo.reward) == (7, 'checker')  # the experiment's own is untouched
  assert set(cfg.grpo_base) == set(cfg.grpo)  # every GRPO field can be set for grpo_base


def test_the_batch_check_follows_the_rules_in_force():
  """Rows are split over the mesh axes config.mesh.rules maps 'act_batch' to, not always
  over data*fsdp: a rule that keeps the batch whole accepts any batch size."""
  cfg = helpers.tiny_config(mesh=(2, 4, 1), batch_size=10)
  with pytest.raises(ConfigError, match=r"not a positive multiple of 8.*\('act_batch'"):
    config_lib.validate(cfg, 8)
  rules = dict(cfg.mesh.rules)
  for act_batch, ok in ((None, True), ('data', True), (('fsdp',), False)):
    rules['act_batch'] = act_batch
    cfg.mesh.rules = tuple(rules.items())
    if ok:
      config_lib.validate(cfg, 8)
    else:
      with pytest.raises(ConfigError, match=r'multiple of 4.*\(fsdp=4\)'):
        config_lib.validate(cfg, 8)


def test_command_line_overrides_are_checked_like_experiment_files(tmp_path):
  argv = [f'--config={ROOT}/experiments/tiny.py:smoke', '--config.model.n_layers=3',
          '--noconfig.model.scan_layers', '--workdir=x']
  config_lib.check_command_line(argv)
  with pytest.raises(ConfigError, match=r"unknown field 'train\.stpes'\. Did you mean "
                     r"'train\.steps'\?"):
    config_lib.check_command_line(argv + ['--config.train.stpes=5'])
  with pytest.raises(ConfigError, match=r"unknown field 'model\.scan_layer'"):
    config_lib.check_command_line(argv + ['--noconfig.model.scan_layer'])
  with pytest.raises(ConfigError, match=r"--config: no experiment file '.*nope\.py'"):
    config_lib.check_command_line(['--config', str(tmp_path / 'nope.py')])


def test_check_known_fields_alone():
  cfg = config_lib.base_config()
  config_lib.check_known_fields(cfg)
  cfg.data.segment_id = True
  with pytest.raises(ConfigError, match=r"'data\.segment_id'\. Did you mean 'data\.segment_ids'"):
    config_lib.check_known_fields(cfg)


def test_mesh_shape_resolves_the_free_axis():
  cfg = helpers.tiny_config()
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, -1, 2
  assert config_lib.mesh_shape(cfg, 8) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  cfg.mesh.fsdp = 2
  assert config_lib.mesh_shape(cfg, 8) == {'data': 2, 'fsdp': 2, 'tensor': 2}
  with pytest.raises(ConfigError, match=r'config\.mesh: data\*fsdp\*tensor = 8 but there are 4'):
    config_lib.mesh_shape(cfg, 4)


@pytest.mark.parametrize('fields,mesh,field', [
    (dict(n_kv_heads=2), (1, 2, 4), 'config.model.n_kv_heads=2'),
    (dict(vocab_size=250), (1, 2, 4), 'config.model.vocab_size=250'),
    (dict(d_ff=130), (1, 2, 4), 'config.model.d_ff=130'),
    (dict(d_model=36, n_heads=2, n_kv_heads=2), (1, 8, 1), 'config.model.d_model=36'),
], ids=['kv-heads', 'vocab', 'd-ff', 'd-model'])
def test_param_shardings_name_the_dim_the_mesh_cannot_split(fields, mesh, field):
  cfg = helpers.tiny_config(mesh=mesh, batch_size=8)
  cfg.model.update(fields)
  cfg.tokenizer.vocab_size = min(cfg.tokenizer.vocab_size, cfg.model.vocab_size)
  config_lib.validate(cfg, 8)  # consistent on its own; only the mesh cannot split it
  mcfg = model_lib.ModelConfig.from_config(cfg)
  _, abstract, logical = model_lib.abstract_model(mcfg)
  mesh = sharding.make_mesh(cfg, helpers.devices_for(mesh))
  with pytest.raises(ConfigError, match=re.escape(field) + r' \(parameter .*\) is not divisible'
                     r'.*config\.mesh\.rules maps its logical axis'):
    sharding.param_shardings(abstract, logical, mesh, mcfg.rules)


@pytest.mark.parametrize('name', EXPERIMENTS)
def test_experiment_files_validate(name):
  config_lib.validate(helpers.load_experiment(name).get_config(), len(jax.devices()))


# -- command-line overrides (--config.a.b=value), parsed by ml_collections' absl flag -----

def parse_flags(*args):
  argv = ['main', *args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=flag_values, lock_config=True,
                                  sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def test_override_of_a_known_field_applies():
  cfg = parse_flags(f'--config={ROOT}/experiments/tiny.py:smoke', '--config.model.n_layers=3',
                    '--config.mesh.fsdp=-1', '--config.mesh.data=1')
  assert cfg.model.n_layers == 3 and cfg.model.d_model == 64  # the 'smoke' argument applied
  config_lib.validate(cfg, 8)


@pytest.mark.parametrize('override,message', [
    ('--config.model.n_layerz=3', r'n_layerz.*Did you mean "n_layers"'),
    ('--config.modle.n_layers=3', r'modle.*Did you mean "model"'),
])
def test_override_of_an_unknown_field_fails(override, message):
  with pytest.raises((AttributeError, KeyError), match=re.compile(message, re.S)):
    parse_flags(f'--config={ROOT}/experiments/tiny.py', override)


def test_override_with_a_bad_value_fails_naming_the_flag():
  with pytest.raises(flags.IllegalFlagValueError, match=r'--config\.model\.n_layers=abc'):
    parse_flags(f'--config={ROOT}/experiments/tiny.py', '--config.model.n_layers=abc')
  cfg = parse_flags(f'--config={ROOT}/experiments/tiny.py', '--config.model.n_kv_heads=3')
  with pytest.raises(ConfigError, match=r'config\.model\.n_kv_heads=3 must divide'):
    config_lib.validate(cfg, 8)


def test_main_reports_a_config_error_in_one_line(tmp_path):
  """`python -m jaxgpt.main` with an impossible mesh: exit 1, the message, no traceback."""
  import subprocess
  import sys
  proc = subprocess.run(
      [sys.executable, '-m', 'jaxgpt.main', f'--config={ROOT}/experiments/tiny.py',
       f'--workdir={tmp_path}', '--config.mesh.data=3'],
      capture_output=True, text=True, cwd=ROOT, timeout=120,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''})
  assert proc.returncode == 1
  assert 'jaxgpt: config.mesh: data*fsdp*tensor = 3 but there are 1 devices' in proc.stderr
  assert 'Traceback' not in proc.stderr
