"""A stage's model read for evaluation, its samples at T=1 and their log-probs from a full
forward: what the report and best-of-N measure every model with.

The sampler is the project's (`sampling.sample`); the log-probs of `response_logprobs`
come from a separate training-style forward, so their agreement with the sampler's is a
self-check.
"""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from jaxgpt import losses, sharding
from jaxgpt import model as model_lib
from jaxgpt.inference import sampling
from jaxgpt.train import checkpoint as ckpt_lib
from jaxgpt.train import lora_checkpoint


class StageModel(NamedTuple):
  """The newest checkpoint of one stage, read onto the run's mesh."""
  graphdef: Any
  params: Any
  mcfg: model_lib.ModelConfig
  meta: dict
  step: int


def load_stage(workdir, stage, mcfg, mesh, key_path=('params',)) -> StageModel | str:
  """The newest checkpoint of WORKDIR/<stage>, or a sentence saying why there is none."""
  directory = ckpt_lib.checkpoints_dir(workdir, stage)
  if not os.path.isdir(directory):
    return f'not run, no {directory}'
  reader = ckpt_lib.Checkpointer(directory, async_save=False)
  try:
    step = reader.latest_step()
    meta = {} if step is None else reader.read_meta(step)
  finally:
    reader.close()
  if step is None:
    return f'no finished checkpoint in {directory}'
  graphdef, target = model_lib.abstract_sharded_params(mcfg, mesh)
  if '/'.join(key_path) in meta.get(lora_checkpoint.META_KEY, {}):  # a LoRA run: merged
    from jaxgpt.stages import common  # pylint: disable=import-outside-toplevel
    params = common.params_from_checkpoint(directory, mesh, mcfg, what=f'report: {stage}',
                                           key_path=key_path)[0]
    return StageModel(graphdef, params, mcfg, meta, step)
  params, meta, step = ckpt_lib.restore_latest_params(directory, target, what=f'report: {stage}',
                                                      key_path=key_path)
  return StageModel(graphdef, params, mcfg, meta, step)


