"""Jitted autoregressive decoding with the KV cache (evaluation, chat, PPO rollouts).

One compiled program per (batch, prompt length) shape and `SamplingConfig`:

1. prefill: the right-padded prompts (B, P) run through `model.decode` (in chunks of
   `prefill_chunk` tokens when longer), filling cache slots 0..P-1; only the hidden
   state at each row's last prompt token, `lengths[b] - 1`, reaches the LM head, and
   gives row b's first new token;
2. a `jax.lax.while_loop` feeds back one token per step: the token sampled at step i-1,
   at position `lengths[b] + i - 1`, is written to cache slot P + i - 1 of every row
   (one dynamic-update-slice into the cache, in place; a row's prompt padding, slots
   lengths[b]..P-1, is never attended to) and the logits it yields give the token of
   step i. The loop ends after `max_new_tokens` steps or as soon as every row has
   emitted a stop id.

Per row, the response is every sampled token up to and including the first stop id
(the stop token is part of the response: a policy must learn to emit it). After it the
row's `tokens` are `pad_id`, its `logprobs` 0 and its `response_mask` 0; the row keeps
running through the batched forward but nothing of it is recorded.

Log-probs. `SampleOutput.logprobs[b, i]` is log p(token | prefix) under the *unmodified*
model distribution: softmax of the raw float32 logits at temperature 1, without top-k /
top-p filtering, i.e. exactly what `jaxgpt.losses.token_log_probs` gives for the same
token on a full training forward (tested; the report's self-check). PPO and GRPO
recompute log softmax(logits / T), the distribution the tokens were drawn from, in one
forward (`jaxgpt.rl.rollout`), unless config.<section>.old_logp='sampler': then the
sampler records them at `logprob_temperature` = T, and the entropy of that distribution
(`entropy`), and the scoring pass of the policy is skipped.

Token choice (`SamplingConfig`: greedy, or temperature then top-k then top-p, then one
categorical draw) is `jaxgpt.inference.token_choice`. Randomness: the step-i draw uses
`jax.random.fold_in(rng, i)`, so a seed fixes the whole output; with
`jax_threefry_partitionable` the result does not depend on the mesh.

Memory traffic (see `jaxgpt.model.kv_cache`). A step reads each weight once and the
keys / values it attends to, and writes one slot: the weights are cast to the compute
dtype once per call (`config.model.decode_dtype`, e.g. bfloat16 for the weights, the
compute and the cache: half the bytes, log-probs then no longer equal a float32
training forward); on CPU, where a matmul cannot read one layer of a stacked array in
place, the layers' weights are sliced once per call and each layer keeps its own cache
buffer (`split_layers_here`); on GPU / TPU the stacked cache is read in blocks up to the
filled length.

Sharding. `sample` runs on the mesh the parameters live on and takes them in their
training shardings; prompts and outputs are batch-sharded (`act_batch`). Decoding has its
own rules table, `config.mesh.decode_rules` (`mcfg.decode_rules`: the training rules with
those entries replaced): `decoding_weights` reshards the weights to it once per call, and
activations and the cache follow it. The default keeps weights whole over 'fsdp': FSDP
shards the contracted model dimension, so the training layout would all-gather every
weight at every token (tools/aot.py prints the collective bytes of one decode step). The
cache, (L,) B*K, S, H, is constrained to `cache_spec`: the merged rows x kv-heads axis
over the mesh axes of act_batch and act_kv_heads, slots over act_seq. `decode_fn` is the
pure function underneath, usable inside another jitted program (e.g. a PPO step).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxgpt import config as config_lib
from jaxgpt import model as model_lib
from jaxgpt import sharding
from jaxgpt.model import kv_cache
from jaxgpt.inference.token_choice import filter_logits, is_stop, next_token  # noqa: F401 (the API)



@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static decoding settings; one compiled program per distinct value.

  max_new_tokens: tokens sampled per row at most (the stop token included).
  temperature: 0 -> greedy; otherwise logits are divided by it before filtering.
  top_k: 0 -> off; else keep exactly this many tokens (ties -> lower ids).
  top_p: 1.0 -> off; else nucleus sampling (see the module docstring).
  stop_ids: a row stops after emitting any of these (e.g. <|end|>, <|endoftext|>).
  pad_id: written in `tokens` after a row stopped.
  prefill_chunk: prompts longer than this are prefilled this many tokens at a time
    (bounds the activations; the result is the same).
  prompt_group: rows come in runs of this many identical prompts (GRPO's groups, k
    samples a prompt): each run's prompt is prefilled once and its cache copied to the
    run's rows, a 1/prompt_group share of the prefill's work for the same result. The
    batch must be a multiple of it; `sample` prefills every row when the runs' count
    does not divide over the devices rows are sharded on.
  logprob_temperature: `logprobs` are of softmax(raw logits / this), unfiltered (1.0: the
    unmodified model; an RL rollout's own temperature makes them the update's "old" ones).
  entropy: also record the entropy of that distribution at each step (`SampleOutput.entropy`).
  """
  max_new_tokens: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  stop_ids: tuple[int, ...] = ()
  pad_id: int = 0
  prefill_chunk: int = 512
  prompt_group: int = 1
  logprob_temperature: float = 1.0
  entropy: bool = False

  def __post_init__(self):
    set_ = functools.partial(object.__setattr__, self)
    set_('stop_ids', tuple(int(i) for i in self.stop_ids))
    set_('temperature', float(self.temperature))
    set_('top_p', float(self.top_p))
    set_('logprob_temperature', float(self.logprob_temperature))
    if int(self.max_new_tokens) < 1:
      raise ValueError(f'SamplingConfig.max_new_tokens={self.max_new_tokens} must be >= 1.')
    if self.temperature < 0 or not math.isfinite(self.temperature):
      raise ValueError(f'SamplingConfig.temperature={self.temperature} must be >= 0 (0: greedy).')
    if int(self.top_k) < 0:
      raise ValueError(f'SamplingConfig.top_k={self.top_k} must be >= 0 (0: off).')
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f'SamplingConfig.top_p={self.top_p} must be in (0, 1] (1: off).')
    if int(self.prefill_chunk) < 1:
      raise ValueError(f'SamplingConfig.prefill_chunk={self.prefill_chunk} must be >= 1.')
    if int(self.prompt_group) < 1:
      raise ValueError(f'SamplingConfig.prompt_group={self.prompt_group} must be >= 1.')
    if not self.logprob_temperature > 0 or not math.isfinite(self.logprob_temperature):
      raise ValueError(f'SamplingConfig.logprob_temperature={self.logprob_temperature} must '
                       'be > 0.')


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SampleOutput:
  """What the sampler returns; every field is batch-major.

  tokens: (B, N) int32 sampled ids, `pad_id` after a row's stop token.
  logprobs: (B, N) float32 log p(token) under the unmodified model distribution
    (temperature 1, no top-k/top-p), 0 where `response_mask` is 0.
  response_mask: (B, N) int32, 1 on the response (up to and including the stop token).
  lengths: (B,) int32 response lengths, `response_mask.sum(1)`.
  finished: (B,) bool, the row emitted a stop id (False: cut at max_new_tokens).
  entropy: (B, N) float32 entropy of the distribution `logprobs` are taken from, 0 where
    `response_mask` is 0; None unless `SamplingConfig.entropy`.
  """
  tokens: jax.Array
  logprobs: jax.Array
  response_mask: jax.Array
  lengths: jax.Array
  finished: jax.Array
  entropy: jax.Array | None = None


