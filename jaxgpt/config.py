"""The config schema shared by every experiment, and its validation.

Every experiment file starts from `base_config()` and changes fields; it never adds
new ones. `validate()` runs at start-up and fails with one line naming the field.
"""

from __future__ import annotations

import difflib
import math
import os
import re

import ml_collections

from jaxgpt.stages import PIPELINE

STAGES = PIPELINE + ('all',)
REMAT_POLICIES = ('none', 'full', 'dots_saveable', 'save_proj')
ATTENTION_KERNELS = ('auto', 'xla', 'cudnn', 'splash')  # jaxgpt.model.attention_kernels
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

# What the sampler changes in DEFAULT_RULES (`config.mesh.decode_rules`): weights whole
# over 'fsdp'. FSDP shards 'embed', the dimension every matmul contracts, so with the
# training layout each decode step would all-gather every weight (for one token); the
# sampler reshards them once per call instead, at the cost of fsdp-fold weight bytes.
DEFAULT_DECODE_RULES = (('embed', None),)
# The alternative that costs no memory: 'fsdp' as more tensor parallelism (heads, MLP,
# vocabulary), rows only over 'data'; n_kv_heads and d_ff must divide by tensor * fsdp.
DECODE_RULES_FSDP_AS_TENSOR = (
    ('embed', None),
    *((name, ('tensor', 'fsdp')) for name in ('vocab', 'mlp', 'q_heads', 'kv_heads',
                                              'act_heads', 'act_kv_heads', 'act_mlp',
                                              'act_vocab')),
    ('act_batch', 'data'),
)


def base_config() -> ml_collections.ConfigDict:
  """Every field an experiment may set, with defaults for a tiny CPU run."""
  c = ml_collections.ConfigDict()
  c.stage = 'pretrain'        # pretrain | sft | reward | dpo | ppo | ppo_checker | grpo |
                              # grpo_base, or all (each stage of `recipe` in turn, a finished
                              # one skipped, then the report)
  c.recipe = ()               # the stages of stage=all, in order; () -> all but grpo_base
  c.seed = 0                  # parameter initialisation, sampling and evaluation draws
  c.preflight = True          # before allocating: stop a run whose parameters and optimizer
                              # state alone exceed a device's memory (jaxgpt.aot.preflight)
  c.model = model_section()
  c.mesh = mesh_section()
  c.tokenizer = tokenizer_section()
  c.data = data_section()
  c.train = train_section()
  # Later stages train with config.train, except for the fields their section sets.
  c.sft = sft_section()
  c.reward = reward_section()
  c.dpo = dpo_section()
  c.ppo = ppo_section()
  c.grpo = grpo_section()
  c.grpo_base = grpo_base_section()
  c.lora = lora_section()
  c.checkpoint = checkpoint_section()
  return c


def model_section() -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  m.family = 'llama'          # llama | mistral | qwen2 | qwen3 | gemma3 (RMSNorm, RoPE, gated
                              # MLP, GQA; see docs/models.md) | gpt2 (LayerNorm, learned
                              # positions, GELU)
  m.vocab_size = 4096         # embedding / output rows (>= the tokenizer's size)
  m.d_model = 256             # residual width
  m.n_layers = 4              # decoder blocks
  m.n_heads = 8               # query heads
  m.n_kv_heads = 4            # GQA; llama only (gpt2 uses n_heads)
  m.head_dim = 0              # 0 -> d_model // n_heads
  m.d_ff = 688                # MLP hidden width
  m.max_seq_len = 256         # longest sequence (positions, KV cache)
  m.rope_theta = 10000.0      # RoPE base (llama)
  m.norm_eps = 1e-5           # RMSNorm / LayerNorm epsilon
  m.dtype = 'float32'         # compute dtype
  m.param_dtype = 'float32'   # parameters and optimizer state
  m.scan_layers = True        # layers as one lax.scan (fast compiles) or unrolled
  m.remat = 'none'            # none | full | dots_saveable | save_proj (projections kept)
  m.init_std = 0.02           # std of the normal initialisation of the weight matrices
  m.attention = 'auto'        # auto | xla | cudnn | splash (jaxgpt.model.attention_kernels)
  m.decode_dtype = ''         # the sampler's weights, compute and KV cache ('' -> dtype);
                              # 'bfloat16' halves the bytes a decode step reads
  # Published models in and out (tools/convert_hf.py; init_from='hf:DIR' takes the
  # architecture from DIR/config.json and the tokenizer from DIR, 'gguf:FILE' from the file).
  m.tie_embeddings = False    # llama: the output head is the input embedding (gpt2 always ties)
  m.vocab_multiple = 1        # embedding/head rows padded to a multiple (e.g. 128, so 'tensor'
                              # divides them); padded logits are masked, export strips them
  # Architecture switches (jaxgpt.model.families): unset ('' / None) takes the value of
  # config.model.family's preset (llama, mistral, qwen2, qwen3, gemma3, gpt2); set wins.
  unset = ml_collections.config_dict.placeholder
  m.norm = ''                 # rmsnorm | layernorm (GPT-2)
  m.norm_plus_one = unset(bool)  # RMSNorm scales by (1 + w) (Gemma)
  m.post_norms = unset(bool)  # a norm after attention and after the MLP too (Gemma 3)
  m.qk_norm = unset(bool)     # RMSNorm over each head's q and k (Qwen 3, Gemma 3)
  m.positions = ''            # rope | learned (GPT-2)
  m.bias = ''                 # none | qkv (Qwen 2) | all (GPT-2)
  m.mlp = ''                  # gated | plain (GPT-2)
  m.mlp_activation = ''       # silu | gelu_tanh (GPT-2, Gemma)
  m.embed_scale = unset(bool)  # token embeddings times sqrt(d_model) (Gemma)
  m.window_pattern = ''       # per layer, repeated: S sliding window, G global (Gemma 3: SSSSSG)
  m.sliding_window = 0        # W: an S layer attends to its last W positions; 0: none
  m.local_rope_theta = 0.0    # RoPE base of the S layers (Gemma 3: 1e4); 0: as the G layers
  m.rope_scaling = ''         # '' | linear | llama3: RoPE scaling (of the G layers)
  m.rope_factor = 1.0         # linear, llama3: the context extension factor
  m.rope_low_freq_factor = 1.0   # llama3
  m.rope_high_freq_factor = 4.0  # llama3
  m.rope_original_max_len = 8192  # llama3: the context the model was pretrained at
  m.attn_scale_dim = 0.0      # scores times attn_scale_dim ** -0.5; 0: head_dim (Gemma 3:
                              # query_pre_attn_scalar)
  return m


