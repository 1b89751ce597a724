"""remat='save_proj': the step is unchanged, and what the backward pass keeps is the
projection outputs only (not the MLP hidden, nor attention's scores)."""

import re

import jax
import numpy as np
import pytest

import helpers
from jaxgpt import model as model_lib
from jaxgpt.train import trainer


def loss_fn_of(cfg):
  """(params -> loss, host params, batch) for a tiny config; params seeded, so equal
  across remat policies."""
  mcfg = model_lib.ModelConfig.from_config(cfg)
  graphdef = model_lib.abstract_model(mcfg)[0]
  batch = helpers.random_batch(cfg, segments=True)
  lm_loss = trainer.lm_loss_fn(z_loss=1e-4, use_segment_ids=True)
  return (lambda p: lm_loss(model_lib.merge(graphdef, p), batch)[0],
          helpers.random_params(mcfg), batch)


@pytest.mark.parametrize('family', ['llama', 'gpt2'])
def test_save_proj_gives_the_loss_and_gradients_of_no_remat(family):
  out = {}
  for remat in ('none', 'save_proj'):
    loss_fn, params, _ = loss_fn_of(helpers.tiny_config(family, remat=remat))
    out[remat] = jax.device_get(jax.jit(jax.value_and_grad(loss_fn))(params))
  (loss, grads), (ref_loss, ref_grads) = out['save_proj'], out['none']
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  # atol relative to the largest gradient: a bias's ~1e-7 entries are float32 rounding noise
  # of sums whose order XLA's fusion decides.
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads))
  for (path, g), ref in zip(flat, jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6 * scale,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize('family', ['llama', 'gpt2'])
def test_save_proj_keeps_the_projections_and_recomputes_the_mlp_hidden(family, capsys):
  cfg = helpers.tiny_config(family, scan=False, remat='save_proj')  # unrolled: names visible
  loss_fn, params, batch = loss_fn_of(cfg)
  jax.ad_checkpoint.print_saved_residuals(loss_fn, params)
  lines = capsys.readouterr().out.splitlines()
  named = [re.search(r"named '(\w+)'", line).group(1) for line in lines if 'named' in line]
  wanted = {'attn_q_proj', 'attn_k_proj', 'attn_v_proj', 'attn_out_proj', 'mlp_up_proj'}
  wanted |= {'mlp_gate_proj'} if family == 'llama' else set()
  assert sorted(named) == sorted(list(wanted) * cfg.model.n_layers), lines
  # Every saved activation as wide as the MLP is a named projection: the hidden (gelu /
  # silu product) is recomputed from them, and no (b, n, t, s) attention scores are kept.
  b, t, f = batch['inputs'].shape + (cfg.model.d_ff,)
  wide = [line for line in lines if f'[{b},{t},{f}]' in line]
  assert wide and all('named' in line for line in wide), wide
  assert not any(f'[{b},{cfg.model.n_heads},{t},{t}]' in line for line in lines), lines