def even_rows(n: int, most: int, multiple: int) -> int:
  """Rows per chunk for `n` rows in equal chunks of at most ~`most`, a multiple of
  `multiple`: 640 rows at most 512 a chunk are two of 320, not two of 512 (a third idle)."""
  chunks = -(-n // max(most, 1))
  return -(-(-(-n // chunks)) // multiple) * multiple


def draw(m: StageModel, tok, prompts, *, n_new: int, seed: int, rows: int = 512,
         group: int = 1):
  """(response ids with the stop token, the sampler's log-probs) per prompt, at T=1:
  `sampling.sample` on equal-shape chunks (one compilation). `group`: the prompts come
  in runs of this many identical ones (k samples a prompt), each prefilled once."""
  if len(prompts) % group:
    raise ValueError(f'draw: {len(prompts)} prompts are not runs of {group}.')
  settings = sampling.SamplingConfig(max_new_tokens=n_new, temperature=1.0,
                                     stop_ids=sampling.default_stop_ids(tok), pad_id=tok.pad_id,
                                     prompt_group=group)
  # Chunks of whole runs; dummy padding rows are identical, so they form runs too.
  mult = group * sampling.batch_multiple(sampling.mesh_and_param_shardings(m.params)[0],
                                         m.mcfg.rules)
  rows = even_rows(len(prompts), rows, mult)
  ids_bp, lengths_b = sampling.pad_prompts(prompts, tok.pad_id, max_len=m.mcfg.max_seq_len - n_new,
                                           batch_multiple=rows)
  key, out = jax.random.PRNGKey(seed), []
  for start in range(0, len(prompts), rows):
    res = sampling.sample(m.graphdef, m.params, m.mcfg, ids_bp[start:start + rows],
                          lengths_b[start:start + rows], jax.random.fold_in(key, start), settings)
    tokens_bn, n_b, logprobs_bn = multihost_utils.process_allgather(
        (res.tokens, res.lengths, res.logprobs), tiled=True)
    out += [(tokens_bn[r, :n_b[r]].tolist(), logprobs_bn[r, :n_b[r]])
            for r in range(min(rows, len(prompts) - start))]
  return out


@functools.lru_cache(maxsize=8)
def _forward(graphdef, mcfg, mesh, treedef, param_shardings, window: int, group: int,
             prefix_width: int):
  batch_sh = sharding.batch_sharding(mesh, mcfg.rules)

  def fn(params, tokens_bt, first_b):
    model = model_lib.merge(graphdef, params)
    # logits positions first_b .. first_b + window - 1, clipped to the last (W - 2); the
    # clipped tail lies past every reply and is dropped by the caller
    at_bw = jnp.minimum(first_b[:, None] + jnp.arange(window), tokens_bt.shape[1] - 2)
    if group > 1:  # each group's prompt runs once (Transformer.hidden_after_prefix)
      h_bwd = model.hidden_after_prefix(tokens_bt[::group, :prefix_width],
                                        jnp.take_along_axis(tokens_bt, at_bw, axis=1), at_bw)
    else:
      h_bwd = jnp.take_along_axis(model.hidden(tokens_bt[:, :-1]), at_bw[..., None], axis=1)
    logits_bwv = model.logits(h_bwd)
    logp_bwv = jax.nn.log_softmax(logits_bwv, axis=-1)
    entropy_bw = -jnp.sum(jnp.exp(logp_bwv) * logp_bwv, axis=-1)
    targets_bw = jnp.take_along_axis(tokens_bt[:, 1:], at_bw, axis=1)
    return losses.token_log_probs(logits_bwv, targets_bw), entropy_bw

  return jax.jit(fn, in_shardings=(jax.tree.unflatten(treedef, param_shardings), batch_sh,
                                   batch_sh),
                 out_shardings=(batch_sh, batch_sh))


def response_logprobs(m: StageModel, prompts, responses, *, rows: int = 128, group: int = 1):
  """Per sequence (log p(response token), entropy of the distribution it was drawn from),
  from one training-style forward over prompt + response (not the KV-cache sampler). The
  LM head runs on the reply positions only (with a real vocabulary, 49k columns, and
  prompts several times longer than the replies, the head on every position cost most);
  `group`: the prompts come in runs of this many identical ones, each run's prompt is run
  once."""
  if len(prompts) % group:
    raise ValueError(f'response_logprobs: {len(prompts)} prompts are not runs of {group}.')
  mesh, treedef, shardings = sampling.mesh_and_param_shardings(m.params)
  rows = even_rows(len(prompts), rows, group * sampling.batch_multiple(mesh, m.mcfg.rules))
  width = max(len(p) + len(r) for p, r in zip(prompts, responses)) + 1
  width = min(-(-width // 16) * 16, m.mcfg.max_seq_len)
  window = -(-max(1, *(len(r) for r in responses)) // 8) * 8
  fn = _forward(m.graphdef, m.mcfg, mesh, treedef, shardings, window, group,
                min(max(len(p) for p in prompts), width - 1))
  pairs, out = list(zip(prompts, responses)), []
  pairs += [pairs[-1]] * (-len(pairs) % rows)  # whole runs in the last chunk too
  for start in range(0, len(pairs), rows):
    chunk = pairs[start:start + rows]
    tokens_bt = np.zeros((rows, width), np.int32)
    first_b = np.zeros((rows,), np.int32)  # the position whose logits predict reply token 0
    for i, (p, r) in enumerate(chunk):
      tokens_bt[i, :len(p) + len(r)] = list(p) + list(r)
      first_b[i] = len(p) - 1
    with jax.set_mesh(mesh):
      logp_bw, entropy_bw = fn(m.params, tokens_bt, first_b)
    logp_bw, entropy_bw = multihost_utils.process_allgather((logp_bw, entropy_bw), tiled=True)
    for i, (_, r) in enumerate(chunk):
      out.append((logp_bw[i, :len(r)], entropy_bw[i, :len(r)]))
  return out[:len(prompts)]