def mesh_section() -> ml_collections.ConfigDict:
  mesh = ml_collections.ConfigDict()
  mesh.data = 1               # data parallelism: rows split, weights replicated
  mesh.fsdp = -1              # -1: all devices left over
  mesh.tensor = 1             # tensor parallelism: heads, MLP and vocabulary split
  mesh.rules = DEFAULT_RULES  # logical axis -> mesh axes, for weights and activations
  mesh.decode_rules = DEFAULT_DECODE_RULES  # entries of rules replaced while sampling;
                              # () samples in the training layout
  return mesh


def tokenizer_section() -> ml_collections.ConfigDict:
  tok = ml_collections.ConfigDict()
  tok.path = ''               # '' -> WORKDIR/tokenizer.model, trained from the corpus on first use
  tok.vocab_size = 4096       # pieces of a tokenizer trained at the first run
  tok.train_chars = 20_000_000  # characters of corpus sampled to train it
  tok.chat_template = 'model'  # how conversations are rendered: 'model' (the model's own
                              # chat template when its tokenizer has one, else jaxgpt's) |
                              # 'jaxgpt' (jaxgpt's <|user|>...<|end|> format); jaxgpt.data.chat
  tok.chat_tokens = 'add'     # a model's tokenizer lacking the jaxgpt tokens its chat format
                              # needs (the model's template: <|reward|> alone; jaxgpt's: the
                              # chat tokens too): 'add' them (new rows = mean of the old) |
                              # 'require' (fail instead)
  return tok


def data_section() -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.source = 'embedded'       # embedded | files | tfds
  d.paths = ''                # comma-separated globs of .txt / .jsonl files (source=files)
  d.text_field = 'text'       # JSONL field holding the document
  d.tfds_name = ''            # a prepared TFDS dataset, e.g. 'my_corpus:1.0.0' (source=tfds)
  d.tfds_dir = ''             # '' -> ~/.cache/jaxgpt/tfds
  d.seq_len = 256             # tokens per training row
  d.segment_ids = False       # packed documents do not attend to each other
  d.val_fraction = 0.01       # share of documents held out for val_loss
  d.shuffle_seed = 0          # data order (saved with each checkpoint, so a resume continues it)
  d.worker_count = 0          # grain worker processes for pretraining data (0: in the main process)
  d.qa_share = 0.0            # share of pretraining characters (embedded / files source) in
                              # web-like Q/A pages built from train-split task instances
  d.max_invalid_utf8 = 0.2    # share of a file's bytes that may be invalid UTF-8 (each one
                              # replaced and counted); a file above it is refused, by name
  return d


