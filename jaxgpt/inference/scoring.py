"""Reward-model scores of (prompt, reply) pairs, on the host's side of the stage.

Used by the reward stage's evaluation (best-of-N, AUC, score stats), `python -m
jaxgpt.cli.score`, and the recipe's report. Each reply is rendered with the chat template,
closed by `<|end|>` only if it finished, and followed by the `<|reward|>` readout token
(`jaxgpt.data.reward.encode_reply`): the layout the model was trained on and PPO scores
its rollouts in. Then scored in fixed-shape batches on the parameters' own mesh; every
process passes the same sequences and gets every score (multi-host too).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import numpy as np

from jaxgpt import sharding
from jaxgpt import model as model_lib
from jaxgpt.data import reward as reward_data
from jaxgpt.inference import sampling


@functools.lru_cache(maxsize=8)
def _jitted(graphdef, mcfg, mesh, treedef, param_shardings):
  batch_sh = sharding.batch_sharding(mesh, mcfg.rules)

  def score(params, tokens_bt, positions_bt, segment_ids_bt, readout_b):
    model = model_lib.merge(graphdef, params)
    return model.score(tokens_bt, positions_bt, segment_ids_bt, readout_b)

  # Replicated scores: every process reads them all, as a multi-host run needs.
  return jax.jit(score, in_shardings=(jax.tree.unflatten(treedef, param_shardings),) +
                 (batch_sh,) * 4, out_shardings=sharding.replicated(mesh)), batch_sh


def _global(x: np.ndarray, sh) -> jax.Array:
  """A host array every process holds whole, as a global array in sharding `sh` (jit
  takes numpy inputs with a non-replicated sharding only in a single process)."""
  return jax.make_array_from_callback(x.shape, sh, lambda index: x[index])


def score_ids(graphdef, params, mcfg, sequences: Sequence[Sequence[int]], *, pad_id: int,
              batch_size: int = 256) -> np.ndarray:
  """float32 scores of token sequences whose last token is the readout token (the same
  sequences on every process)."""
  if not sequences:
    return np.zeros((0,), np.float32)
  mesh, treedef, param_shardings = sampling.mesh_and_param_shardings(params)
  fn, batch_sh = _jitted(graphdef, mcfg, mesh, treedef, param_shardings)
  mult = sampling.batch_multiple(mesh, mcfg.rules)
  rows = -(-min(batch_size, max(len(sequences), 1)) // mult) * mult
  width = max(len(s) for s in sequences)
  width = min(-(-width // 16) * 16, mcfg.max_seq_len)
  out = []
  for start in range(0, len(sequences), rows):
    chunk = sequences[start:start + rows]
    tokens = np.full((rows, width), pad_id, np.int32)
    segment_ids = np.zeros((rows, width), np.int32)
    readout = np.zeros((rows,), np.int32)
    for i, ids in enumerate(chunk):
      tokens[i, :len(ids)] = ids
      segment_ids[i, :len(ids)] = 1
      readout[i] = len(ids) - 1
    positions = np.where(segment_ids > 0, np.arange(width)[None], 0).astype(np.int32)
    with jax.set_mesh(mesh):
      scores = fn(params, *(_global(x, batch_sh) for x in (tokens, positions, segment_ids,
                                                            readout)))
    out.append(np.asarray(jax.device_get(scores))[:len(chunk)])
  return np.concatenate(out)


def score_replies(graphdef, params, mcfg, tokenizer, items, *, seq_len: int | None = None,
                  batch_size: int = 256) -> np.ndarray:
  """Scores of `items`, each (prompt messages, reply text) or (prompt messages, reply
  text, finished). finished defaults to True (a user's reply is a whole turn); pass a
  sampled reply's own flag (`tok.chat.reply`), as a reply cut at the token limit is
  scored without `<|end|>`. Prompts too long for `seq_len` (default the model's) lose
  tokens from the left, as in training."""
  seq_len = seq_len or mcfg.max_seq_len
  sequences = []
  for item in items:
    prompt, reply, finished = item if len(item) == 3 else (*item, True)
    ids, _ = reward_data.encode_reply(prompt, reply, tokenizer, seq_len, 'truncate',
                                      bool(finished))
    if ids is None:
      raise ValueError(f'reply of {len(tokenizer.encode(reply))} tokens does not fit '
                       f'{seq_len} tokens with its template; shorten it.')
    sequences.append(ids)
  return score_ids(graphdef, params, mcfg, sequences, pad_id=tokenizer.pad_id,
                   batch_size=batch_size)