# -- the decoding program -------------------------------------------------------------------

# The op name scope of the per-token while loop in `decode_fn`'s compiled program.
DECODE_LOOP = 'decode_loop'

# Parameters the model reads through `.astype(dtype)`: cast once per call instead.
CAST_ONCE = ('kernel', 'embed', 'pos_embed')


def decoding_model(graphdef, mcfg):
  """(graphdef, mcfg) computing in `mcfg.decode_dtype` with activations constrained by
  `mcfg.decode_rules` (unchanged when both are unset). `decode_rules` stays set: it tells
  `decode_layout` that the weights need resharding."""
  dtype = mcfg.decode_dtype or mcfg.dtype
  rules = mcfg.decode_rules or mcfg.rules
  if dtype == mcfg.dtype and rules == mcfg.rules:
    return graphdef, mcfg
  mcfg = dataclasses.replace(mcfg, dtype=dtype, rules=rules)
  return model_lib.abstract_model(mcfg)[0], mcfg


def split_layers_here() -> bool:
  """Whether decoding slices the stacked layer weights once per call (`model.split_layers`):
  on CPU, where a matmul cannot read one layer of the stack in place. On GPU / TPU the
  stack stays as it is (a second copy of the weights would cost memory)."""
  return jax.default_backend() == 'cpu'