def train_section() -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.steps = 1000              # pretraining steps
  t.batch_size = 32           # global, in rows of data.seq_len tokens
  t.micro_batches = 1         # gradient accumulation inside the step
  t.lr = 3e-3                 # peak learning rate (AdamW)
  t.min_lr_ratio = 0.1        # cosine decay ends at lr * min_lr_ratio
  t.warmup_steps = 100        # linear warm-up from 0
  t.b1 = 0.9                  # AdamW beta1
  t.b2 = 0.95                 # AdamW beta2
  t.eps = 1e-8                # AdamW epsilon
  t.weight_decay = 0.1        # AdamW decoupled weight decay (on the parameters `decay` picks)
  t.decay = 'matrices'        # which parameters decay: matrices | all | none
  t.clip_norm = 1.0           # global gradient-norm clip (0: off)
  t.z_loss = 0.0              # + z_loss * logsumexp(logits)^2 (PaLM's z-loss); 0: off
  t.loss_chunk = 0            # pretrain / SFT loss over this many positions at a time, so the
                              # (batch, length, vocab) float32 logits never exist whole; 0: off
                              # (tools/aot.py shows the effect per chip)
  t.loss_positions = 0        # SFT: the LM head runs on only this many positions a row, those
                              # with loss weight (targets past them are dropped and their
                              # share logged as dropped_targets); 0: every position
  t.log_every = 10            # steps between console lines and metrics.jsonl rows
  t.eval_every = 200          # steps between validation losses
  t.eval_batches = 8          # validation batches per evaluation
  t.sample_every = 500        # steps between samples (pretrain, sft), printed and kept in
                              # <stage>/samples.jsonl
  t.sample_prompts = ('ROMEO:', 'The king said', 'To be, or not')  # pretraining samples' starts
  t.sample_tokens = 48        # new tokens per pretraining sample
  t.peak_flops = 0.0          # per device; 0 -> measured with a matmul at start
  return t


def sft_section() -> ml_collections.ConfigDict:
  sft = ml_collections.ConfigDict()
  sft.data = 'embedded'        # 'embedded' (conversations + task examples), 'tasks' (task
                               # examples alone) or comma-separated JSONL paths/globs/dirs
  sft.task_examples = 20000    # task-suite examples mixed into the embedded data
  sft.on_bad_row = 'error'     # error | skip (skipped rows are counted)
  sft.on_long_row = 'truncate'  # truncate | drop (counted either way)
  sft.packing = True           # several conversations per row with segment ids, else padding
  sft.val_fraction = 0.02      # share of conversations held out for val_loss
  sft.steps = 500              # SFT steps
  sft.lr = 1e-3                # peak learning rate of this stage
  sft.warmup_steps = 50        # linear warm-up steps of this stage
  sft.eval_per_task = 40       # held-out prompts per task for eval.json
  sft.few_shot = 3             # Q/A examples in the base model's few-shot document
  sft.eval_tokens = 16         # max new tokens when answering a task prompt
  return sft


def reward_section() -> ml_collections.ConfigDict:
  """Stage 3: the reward model (scalar read at a <|reward|> token after each response)."""
  r = ml_collections.ConfigDict()
  r.data = 'embedded'          # 'embedded' (sampled from the SFT model, ranked by the
                               # simulated labeler) or comma-separated JSONL paths/globs
  r.prompts = 1200             # embedded: train-split task prompts to sample for
  r.heldout_prompts = 160      # embedded: held-out task prompts for validation pairs
  r.samples_per_prompt = 4     # embedded: K responses per prompt (temperature 1)
  r.response_tokens = 16       # embedded: max new tokens per sampled response
  r.flip_fraction = 0.05       # embedded: share of compared pairs the labeler flips
  r.tie_break = 'none'         # embedded: replies the labeler rates equal give no pair
                               # ('none') or are ordered by a coin ('coin')
  r.on_bad_row = 'error'       # error | skip (skipped rows are counted)
  r.on_long_row = 'truncate'   # truncate (prompt from the left) | drop (counted either way)
  r.val_fraction = 0.05        # own data: share of comparison sets held out
  r.seq_len = 0                # tokens per sequence; 0 -> config.data.seq_len
  r.batch_size = 0             # comparison pairs per step; 0 -> config.train.batch_size
  r.steps = 300                # reward-model steps
  r.lr = 5e-4                  # peak learning rate of this stage
  r.warmup_steps = 30          # linear warm-up steps of this stage
  r.center = 0.0               # c in + c * (r_chosen + r_rejected)^2 (0: off)
  r.eval_per_task = 40         # held-out prompts per task for eval.json
  r.best_of = (1, 4, 16)       # best-of-N with the reward model in eval.json
  return r


def dpo_section() -> ml_collections.ConfigDict:
  """Direct preference optimisation (DPO, IPO, SimPO): the policy learns from the
  comparisons themselves, no reward model and no sampling loop."""
  d = ml_collections.ConfigDict()
  d.data = 'embedded'          # 'embedded' (the reward stage's sampled comparisons, sampled
                               # now when it has none) or comma-separated JSONL paths/globs
  d.on_bad_row = 'error'       # error | skip (skipped rows are counted)
  d.on_long_row = 'truncate'   # truncate (prompt from the left) | drop (counted either way)
  d.val_fraction = 0.05        # own data: share of comparison sets held out
  d.seq_len = 0                # tokens per sequence; 0 -> config.reward.seq_len, data.seq_len
  d.batch_size = 0             # comparison pairs per step; 0 -> config.train.batch_size
  d.loss = 'dpo'               # dpo | ipo | simpo (reference-free, length-normalised)
  d.beta = 0.1                 # beta of the implicit reward beta (log pi - log pi_ref)
  d.label_smoothing = 0.0      # dpo: conservative DPO's eps (0: Rafailov et al.)
  d.gamma = 0.0                # simpo: the target margin
  d.nll_coef = 0.0             # + this times the chosen reply's per-token NLL (RPO; TRL's
                               # rpo_alpha): keeps the chosen replies likely
  d.steps = 300                # DPO steps
  d.lr = 1e-4                  # peak learning rate of this stage
  d.warmup_steps = 30          # linear warm-up steps of this stage
  d.eval_per_task = 40         # held-out prompts per task for eval.json
  return d


