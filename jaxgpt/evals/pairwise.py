"""Held-out pairwise accuracy of any scorer of comparison pairs: the reward model's scores
or a DPO policy's implicit rewards."""

from __future__ import annotations

import functools

import jax
import numpy as np

from jaxgpt import sharding
from jaxgpt import model as model_lib
from jaxgpt.train import loop

# |r_chosen - r_rejected| bucket edges for the calibration table.
CALIBRATION_EDGES = (0.0, 0.5, 1.0, 2.0, 4.0)


def pairwise_report(scores_n2, heldout) -> dict:
  """Held-out pairwise accuracy overall, per task and by |score difference| bucket."""
  diff = scores_n2[:, 0] - scores_n2[:, 1]
  right = diff > 0
  per_task = {}
  for task in sorted({c.task for c in heldout}):
    idx = np.array([c.task == task for c in heldout])
    per_task[task or 'unknown'] = float(right[idx].mean())
  calibration = []
  edges = list(CALIBRATION_EDGES) + [np.inf]
  for lo, hi in zip(edges[:-1], edges[1:]):
    sel = (np.abs(diff) >= lo) & (np.abs(diff) < hi)
    calibration.append({'abs_diff': f'[{lo:g}, {hi:g})', 'pairs': int(sel.sum()),
                        'accuracy': float(right[sel].mean()) if sel.any() else None})
  return {'pairwise_accuracy': float(right.mean()) if len(right) else None,
          'pairs': int(len(right)), 'per_task': per_task, 'calibration': calibration}


@functools.lru_cache(maxsize=8)
def _jitted(per_pair, graphdef, mesh):
  def fn(params, batch):
    return per_pair(model_lib.merge(graphdef, params), batch), batch['weight']
  # Replicated: every process gets the outputs and weights of all rows of the global batch.
  return jax.jit(fn, out_shardings=sharding.replicated(mesh))


def over_batches(per_pair, graphdef, params, batches, mesh, rules):
  """(outputs, weights (n,)) of `per_pair(model, batch)` (a pytree of (B, ...) arrays) over
  the global batches whose local rows are `batches` (host numpy, the same on every process),
  concatenated: row k*B + i is global row i of batch k, so with `RewardData.val_batches` it
  is heldout[k*B + i]. No batches: (None, empty weights)."""
  fn = _jitted(per_pair, graphdef, mesh)
  outputs, weights = [], []
  with jax.set_mesh(mesh):
    for b in batches:
      got, weight = jax.device_get(fn(params, loop.global_batch(b, mesh, rules)))
      outputs.append(got)
      weights.append(np.asarray(weight))
  if not outputs:
    return None, np.zeros((0,), np.float32)
  return (jax.tree.map(lambda *xs: np.concatenate(xs), *outputs), np.concatenate(weights))