def decode_layout(mcfg):
  """(abstract params, logical specs) that `decoding_weights` reshards to when
  `mcfg.decode_rules` is set, else None."""
  if mcfg.decode_rules is None:
    return None
  return model_lib.abstract_model(mcfg)[1:]


def decode_param_shardings(mcfg, mesh, layout):
  """The parameters' shardings while sampling (`mcfg.decode_rules`, on `mesh`)."""
  return sharding.param_shardings(*layout, mesh, mcfg.decode_rules, 'config.mesh.decode_rules')


def decoding_weights(params, mcfg, layout=None):
  """(params, layers) for `model.decode`, prepared once per call rather than every step:
  weight matrices cast to the compute dtype (the values the model would compute with;
  norm scales stay as they are), resharded to the sampler's layout (`layout`, from
  `decode_layout`: one all-gather here instead of one per token inside the loop) and,
  where `split_layers_here`, the blocks as one tree per layer (`layers`, else None)."""
  def cast(path, x):
    name = getattr(path[-1], 'key', None)
    return x.astype(mcfg.dtype) if name in CAST_ONCE else x

  params = jax.tree_util.tree_map_with_path(cast, params)
  mesh = jax.sharding.get_abstract_mesh()
  if layout is not None and not mesh.empty:  # after the cast: fewer bytes to gather
    params = jax.lax.with_sharding_constraint(params, decode_param_shardings(mcfg, mesh, layout))
  if not split_layers_here():
    return params, None
  return params, model_lib.split_layers(params)