def online_rl_fields(s: ml_collections.ConfigDict, *, reward: str) -> ml_collections.ConfigDict:
  """The fields every online-RL stage (PPO, GRPO) has: prompts, rollouts, rewards, update."""
  s.prompts = 'embedded'       # 'embedded' (task-suite train split) or JSONL paths/globs
  s.on_bad_row = 'error'       # error | skip
  s.reward = reward            # '+'-separated [WEIGHT*]SOURCE terms: model (the reward model),
                               # checker (the task verifier, 1 right / 0 wrong), partial (1
                               # right, a wrong answer up to 0.5 by closeness) or a user's
                               # package.module:function (TRL's reward_funcs signature)
  s.steps = 60                 # iterations (rollout -> rewards -> advantages -> update)
  s.rollout_batch = 64         # rollouts per iteration
  s.batch_size = 16            # rows per minibatch (one optimizer step each)
  s.micro_batches = 1          # gradient accumulation inside a minibatch step
  s.epochs = 4                 # passes over each rollout batch
  s.response_tokens = 16       # max new tokens per rollout
  s.temperature = 1.0          # rollout temperature; log-probs use logits / temperature
  s.old_logp = 'recompute'     # the update's "old" log-probs: recompute (a forward of the
                               # policy over the rollout, as TRL) | sampler (recorded while
                               # sampling: that forward skipped; equal up to float rounding)
  s.top_k = 0                  # must stay 0: rollouts sample the full distribution
  s.top_p = 1.0                # must stay 1.0, for the same reason
  s.lr = 1e-4                  # policy learning rate
  s.warmup_steps = 10          # in iterations
  s.clip = 0.2                 # policy ratio clip
  s.kl_estimator = 'k1'        # k1 | k2 | k3 (per-token KL to the reference)
  s.kl_coef = 0.05             # initial beta
  s.kl_clamp = 10.0            # |log pi - log pi_ref| clamp inside the estimators
  s.entropy_coef = 0.0         # entropy bonus in the policy loss (0: entropy only logged)
  s.missing_eot_penalty = -1.0  # added to the reward of a response cut at response_tokens
  s.normalize_scores = True    # reward-model term: (score - mean) / std with its stored stats
  s.frozen_dtype = 'float32'   # reference and reward models held in float32 | bfloat16
  s.eval_per_task = 40         # held-out prompts per task for eval.json and the report
  return s


def ppo_section() -> ml_collections.ConfigDict:
  """Stage 4: RLHF with PPO (policy from SFT, value model from the reward model)."""
  p = online_rl_fields(ml_collections.ConfigDict(), reward='model')
  p.value_lr = 1e-4            # value-model learning rate
  p.value_clip = 0.2           # value-prediction clip around the old values
  p.gamma = 1.0                # GAE discount
  p.lam = 0.95                 # GAE lambda
  p.kl_target = 6.0            # adaptive controller target (nats per response); 0 -> fixed beta
  p.kl_horizon = 10000         # controller horizon: beta moves by at most 20% x rollout_batch /
                               # kl_horizon an iteration
  p.value_coef = 0.1           # value-loss weight when the policy carries the value head
  p.ptx_coef = 0.0             # pretraining-loss mix (PPO-ptx); 0 -> off
  p.value_from = 'reward'      # reward (a separate value model) | policy (head on its trunk)
  p.report_samples = 8         # samples per prompt for diversity in the report
  return p


def grpo_section() -> ml_collections.ConfigDict:
  """Critic-free online RL (GRPO, Dr. GRPO, RLOO): K samples per prompt, each reply's
  advantage from its group's rewards; no value model."""
  g = online_rl_fields(ml_collections.ConfigDict(), reward='checker')
  g.group_size = 8             # K samples per prompt: rollout_batch / K prompts an iteration
  g.advantage = 'grpo'         # grpo ((r - mean) / std) | dr_grpo (r - mean) | rloo (leave-one-out)
  g.loss_aggregation = 'auto'  # seq_mean | token_sum | token_mean; auto: token_sum for
                               # dr_grpo, else seq_mean
  g.oversample = 1             # dynamic sampling (DAPO): draw this many times the prompts, keep
                               # rollout_batch rows of the groups whose host rewards differ first
  g.kl_in = 'loss'             # loss (k3 term in the loss, GRPO) | reward (-beta * KL in the reward)
  g.kl_estimator = 'k3'
  g.kl_coef = 0.04
  g.share_prompt = True        # run each group's prompt once, not K times, in the log-probs of
                               # scoring and (unrolled layers, no micro-batches) of the update
  return g


