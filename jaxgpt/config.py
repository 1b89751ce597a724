"""The config schema shared by every experiment, and its validation.

Every experiment file starts from `base_config()` and changes fields; it never adds
new ones. `validate()` runs at start-up and fails with one line naming the field.
"""

from __future__ import annotations

import difflib
import math

import ml_collections

STAGES = ('pretrain', 'sft', 'reward', 'ppo', 'all')
FAMILIES = ('llama', 'gpt2')
REMAT_POLICIES = ('none', 'full', 'dots_saveable')
DTYPES = ('float32', 'bfloat16')
MESH_AXES = ('data', 'fsdp', 'tensor')

# Logical axis -> mesh axes. Weights and activations use separate names so the two
# can be mapped independently (e.g. FSDP shards weights' 'embed' but never
# activations' 'act_embed').
DEFAULT_RULES = (
    # weights
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('q_heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('head_dim', None),
    ('layers', None),
    ('norm', None),
    ('positions', None),
    ('scalar', None),
    # activations
    ('act_batch', ('data', 'fsdp')),
    ('act_seq', None),
    ('act_embed', None),
    ('act_heads', 'tensor'),
    ('act_kv_heads', 'tensor'),
    ('act_mlp', 'tensor'),
    ('act_vocab', 'tensor'),
)


def base_config() -> ml_collections.ConfigDict:
  """Every field an experiment may set, with defaults for a tiny CPU run."""
  c = ml_collections.ConfigDict()
  c.stage = 'pretrain'
  c.seed = 0

  c.model = m = ml_collections.ConfigDict()
  m.family = 'llama'
  m.vocab_size = 4096
  m.d_model = 256
  m.n_layers = 4
  m.n_heads = 8
  m.n_kv_heads = 4            # GQA; llama only (gpt2 uses n_heads)
  m.head_dim = 0              # 0 -> d_model // n_heads
  m.d_ff = 688                # MLP hidden width
  m.max_seq_len = 256
  m.rope_theta = 10000.0
  m.norm_eps = 1e-5
  m.dtype = 'float32'         # compute dtype
  m.param_dtype = 'float32'
  m.scan_layers = True
  m.remat = 'none'
  m.init_std = 0.02
  m.attention = 'auto'        # jax.nn.dot_product_attention implementation: auto | xla | cudnn

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = -1            # -1: all devices left over
  c.mesh.tensor = 1
  c.mesh.rules = DEFAULT_RULES

  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.path = ''       # '' -> WORKDIR/tokenizer.model, trained from the corpus on first use
  c.tokenizer.vocab_size = 4096
  c.tokenizer.train_chars = 20_000_000  # characters of corpus sampled to train it

  c.data = d = ml_collections.ConfigDict()
  d.source = 'embedded'       # embedded | files | tfds
  d.paths = ''                # comma-separated globs of .txt / .jsonl files (source=files)
  d.text_field = 'text'       # JSONL field holding the document
  d.tfds_name = ''            # a prepared TFDS dataset, e.g. 'my_corpus:1.0.0' (source=tfds)
  d.tfds_dir = ''             # '' -> ~/.cache/jaxgpt/tfds
  d.seq_len = 256
  d.segment_ids = False       # packed documents do not attend to each other
  d.val_fraction = 0.01
  d.shuffle_seed = 0
  d.worker_count = 0

  c.train = t = ml_collections.ConfigDict()
  t.steps = 1000
  t.batch_size = 32           # global, in rows of data.seq_len tokens
  t.micro_batches = 1         # gradient accumulation inside the step
  t.lr = 3e-3
  t.min_lr_ratio = 0.1
  t.warmup_steps = 100
  t.b1 = 0.9
  t.b2 = 0.95
  t.eps = 1e-8
  t.weight_decay = 0.1
  t.decay = 'matrices'        # which parameters decay: matrices | all | none
  t.clip_norm = 1.0
  t.z_loss = 0.0
  t.log_every = 10
  t.eval_every = 200
  t.eval_batches = 8
  t.sample_every = 500
  t.sample_prompts = ('ROMEO:', 'The king said', 'To be, or not')
  t.sample_tokens = 48
  t.peak_flops = 0.0          # per device; 0 -> measured with a matmul at start

  # Later stages train with config.train, except for the fields set here.
  c.sft = sft = ml_collections.ConfigDict()
  sft.data = 'embedded'        # 'embedded' or comma-separated JSONL paths/globs/directories
  sft.task_examples = 20000    # task-suite examples mixed into the embedded data
  sft.on_bad_row = 'error'     # error | skip (skipped rows are counted)
  sft.on_long_row = 'truncate'  # truncate | drop (counted either way)
  sft.packing = True           # several conversations per row with segment ids, else padding
  sft.val_fraction = 0.02
  sft.steps = 500
  sft.lr = 1e-3
  sft.warmup_steps = 50
  sft.eval_per_task = 40       # held-out prompts per task for eval.json
  sft.few_shot = 3             # Q/A examples in the base model's few-shot document
  sft.eval_tokens = 16         # max new tokens when answering a task prompt

  c.checkpoint = ck = ml_collections.ConfigDict()
  ck.every_steps = 500
  ck.every_minutes = 10.0
  ck.max_to_keep = 2
  ck.init_from = ''           # a previous stage's checkpoint dir; '' -> WORKDIR/<previous stage>
  return c


class ConfigError(ValueError):
  """A config field is wrong; the message names it and says what to do."""


def _flat_keys(cfg, prefix=''):
  out = {}
  for k, v in cfg.items():
    name = f'{prefix}{k}'
    if isinstance(v, ml_collections.ConfigDict):
      out.update(_flat_keys(v, name + '.'))
    else:
      out[name] = v
  return out


def check_known_fields(cfg) -> None:
  """Fail on any field the schema does not have (a typo in an experiment file)."""
  known = _flat_keys(base_config())
  for name in _flat_keys(cfg):
    if name not in known:
      close = difflib.get_close_matches(name, known, n=1)
      hint = f" Did you mean '{close[0]}'?" if close else ''
      raise ConfigError(f"config: unknown field '{name}'.{hint}")


def stage_train_config(cfg, stage: str):
  """config.train with the stage's own steps / lr / warm-up (for stages after pretrain)."""
  t = ml_collections.ConfigDict(cfg.train.to_dict())
  section = cfg.get(stage)
  if section is not None:
    for field in ('steps', 'lr', 'warmup_steps'):
      if field in section:
        t[field] = section[field]
  return t


def head_dim(m) -> int:
  return m.head_dim or m.d_model // m.n_heads


def mesh_shape(cfg, num_devices: int) -> dict[str, int]:
  """Resolve the -1 entry of config.mesh and check the product equals the devices."""
  sizes = {a: int(cfg.mesh[a]) for a in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ConfigError(f'config.mesh: at most one axis may be -1, got {free}.')
  for a, s in sizes.items():
    if s == 0 or s < -1:
      raise ConfigError(f'config.mesh.{a}={s}: axis sizes are positive or -1.')
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      raise ConfigError(
          f'config.mesh: fixed axes multiply to {fixed}, which does not divide the '
          f'{num_devices} devices; change config.mesh.*.')
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(
        f'config.mesh: data*fsdp*tensor = {fixed} but there are {num_devices} devices; '
        'set the sizes so they multiply to the device count (or one of them to -1).')
  return sizes


def validate(cfg, num_devices: int) -> dict[str, int]:
  """Check the whole config; return the resolved mesh shape."""
  check_known_fields(cfg)
  if cfg.stage not in STAGES:
    raise ConfigError(f"config.stage='{cfg.stage}' must be one of {STAGES}.")
  m = cfg.model
  if m.family not in FAMILIES:
    raise ConfigError(f"config.model.family='{m.family}' must be one of {FAMILIES}.")
  if m.remat not in REMAT_POLICIES:
    raise ConfigError(f"config.model.remat='{m.remat}' must be one of {REMAT_POLICIES}.")
  for field in ('dtype', 'param_dtype'):
    if m[field] not in DTYPES:
      raise ConfigError(f"config.model.{field}='{m[field]}' must be one of {DTYPES}.")
  if m.head_dim == 0 and m.d_model % m.n_heads:
    raise ConfigError(
        f'config.model.n_heads={m.n_heads} does not divide config.model.d_model={m.d_model}; '
        'change one of them or set config.model.head_dim.')
  if m.family == 'llama':
    if m.n_kv_heads < 1 or m.n_heads % m.n_kv_heads:
      raise ConfigError(
          f'config.model.n_kv_heads={m.n_kv_heads} must divide config.model.n_heads={m.n_heads}.')
    if head_dim(m) % 2:
      raise ConfigError(
          f'config.model.head_dim={head_dim(m)} must be even for RoPE'
          + (' (it is d_model / n_heads; set config.model.head_dim).' if not m.head_dim else '.'))
  if cfg.data.seq_len > m.max_seq_len:
    raise ConfigError(
        f'config.data.seq_len={cfg.data.seq_len} exceeds config.model.max_seq_len={m.max_seq_len}.')
  if cfg.tokenizer.vocab_size > m.vocab_size:
    raise ConfigError(
        f'config.tokenizer.vocab_size={cfg.tokenizer.vocab_size} exceeds '
        f'config.model.vocab_size={m.vocab_size}.')
  sizes = mesh_shape(cfg, num_devices)
  t = cfg.train
  if t.micro_batches < 1 or t.batch_size % t.micro_batches:
    raise ConfigError(
        f'config.train.batch_size={t.batch_size} is not divisible by '
        f'config.train.micro_batches={t.micro_batches}.')
  batch_shards = sizes['data'] * sizes['fsdp']
  if (t.batch_size // t.micro_batches) % batch_shards:
    raise ConfigError(
        f'config.train.batch_size={t.batch_size} / micro_batches={t.micro_batches} = '
        f'{t.batch_size // t.micro_batches} rows per micro-batch is not divisible by the '
        f'data-parallel size data*fsdp={batch_shards}; change config.train.batch_size.')
  if cfg.sft.on_bad_row not in ('error', 'skip'):
    raise ConfigError(f"config.sft.on_bad_row='{cfg.sft.on_bad_row}' must be error or skip.")
  if cfg.sft.on_long_row not in ('truncate', 'drop'):
    raise ConfigError(f"config.sft.on_long_row='{cfg.sft.on_long_row}' must be truncate or drop.")
  if t.decay not in ('matrices', 'all', 'none'):
    raise ConfigError(f"config.train.decay='{t.decay}' must be matrices, all or none.")
  return sizes
