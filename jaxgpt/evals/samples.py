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
  rows = -(-min(rows, len(prompts)) // mult) * mult
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
def _forward(graphdef, mcfg, mesh, treedef, param_shardings):
  batch_sh = sharding.batch_sharding(mesh, mcfg.rules)

  def fn(params, tokens_bt):
    logits_btv = model_lib.merge(graphdef, params)(tokens_bt[:, :-1])
    logp_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
    entropy_bt = -jnp.sum(jnp.exp(logp_btv) * logp_btv, axis=-1)
    return losses.token_log_probs(logits_btv, tokens_bt[:, 1:]), entropy_bt

  return jax.jit(fn, in_shardings=(jax.tree.unflatten(treedef, param_shardings), batch_sh),
                 out_shardings=(batch_sh, batch_sh))


def response_logprobs(m: StageModel, prompts, responses, *, rows: int = 128):
  """Per sequence (log p(response token), entropy of the distribution it was drawn from),
  from one training-style forward over prompt + response (not the KV-cache sampler)."""
  mesh, treedef, shardings = sampling.mesh_and_param_shardings(m.params)
  fn = _forward(m.graphdef, m.mcfg, mesh, treedef, shardings)
  mult = sampling.batch_multiple(mesh, m.mcfg.rules)
  rows = -(-min(rows, len(prompts)) // mult) * mult
  width = max(len(p) + len(r) for p, r in zip(prompts, responses))
  width = min(-(-width // 16) * 16, m.mcfg.max_seq_len)
  pairs, out = list(zip(prompts, responses)), []
  for start in range(0, len(pairs), rows):
    chunk = pairs[start:start + rows]
    tokens_bt = np.zeros((rows, width), np.int32)
    for i, (p, r) in enumerate(chunk):
      tokens_bt[i, :len(p) + len(r)] = list(p) + list(r)
    with jax.set_mesh(mesh):
      logp_bt, entropy_bt = fn(m.params, tokens_bt)
    logp_bt, entropy_bt = multihost_utils.process_allgather((logp_bt, entropy_bt), tiled=True)
    for i, (p, r) in enumerate(chunk):  # logits at t predict token t + 1
      at = slice(len(p) - 1, len(p) - 1 + len(r))
      out.append((logp_bt[i, at], entropy_bt[i, at]))
  return out