def grpo_base_section() -> ml_collections.ConfigDict:
  """The grpo_base stage (GRPO from the pretrained or shipped model) runs config.grpo with
  the fields set here in place of grpo's (unset: grpo's value), e.g. its own steps or reward:
  a model that never answers in form needs another setting than one after SFT."""
  b = ml_collections.ConfigDict()
  for name, value in grpo_section().items():
    b[name] = ml_collections.config_dict.placeholder(type(value))
  return b


def with_grpo_base(cfg) -> ml_collections.ConfigDict:
  """A copy of `cfg` whose config.grpo is the grpo_base stage's: grpo's fields, with each
  field config.grpo_base sets in its place."""
  cfg = cfg.copy_and_resolve_references()
  with cfg.unlocked():
    for name, value in cfg.grpo_base.items():
      if value is not None:
        cfg.grpo[name] = value
  return cfg


def lora_section() -> ml_collections.ConfigDict:
  lo = ml_collections.ConfigDict()
  lo.rank = 0                 # LoRA adapters' rank in every stage that trains after pretraining
                              # (sft, reward, dpo, ppo, grpo); 0: full fine-tuning
  lo.alpha = 32.0             # adapter output scaled by alpha / rank; 0 -> alpha = rank
  lo.targets = ('q', 'k', 'v', 'o', 'gate', 'up', 'down')  # projections that get adapters
  return lo


def checkpoint_section() -> ml_collections.ConfigDict:
  ck = ml_collections.ConfigDict()
  ck.every_steps = 500        # save every this many steps (RL: iterations)
  ck.every_minutes = 10.0     # and at least this often
  ck.max_to_keep = 2          # newest checkpoints kept per stage
  ck.init_from = ''           # a previous stage's checkpoint dir; '' -> WORKDIR/<previous stage>;
                              # 'hf:DIR', 'gguf:FILE' or 'gguf:NAME': a published model
  ck.base = ''                # 'hf:DIR', 'gguf:FILE' or 'gguf:NAME': a published model in place
                              # of pretraining (the pretrain stage then trains nothing; later
                              # stages start from it as from WORKDIR/pretrain)
  ck.on_damaged = 'fallback'  # newest checkpoint unreadable at resume: 'fallback' (move it to
                              # <stage>/damaged_checkpoints/, resume from the newest good one)
                              # or 'stop' (report it and stop)
  return ck


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


def _check_field_name(name: str, known) -> None:
  if name not in known:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ''
    raise ConfigError(f"config: unknown field '{name}'.{hint}")


def check_known_fields(cfg) -> None:
  """Fail on any field the schema does not have (a typo in an experiment file)."""
  known = _flat_keys(base_config())
  for name in _flat_keys(cfg):
    _check_field_name(name, known)


_OVERRIDE = re.compile(r'^--?(?:no)?config\.([^=]+)')


def check_command_line(args) -> None:
  """Before absl parses `args`: the --config file exists and every --config.a.b
  override names a schema field (a typo gets the same message as in an experiment file,
  not ml_collections' traceback)."""
  known = _flat_keys(base_config())
  for i, arg in enumerate(args):
    if arg.startswith(('--config=', '-config=')) or (arg in ('--config', '-config')
                                                     and i + 1 < len(args)):
      path = (arg.split('=', 1)[1] if '=' in arg else args[i + 1]).split(':', 1)[0]
      if not os.path.isfile(path):
        raise ConfigError(f'--config: no experiment file {path!r} (from {os.getcwd()}); '
                          'the experiments are experiments/*.py, e.g. experiments/tiny.py.')
    match = _OVERRIDE.match(arg)
    if match:
      _check_field_name(match.group(1), known)