def prefill_width(p: int, chunk: int) -> int:
  """Cache slots a prefill of `p` tokens writes: `p`, or whole chunks of `chunk`."""
  return p if p <= chunk else -(-p // chunk) * chunk


def cache_spec(rules, ndim: int) -> P:
  """PartitionSpec of a cache array, (L,) B*K, S, H: the merged rows x kv-heads axis over
  the mesh axes of 'act_batch' then 'act_kv_heads' (row-major, as the merge)."""
  batch, heads, seq = sharding.logical_to_spec(('act_batch', 'act_kv_heads', 'act_seq'), rules)
  merged = config_lib.mesh_axes_of(batch) + config_lib.mesh_axes_of(heads)
  spec = (merged or None, seq, None)
  return P(*((None,) * (ndim - 3) + spec))


def constrain_cache(cache, rules):
  """Sharding constraint on the cache (stacked or per layer); a no-op outside a mesh."""
  if jax.sharding.get_abstract_mesh().empty:
    return cache
  return jax.tree.map(lambda c: jax.lax.with_sharding_constraint(c, cache_spec(rules, c.ndim)),
                      cache)


def prefill(model, prompts_bp, lengths_b, cache, chunk: int, pad=None, layers=None):
  """(float32 logits_bv at each row's last prompt token, cache) with prompt token t in
  cache slot t, `chunk` tokens per forward; logits only for the one position per row.

  Long prompts run as a scan over equal chunks, the last one padded: its slots past P
  are overwritten by later tokens before any query can see them.
  """
  b, p = prompts_bp.shape
  rules = model.cfg.rules
  last_b = lengths_b - 1
  width = prefill_width(p, chunk)
  if width == p:
    positions_bp = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    h_bpd, cache = model.decode(prompts_bp, positions_bp, cache, slot=0, pad=pad,
                                layers=layers)
    h_b1d = jnp.take_along_axis(h_bpd, last_b[:, None, None], axis=1)
  else:
    n = width // chunk
    tokens_nbc = jnp.pad(prompts_bp, ((0, 0), (0, width - p))).reshape(b, n, chunk)
    tokens_nbc = jnp.swapaxes(tokens_nbc, 0, 1)

    def one_chunk(carry, index_and_tokens):
      cache, h_b1d = carry
      index, tokens_bc = index_and_tokens
      start = index * chunk
      # Chunk padding past the prompt gets a valid position (any would do).
      positions_c = jnp.minimum(start + jnp.arange(chunk, dtype=jnp.int32), p - 1)
      h_bcd, cache = model.decode(tokens_bc, jnp.broadcast_to(positions_c, (b, chunk)),
                                  constrain_cache(cache, rules), slot=start, pad=pad,
                                  layers=layers)
      in_chunk_b = last_b - start
      here_b = (in_chunk_b >= 0) & (in_chunk_b < chunk)
      h_here_b1d = jnp.take_along_axis(h_bcd, jnp.clip(in_chunk_b, 0, chunk - 1)[:, None, None],
                                       axis=1)
      return (cache, jnp.where(here_b[:, None, None], h_here_b1d, h_b1d)), None

    h_b1d = jnp.zeros((b, 1, model.cfg.d_model), model.cfg.dtype)
    (cache, h_b1d), _ = jax.lax.scan(one_chunk, (cache, h_b1d),
                                     (jnp.arange(n, dtype=jnp.int32), tokens_nbc))
  return last_logits(model, h_b1d), constrain_cache(cache, rules)


def last_logits(model, h_b1d):
  """float32 (B, V) logits, the vocabulary gathered for the sort / argmax; rows stay
  batch-sharded."""
  return sharding.constrain(model.logits(h_b1d)[:, 0], ('act_batch', None), model.cfg.rules)


def decode_fn(graphdef, mcfg, settings: SamplingConfig):
  """The pure `(params, prompts_bp, lengths_b, rng) -> SampleOutput` (jit it, or call it
  inside a jitted function under `jax.set_mesh`).

  prompts_bp: (B, P) int32, right-padded; lengths_b: (B,) int32 in [1, P];
  `sample` requires P + max_new_tokens <= `mcfg.max_seq_len`, so that prompt + response
  also fits the training forward (PPO).

  The cache keeps each prompt where it is (slots 0..P-1, row b's padding slots
  lengths_b[b]..P-1 never attended) and puts new token i of every row in slot P+i-1,
  so each step writes one shared slot in place (see `jaxgpt.model.kv_cache`).
  """
  n_new = int(settings.max_new_tokens)
  graphdef, mcfg = decoding_model(graphdef, mcfg)
  rules = mcfg.rules
  layout = decode_layout(mcfg)

  def run(params, prompts_bp, lengths_b, rng):
    b, p = prompts_bp.shape
    prompts_bp = prompts_bp.astype(jnp.int32)
    lengths_b = lengths_b.astype(jnp.int32)
    params, layers = decoding_weights(params, mcfg, layout)
    pad = (lengths_b, p)
    slots = max(p + n_new - 1, prefill_width(p, settings.prefill_chunk))
    g = int(settings.prompt_group)
    if b % g:
      raise ValueError(f'sampling: batch {b} is not a multiple of prompt_group {g}.')
    cache = constrain_cache(
        model_lib.init_cache(mcfg, b // g, slots, per_layer=layers is not None), rules)
    first_g = slice(None, None, g)  # one row of each run of identical prompts
    logits_bv, cache = prefill(model_lib.merge(graphdef, params), prompts_bp[first_g],
                               lengths_b[first_g], cache, settings.prefill_chunk,
                               (lengths_b[first_g], p), layers)
    if g > 1:
      logits_bv = jnp.repeat(logits_bv, g, axis=0)
      cache = constrain_cache(kv_cache.repeat_rows(cache, g, mcfg.n_kv_heads), rules)
    tok_b, lp_b, ent_b = next_token(logits_bv, jax.random.fold_in(rng, 0), settings)

    batch_axes = ('act_batch', None)
    # What each step records, (B, n_new) each: its token, log-prob, liveness and entropy.
    first = {'tokens': tok_b, 'logprobs': lp_b, 'response_mask': jnp.ones((b,), jnp.int32)}
    fill = {'tokens': settings.pad_id, 'logprobs': 0.0, 'response_mask': 0}
    if settings.entropy:
      first['entropy'], fill['entropy'] = ent_b, 0.0
    rec = {k: jnp.full((b, n_new), fill[k], x.dtype).at[:, 0].set(x) for k, x in first.items()}
    done_b = is_stop(tok_b, settings.stop_ids)

    def cond(carry):
      i, _, _, done_b = carry
      return (i < n_new) & ~jnp.all(done_b)

    def body(carry):
      i, cache, rec, done_b = carry
      prev_b = jax.lax.dynamic_index_in_dim(rec['tokens'], i - 1, axis=1, keepdims=False)
      # Finished rows hold pad_id, which may be outside the vocabulary (e.g. -1): they
      # still run through the batched forward, so feed them a valid id.
      prev_b = jnp.clip(prev_b, 0, mcfg.vocab_size - 1)
      model = model_lib.merge(graphdef, params)
      h_b1d, cache = model.decode(prev_b[:, None], (lengths_b + i - 1)[:, None],
                                  constrain_cache(cache, rules), slot=p + i - 1, pad=pad,
                                  layers=layers)
      logits_bv = last_logits(model, h_b1d)
      tok_b, lp_b, ent_b = next_token(logits_bv, jax.random.fold_in(rng, i), settings)
      live_b = ~done_b
      step = {'tokens': tok_b, 'logprobs': lp_b, 'response_mask': live_b, 'entropy': ent_b}

      def put(k, x_bn):
        x_b = jnp.where(live_b, step[k], fill[k]).astype(x_bn.dtype)
        x_bn = jax.lax.dynamic_update_index_in_dim(x_bn, x_b, i, axis=1)
        return sharding.constrain(x_bn, batch_axes, rules)

      rec = {k: put(k, x_bn) for k, x_bn in rec.items()}
      done_b = done_b | (live_b & is_stop(tok_b, settings.stop_ids))
      return i + 1, constrain_cache(cache, rules), rec, done_b

    carry = (jnp.int32(1), cache, rec, done_b)
    with jax.named_scope(DECODE_LOOP):  # how jaxgpt.aot.collectives finds the per-token loop
      _, _, rec, done_b = jax.lax.while_loop(cond, body, carry)
    return SampleOutput(lengths=rec['response_mask'].sum(axis=1, dtype=jnp.int32),
                        finished=done_b, **rec)

  return run


# -- compiled entry point -------------------------------------------------------------------


def mesh_and_param_shardings(params):
  """(mesh, param treedef, shardings tuple) of parameters placed by jit or device_put."""
  leaves, treedef = jax.tree.flatten(params)
  shardings = [x.sharding for x in leaves]
  named = [s for s in shardings if isinstance(s, NamedSharding)]
  if named:
    mesh = named[0].mesh
    if any(s.mesh != mesh for s in named):
      raise ValueError('sampling: the parameters live on more than one mesh.')
    shardings = [s if isinstance(s, NamedSharding) else NamedSharding(mesh, P())
                 for s in shardings]
  else:  # plain device_put arrays: a one-device mesh of their device
    devices = leaves[0].sharding.device_set
    if len(devices) != 1:
      raise ValueError('sampling: parameters must carry NamedShardings (use init_params).')
    mesh = jax.make_mesh((1, 1, 1), config_lib.MESH_AXES, devices=list(devices),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    shardings = [NamedSharding(mesh, P())] * len(leaves)
  return mesh, treedef, tuple(shardings)


@functools.lru_cache(maxsize=64)
def _jitted(graphdef, mcfg, settings, mesh, param_treedef, param_shardings):
  batch_sh = sharding.batch_sharding(mesh, mcfg.rules)
  param_sh = jax.tree.unflatten(param_treedef, param_shardings)
  out_sh = SampleOutput(tokens=batch_sh, logprobs=batch_sh, response_mask=batch_sh,
                        lengths=batch_sh, finished=batch_sh,
                        entropy=batch_sh if settings.entropy else None)
  return jax.jit(decode_fn(graphdef, mcfg, settings),
                 in_shardings=(param_sh, batch_sh, batch_sh, sharding.replicated(mesh)),
                 out_shardings=out_sh)


def batch_multiple(mesh, rules) -> int:
  """The batch size must be a multiple of this (the devices `act_batch` spreads rows over)."""
  axes = config_lib.mesh_axes_of(sharding.logical_to_spec(('act_batch',), rules)[0])
  return int(np.prod([mesh.shape[a] for a in axes]))


def whole_groups_per_shard(rows: int, group: int, multiple: int) -> bool:
  """Do `rows` in runs of `group` identical prompts put whole runs, the same number, on
  each of the `multiple` (`batch_multiple`) row shards? What sharing a run's prompt needs."""
  return rows % group == 0 and (rows // group) % multiple == 0


def sample(graphdef, params, mcfg, prompts_bp, lengths_b, rng,
           settings: SamplingConfig) -> SampleOutput:
  """Decode a batch of right-padded prompts on the parameters' mesh (see the module doc).

  prompts_bp: (B, P) int ids, right-padded (the padding value is irrelevant);
  lengths_b: (B,) prompt lengths in [1, P]; rng: a PRNG key (unused when greedy).
  B must be a multiple of `batch_multiple(mesh, mcfg.rules)`. Compiled once per
  (B, P) and `settings` (and parameter tree / shardings); later calls reuse it.
  """
  mesh, treedef, param_shardings = mesh_and_param_shardings(params)
  b, p = np.shape(prompts_bp)
  n = settings.max_new_tokens
  if p + n > mcfg.max_seq_len:
    raise ValueError(
        f'sampling: prompt length {p} + max_new_tokens {n} = {p + n} exceeds '
        f'config.model.max_seq_len={mcfg.max_seq_len}; shorten the prompts or the response.')
  if np.shape(lengths_b) != (b,):
    raise ValueError(f'sampling: lengths has shape {np.shape(lengths_b)}, expected ({b},).')
  host_lengths = np.asarray(jax.device_get(lengths_b))
  if host_lengths.min() < 1 or host_lengths.max() > p:
    raise ValueError(f'sampling: prompt lengths must be in [1, {p}], got {host_lengths.tolist()}.')
  mult = batch_multiple(mesh, mcfg.rules)
  if b % mult:
    raise ValueError(f'sampling: batch {b} is not a multiple of the {mult} devices rows are '
                     'sharded over (act_batch); pad the batch.')
  if settings.prompt_group > 1 and not whole_groups_per_shard(b, settings.prompt_group, mult):
    settings = dataclasses.replace(settings, prompt_group=1)  # same result, every row prefilled
  fn = _jitted(graphdef, mcfg, settings, mesh, treedef, param_shardings)
  batch_sh = sharding.batch_sharding(mesh, mcfg.rules)
  prompts_bp = jax.device_put(np.asarray(jax.device_get(prompts_bp), np.int32), batch_sh)
  lengths_b = jax.device_put(host_lengths.astype(np.int32), batch_sh)
  rng = jax.device_put(rng, sharding.replicated(mesh))
  with jax.set_mesh(mesh):
    return fn(params, prompts_bp, lengths_b, rng)


# -- host-side convenience ------------------------------------------------------------------


def default_stop_ids(tokenizer) -> tuple[int, ...]:
  """The chat format's stop ids (its end of turn, end of text); end of text alone for a
  tokenizer that cannot chat (a LLaMA-layout one without chat tokens)."""
  try:
    return tokenizer.chat.stop_ids
  except ValueError:
    return (tokenizer.eot_id,)


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, *, bucket: int = 16,
                max_len: int | None = None, batch_multiple: int = 1):
  """(ids (B', P) int32, lengths (B',) int32): right-padded to a multiple of `bucket`
  (capped at `max_len`), rows padded to a multiple of `batch_multiple` with one-token
  dummy prompts (drop `ids[len(prompts):]` results)."""
  lens = [len(p) for p in prompts]
  if not prompts or min(lens) < 1:
    raise ValueError('sampling: every prompt needs at least one token (e.g. <|endoftext|>).')
  longest = max(lens)
  width = -(-longest // bucket) * bucket
  if max_len is not None:
    if longest > max_len:
      raise ValueError(f'sampling: a prompt has {longest} tokens, more than the {max_len} '
                       'that fit before the response; shorten it or ask for fewer tokens.')
    width = min(width, max_len)
  rows = -(-len(prompts) // batch_multiple) * batch_multiple
  ids = np.full((rows, width), pad_id, np.int32)
  lengths = np.ones((rows,), np.int32)
  for i, p in enumerate(prompts):
    ids[i, :len(p)] = p
    lengths[i] = len(p)
  return ids, lengths


def generate_text(graphdef, params, mcfg, tokenizer, prompts, **kw) -> list[str]:
  """Completions of `prompts` (strings, encoded with special tokens allowed, or id lists),
  decoded up to (not including) the first stop id. Greedy by default; keywords as
  `generate`."""
  return [text for text, _ in generate(graphdef, params, mcfg, tokenizer, prompts, **kw)]


def generate(graphdef, params, mcfg, tokenizer, prompts, *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop_ids: Sequence[int] | None = None, seed: int = 0, bucket: int = 16,
             batch_size: int | None = None) -> list[tuple[str, bool]]:
  """(completion text, finished) per prompt: the text up to (not including) the first
  stop id, and whether a stop id came before `max_new_tokens` ran out.

  Prompts are right-padded to a multiple of `bucket` tokens to limit recompiles;
  `batch_size` (default: all at once) decodes them in chunks of that many rows, every
  chunk the same shape (one compilation). Stop ids default to `default_stop_ids`.
  """
  if isinstance(prompts, (str, bytes)):
    raise TypeError('generate_text: prompts is a list of strings or of id lists.')
  ids = [tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p] for p in prompts]
  stops = default_stop_ids(tokenizer) if stop_ids is None else tuple(stop_ids)
  settings = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, stop_ids=stops, pad_id=tokenizer.pad_id)
  mesh = mesh_and_param_shardings(params)[0]
  mult = batch_multiple(mesh, mcfg.rules)
  rows = -(-min(batch_size or len(ids), len(ids)) // mult) * mult
  prompt_ids, lengths = pad_prompts(ids, tokenizer.pad_id, bucket=bucket,
                                    max_len=mcfg.max_seq_len - max_new_tokens,
                                    batch_multiple=rows)
  key = jax.random.PRNGKey(seed)
  texts = []
  for start in range(0, len(ids), rows):
    out = sample(graphdef, params, mcfg, prompt_ids[start:start + rows],
                 lengths[start:start + rows], jax.random.fold_in(key, start), settings)
    # Rows live on every process's devices: gather them (a device_get when single-process).
    tokens, n, finished = multihost_utils.process_allgather(
        (out.tokens, out.lengths, out.finished), tiled=True)
    for row in range(min(rows, len(ids) - start)):
      keep = int(n[row]) - int(bool(finished[row]))  # drop the stop token itself
      texts.append((tokenizer.decode(tokens[row, :keep].tolist()), bool(finished[row])))
  return texts


# -- streaming (interactive chat) -----------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _stream_fns(graphdef, mcfg, choice: SamplingConfig, mesh, param_treedef, param_shardings):
  """Jitted (weights, prefill, step) with a cache of (at least) `mcfg.max_seq_len` slots,
  slot = position: the step compiles once, the prefill once per prompt-width bucket. The
  step donates the cache and writes one slot of it in place; `weights` prepares the
  parameters once per stream (`decoding_weights`; a copy only when it changes them)."""
  param_sh = jax.tree.unflatten(param_treedef, param_shardings)
  graphdef, mcfg = decoding_model(graphdef, mcfg)
  rules = mcfg.rules  # the sampler's (config.mesh.decode_rules in force)
  batch_sh = sharding.batch_sharding(mesh, rules)
  repl = sharding.replicated(mesh)
  if split_layers_here():
    one_sh = NamedSharding(mesh, cache_spec(rules, 3))
    cache_sh = model_lib.KVCache((one_sh,) * mcfg.n_layers, (one_sh,) * mcfg.n_layers)
  else:
    stacked_sh = NamedSharding(mesh, cache_spec(rules, 4))
    cache_sh = model_lib.KVCache(stacked_sh, stacked_sh)
  chunk = choice.prefill_chunk
  slots = prefill_width(mcfg.max_seq_len, chunk)  # any bucket's prefill fits

  def prefill_fn(weights, prompts_bw, length, rng):
    b, _ = prompts_bw.shape
    params, layers = weights
    model = model_lib.merge(graphdef, params)
    cache = constrain_cache(
        model_lib.init_cache(mcfg, b, slots, per_layer=layers is not None), rules)
    # No padding mask: the steps overwrite the slots past the prompt before any query
    # reaches them.
    logits_bv, cache = prefill(model, prompts_bw, jnp.full((b,), length, jnp.int32), cache,
                               chunk, layers=layers)
    return next_token(logits_bv, jax.random.fold_in(rng, 0), choice)[0], cache

  def step(weights, prev_b, position, cache, rng, i):
    b = prev_b.shape[0]
    params, layers = weights
    model = model_lib.merge(graphdef, params)
    positions_b1 = jnp.full((b, 1), position, jnp.int32)
    h_b1d, cache = model.decode(prev_b[:, None], positions_b1, constrain_cache(cache, rules),
                                slot=position, layers=layers)
    logits_bv = last_logits(model, h_b1d)
    return next_token(logits_bv, jax.random.fold_in(rng, i), choice)[0], constrain_cache(
        cache, rules)

  out_sh = (batch_sh, cache_sh)
  # Weights prepared once per stream, not once per token.
  layout = decode_layout(mcfg)
  decode_sh = param_sh if layout is None else decode_param_shardings(mcfg, mesh, layout)
  layer_sh = None
  if split_layers_here():
    one_sh = jax.tree.map(lambda x: NamedSharding(mesh, P(*x.spec[1:])), decode_sh['blocks'])
    layer_sh = (one_sh,) * mcfg.n_layers
  weights_sh = (decode_sh, layer_sh)
  jit_weights = jax.jit(functools.partial(decoding_weights, mcfg=mcfg, layout=layout),
                        in_shardings=(param_sh,), out_shardings=weights_sh)
  if layer_sh is None and mcfg.dtype == mcfg.param_dtype and decode_sh is param_sh:
    # nothing to prepare: no copy
    jit_weights = lambda params: (params, None)  # noqa: E731
  jit_prefill = jax.jit(prefill_fn, in_shardings=(weights_sh, batch_sh, repl, repl),
                        out_shardings=out_sh)
  jit_step = jax.jit(step, in_shardings=(weights_sh, batch_sh, repl, cache_sh, repl, repl),
                     out_shardings=out_sh, donate_argnums=(3,))
  return jit_weights, jit_prefill, jit_step


def stream(graphdef, params, mcfg, prompt_ids: Sequence[int], *, settings: SamplingConfig,
           seed: int = 0, bucket: int = 64):
  """Yields the sampled ids of one prompt one at a time, as they are generated.

  Greedy, the ids are exactly `sample`'s for this prompt; otherwise they come from the
  same distribution (draw i uses `fold_in(PRNGKey(seed), i)`; the draws themselves may
  differ from a batched `sample`). As in `sample`, the stop id is yielded too; it ends
  the stream. The host drives the loop: one prefill, then one jitted single-token step
  per id (the next step is dispatched before the current id is read back). The KV cache has `mcfg.max_seq_len` slots whatever
  the prompt, so the step compiles once per session (the prefill once per
  `bucket`-multiple of prompt width). At most `settings.max_new_tokens` ids, and never
  past `mcfg.max_seq_len` positions (prompt + response). The single row is repeated to
  `batch_multiple` rows on a data-parallel mesh.
  """
  ids = [int(t) for t in prompt_ids]
  n_prompt = len(ids)
  if n_prompt < 1:
    raise ValueError('sampling.stream: the prompt needs at least one token.')
  room = mcfg.max_seq_len - n_prompt
  if room < 1:
    raise ValueError(f'sampling.stream: the prompt has {n_prompt} tokens, leaving no room '
                     f'in config.model.max_seq_len={mcfg.max_seq_len}; shorten it.')
  n_new = min(int(settings.max_new_tokens), room)
  mesh, treedef, param_shardings = mesh_and_param_shardings(params)
  choice = SamplingConfig(max_new_tokens=1, temperature=settings.temperature,
                          top_k=settings.top_k, top_p=settings.top_p,
                          prefill_chunk=settings.prefill_chunk)
  weights_fn, prefill_step, step = _stream_fns(graphdef, mcfg, choice, mesh, treedef,
                                               param_shardings)
  rows = batch_multiple(mesh, mcfg.rules)
  width = min(-(-n_prompt // bucket) * bucket, mcfg.max_seq_len)
  prompts_bw = np.zeros((rows, width), np.int32)
  prompts_bw[:, :n_prompt] = ids
  rng = jax.device_put(jax.random.PRNGKey(seed), sharding.replicated(mesh))
  stops = set(settings.stop_ids)
  with jax.set_mesh(mesh):
    weights = weights_fn(params)
    tok_b, cache = prefill_step(weights, prompts_bw, np.int32(n_prompt), rng)
  for i in range(n_new):
    current_b = tok_b
    if i + 1 < n_new:  # dispatch the next step before reading this token: overlap
      with jax.set_mesh(mesh):
        tok_b, cache = step(weights, current_b, np.int32(n_prompt + i), cache, rng,
                            np.int32(i + 1))
    token = int(np.asarray(jax.device_get(current_b))[0])
    yield token
    if token in stops:
      return