def stage_train_config(cfg, stage: str):
  """config.train with the stage's own steps / lr / warm-up (for stages after pretrain)."""
  t = ml_collections.ConfigDict(cfg.train.to_dict())
  section = cfg.get(stage)
  if section is not None:
    for field in ('steps', 'lr', 'warmup_steps', 'batch_size'):
      if field in section and (field != 'batch_size' or section[field]):  # 0: train's
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
  """Check the whole config, section by section; return the resolved mesh shape."""
  check_known_fields(cfg)
  if cfg.stage not in STAGES:
    raise ConfigError(f"config.stage='{cfg.stage}' must be one of {STAGES}.")
  unknown = [s for s in cfg.recipe if s not in PIPELINE]
  if unknown:
    raise ConfigError(f'config.recipe={tuple(cfg.recipe)!r}: {unknown} are not stages; name '
                      f'stages of {PIPELINE} in the order to run them.')
  if not isinstance(cfg.preflight, bool):
    raise ConfigError(f'config.preflight={cfg.preflight!r} must be True or False.')
  _validate_model(cfg)
  _validate_data(cfg)
  sizes = mesh_shape(cfg, num_devices)
  _validate_decode_rules(cfg)
  batch_shards = BatchShards(cfg, sizes)
  _validate_train(cfg, batch_shards)
  _validate_sft(cfg)
  _validate_reward(cfg, batch_shards)
  _validate_dpo(cfg, batch_shards)
  _validate_ppo(cfg, batch_shards)
  _validate_grpo(cfg, batch_shards)
  if any(v is not None for v in cfg.grpo_base.values()):
    try:
      _validate_grpo(with_grpo_base(cfg), batch_shards)
    except ConfigError as e:
      raise ConfigError(f'{e} (in the grpo_base stage: config.grpo with the fields '
                        'config.grpo_base sets in place of its own)') from None
  _choice(cfg, 'checkpoint.on_damaged', ('fallback', 'stop'))
  _choice(cfg, 'tokenizer.chat_template', ('model', 'jaxgpt'))
  from jaxgpt.model import lora  # pylint: disable=import-outside-toplevel
  lora.validate(cfg)
  return sizes


def _validate_model(cfg) -> None:
  from jaxgpt.model import families  # pylint: disable=import-outside-toplevel
  m = cfg.model
  switches = families.validate(m)  # the family first: it decides the switches
  _choice(cfg, 'model.remat', REMAT_POLICIES)
  _choice(cfg, 'model.attention', ATTENTION_KERNELS)
  _choice(cfg, 'model.dtype', DTYPES)
  _choice(cfg, 'model.param_dtype', DTYPES)
  if m.decode_dtype:  # '' -> the compute dtype
    _choice(cfg, 'model.decode_dtype', DTYPES)
  if m.head_dim == 0 and m.d_model % m.n_heads:
    raise ConfigError(
        f'config.model.n_heads={m.n_heads} does not divide config.model.d_model={m.d_model}; '
        'change one of them or set config.model.head_dim.')
  n_kv = switches['n_kv_heads']  # gpt2: n_heads, whatever n_kv_heads says
  if n_kv < 1 or m.n_heads % n_kv:
    raise ConfigError(
        f'config.model.n_kv_heads={m.n_kv_heads} must divide config.model.n_heads={m.n_heads}.')
  if switches['positions'] == 'rope':
    if head_dim(m) % 2:
      raise ConfigError(
          f'config.model.head_dim={head_dim(m)} must be even for RoPE'
          + (' (it is d_model / n_heads; set config.model.head_dim).' if not m.head_dim else '.'))
  if cfg.tokenizer.vocab_size > m.vocab_size:
    raise ConfigError(
        f'config.tokenizer.vocab_size={cfg.tokenizer.vocab_size} exceeds '
        f'config.model.vocab_size={m.vocab_size}.')


def _validate_data(cfg) -> None:
  d = cfg.data
  if d.seq_len > cfg.model.max_seq_len:
    raise ConfigError(
        f'config.data.seq_len={d.seq_len} exceeds config.model.max_seq_len={cfg.model.max_seq_len}.')
  if not 0.0 <= d.max_invalid_utf8 <= 1.0:
    raise ConfigError(f'config.data.max_invalid_utf8={d.max_invalid_utf8} must be in [0, 1].')


def _validate_train(cfg, batch_shards: 'BatchShards') -> None:
  t = cfg.train
  for field in ('train.steps', 'sft.steps', 'reward.steps', 'dpo.steps', 'train.log_every',
                'train.eval_every', 'train.sample_every'):
    section, name = field.split('.')
    if cfg[section][name] < 1:
      raise ConfigError(f'config.{field}={cfg[section][name]} must be >= 1.')
  if t.micro_batches < 1 or t.batch_size % t.micro_batches:
    raise ConfigError(
        f'config.train.batch_size={t.batch_size} is not divisible by '
        f'config.train.micro_batches={t.micro_batches}.')
  if t.batch_size < 1 or (t.batch_size // t.micro_batches) % batch_shards.size:
    raise ConfigError(
        f'config.train.batch_size={t.batch_size} / micro_batches={t.micro_batches} = '
        f'{t.batch_size // t.micro_batches} rows per micro-batch is not a positive multiple '
        f'of {batch_shards}; change config.train.batch_size{batch_shards.or_change}.')
  if t.decay not in ('matrices', 'all', 'none'):
    raise ConfigError(f"config.train.decay='{t.decay}' must be matrices, all or none.")
  if t.loss_chunk < 0:
    raise ConfigError(f'config.train.loss_chunk={t.loss_chunk} must be >= 0 (0: the whole '
                      'sequence at once).')
  if t.loss_positions < 0:
    raise ConfigError(f'config.train.loss_positions={t.loss_positions} must be >= 0 (0: every '
                      'position).')


def _validate_sft(cfg) -> None:
  if cfg.sft.on_bad_row not in ('error', 'skip'):
    raise ConfigError(f"config.sft.on_bad_row='{cfg.sft.on_bad_row}' must be error or skip.")
  if cfg.sft.on_long_row not in ('truncate', 'drop'):
    raise ConfigError(f"config.sft.on_long_row='{cfg.sft.on_long_row}' must be truncate or drop.")


def mesh_axes_of(axes) -> tuple:
  """A rules entry's mesh axes (None, one name or several) as a tuple."""
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def _validate_decode_rules(cfg) -> None:
  """Entries of known logical axes onto mesh axes; rows split over no more devices than
  in training (so a batch the training rules accept suits the sampler too)."""
  names = {n for n, _ in DEFAULT_RULES}
  for entry in cfg.mesh.decode_rules:
    if len(entry) != 2 or entry[0] not in names:
      raise ConfigError(f'config.mesh.decode_rules: {entry!r} is not a (logical axis, mesh '
                        f'axes) pair of a logical axis in config.mesh.rules.')
    if any(a not in MESH_AXES for a in mesh_axes_of(entry[1])):
      raise ConfigError(f'config.mesh.decode_rules: {entry!r} names mesh axes other than '
                        f'{MESH_AXES}.')
  def batch_axes(rules):
    return set(mesh_axes_of(dict(rules).get('act_batch')))
  decode = batch_axes(tuple(cfg.mesh.rules) + tuple(cfg.mesh.decode_rules))
  if not decode <= batch_axes(cfg.mesh.rules):
    raise ConfigError(f"config.mesh.decode_rules maps 'act_batch' to {sorted(decode)}: "
                      "sampling may split rows over a subset of the axes config.mesh.rules' "
                      'act_batch uses, not more.')


def _choice(cfg, field: str, allowed) -> None:
  section, name = field.split('.')
  if cfg[section][name] not in allowed:
    raise ConfigError(f"config.{field}={cfg[section][name]!r} must be one of {tuple(allowed)}.")


class BatchShards:
  """How many ways the rows of a batch are split: the product of the mesh axes that
  config.mesh.rules maps 'act_batch' to (1 when it maps it to None), and how to say so."""

  def __init__(self, cfg, sizes: dict[str, int]):
    self.axes = mesh_axes_of(dict(cfg.mesh.rules).get('act_batch'))
    unknown = [a for a in self.axes if a not in sizes]
    if unknown:
      raise ConfigError(f"config.mesh.rules maps 'act_batch' to {unknown}, which are not mesh "
                        f'axes {MESH_AXES}.')
    self.size = math.prod(sizes[a] for a in self.axes)
    self.sizes = '*'.join(f'{a}={sizes[a]}' for a in self.axes)
    self.or_change = (f" or the sizes of {', '.join(f'config.mesh.{a}' for a in self.axes)}"
                      if self.axes else '')

  def __str__(self) -> str:
    return (f"{self.size}, the devices rule ('act_batch', {self.axes}) of config.mesh.rules "
            f'spreads rows over ({self.sizes})')


def _rows_divide(field: str, rows: int, batch_shards: BatchShards) -> None:
  if rows < 1 or rows % batch_shards.size:
    raise ConfigError(
        f'config.{field}={rows} is not a positive multiple of {batch_shards}; change it'
        f'{batch_shards.or_change}.')


def _validate_reward(cfg, batch_shards: BatchShards) -> None:
  r = cfg.reward
  _choice(cfg, 'reward.on_bad_row', ('error', 'skip'))
  _choice(cfg, 'reward.on_long_row', ('truncate', 'drop'))
  _choice(cfg, 'reward.tie_break', ('none', 'coin'))
  if not 0.0 <= r.flip_fraction < 0.5:
    raise ConfigError(f'config.reward.flip_fraction={r.flip_fraction} must be in [0, 0.5).')
  if r.samples_per_prompt < 2:
    raise ConfigError(f'config.reward.samples_per_prompt={r.samples_per_prompt} must be >= 2 '
                      '(a comparison needs two replies).')
  if r.seq_len > cfg.model.max_seq_len:
    raise ConfigError(f'config.reward.seq_len={r.seq_len} exceeds '
                      f'config.model.max_seq_len={cfg.model.max_seq_len}.')
  if not r.best_of or min(int(n) for n in r.best_of) < 1:
    raise ConfigError(f'config.reward.best_of={tuple(r.best_of)} must be positive integers.')
  _rows_divide('reward.batch_size' if r.batch_size else 'train.batch_size',
               (r.batch_size or cfg.train.batch_size) // cfg.train.micro_batches, batch_shards)


def _validate_dpo(cfg, batch_shards: BatchShards) -> None:
  d = cfg.dpo
  _choice(cfg, 'dpo.on_bad_row', ('error', 'skip'))
  _choice(cfg, 'dpo.on_long_row', ('truncate', 'drop'))
  from jaxgpt.losses import PREFERENCE_LOSSES  # pylint: disable=import-outside-toplevel
  _choice(cfg, 'dpo.loss', PREFERENCE_LOSSES)
  if not d.beta > 0:
    raise ConfigError(f'config.dpo.beta={d.beta} must be > 0.')
  if d.nll_coef < 0:
    raise ConfigError(f'config.dpo.nll_coef={d.nll_coef} must be >= 0.')
  if not 0.0 <= d.label_smoothing < 0.5:
    raise ConfigError(f'config.dpo.label_smoothing={d.label_smoothing} must be in [0, 0.5).')
  if d.seq_len > cfg.model.max_seq_len:
    raise ConfigError(f'config.dpo.seq_len={d.seq_len} exceeds '
                      f'config.model.max_seq_len={cfg.model.max_seq_len}.')
  _rows_divide('dpo.batch_size' if d.batch_size else 'train.batch_size',
               (d.batch_size or cfg.train.batch_size) // cfg.train.micro_batches, batch_shards)


def _validate_online_rl(cfg, name: str, batch_shards: BatchShards) -> None:
  """What PPO and GRPO share: sampling the full distribution, minibatches that split over
  the mesh, a reward spec that parses."""
  s = cfg[name]
  _choice(cfg, f'{name}.on_bad_row', ('error', 'skip'))
  _choice(cfg, f'{name}.kl_estimator', ('k1', 'k2', 'k3'))
  _choice(cfg, f'{name}.frozen_dtype', DTYPES)
  _choice(cfg, f'{name}.old_logp', ('recompute', 'sampler'))
  if s.top_k != 0 or s.top_p != 1.0:
    raise ConfigError(
        f'config.{name}.top_k={s.top_k} / top_p={s.top_p}: rollouts sample the full '
        'distribution (top_k=0, top_p=1.0); filtering would make the policy that drew the '
        f'tokens differ from the one the update scores. Lower config.{name}.temperature instead.')
  if not s.temperature > 0:
    raise ConfigError(f'config.{name}.temperature={s.temperature} must be > 0 (rollouts sample).')
  if s.micro_batches < 1 or s.batch_size % s.micro_batches:
    raise ConfigError(f'config.{name}.batch_size={s.batch_size} is not divisible by '
                      f'config.{name}.micro_batches={s.micro_batches}.')
  _rows_divide(f'{name}.batch_size', s.batch_size // s.micro_batches, batch_shards)
  _rows_divide(f'{name}.rollout_batch', s.rollout_batch, batch_shards)
  if s.rollout_batch % s.batch_size:
    raise ConfigError(f'config.{name}.rollout_batch={s.rollout_batch} is not a multiple of '
                      f'config.{name}.batch_size={s.batch_size} (minibatches per rollout).')
  if s.steps < 1:
    raise ConfigError(f'config.{name}.steps={s.steps} must be >= 1.')
  if s.epochs < 1 or s.response_tokens < 1:
    raise ConfigError(f'config.{name}.epochs and config.{name}.response_tokens must be >= 1.')
  from jaxgpt.rl import rewards  # pylint: disable=import-outside-toplevel
  rewards.parse_reward_spec(s.reward, f'config.{name}.reward')


def _validate_ppo(cfg, batch_shards: BatchShards) -> None:
  p = cfg.ppo
  _validate_online_rl(cfg, 'ppo', batch_shards)
  _choice(cfg, 'ppo.value_from', ('reward', 'policy'))
  if p.ptx_coef and cfg.train.batch_size % p.micro_batches:
    raise ConfigError(f'config.train.batch_size={cfg.train.batch_size} (the PPO-ptx pretraining '
                      f'rows) is not divisible by config.ppo.micro_batches={p.micro_batches}.')


def _validate_grpo(cfg, batch_shards: BatchShards) -> None:
  g = cfg.grpo
  _validate_online_rl(cfg, 'grpo', batch_shards)
  _choice(cfg, 'grpo.advantage', ('grpo', 'dr_grpo', 'rloo'))
  _choice(cfg, 'grpo.loss_aggregation', ('auto', 'seq_mean', 'token_sum', 'token_mean'))
  _choice(cfg, 'grpo.kl_in', ('loss', 'reward'))
  if g.group_size < 1 or g.rollout_batch % g.group_size:
    raise ConfigError(f'config.grpo.group_size={g.group_size} must divide '
                      f'config.grpo.rollout_batch={g.rollout_batch} (rollout_batch / group_size '
                      'prompts an iteration, each sampled group_size times).')
  if g.oversample < 1:
    raise ConfigError(f'config.grpo.oversample={g.oversample} must be >= 1 (1: keep every '
                      'group drawn).')
  if g.advantage == 'rloo' and g.group_size < 2:
    raise ConfigError('config.grpo.advantage=rloo needs config.grpo.group_size >= 2 (the '
                      'baseline is the mean of the other samples of the prompt).')
