"""The RL update's fast paths against the plain ones, on tiny random models: rows trimmed to
the batch's longest prompt + reply + readout, and the LM head run only over a window of the
longest reply's length, give the full layout's advantages, losses and updated parameters;
the epochs x minibatches scan (one compiled program) gives
what one jitted update per minibatch gives, on one device and on a sharded mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
import test_grpo
import test_ppo
from jaxgpt import model as model_lib
from jaxgpt import sharding
from jaxgpt.inference import sampling
from jaxgpt.rl import algo, rollout
from jaxgpt.rl import grpo as grpo_algo
from jaxgpt.rl import loop as rl_loop
from jaxgpt.rl import roles as roles_lib
from jaxgpt.train import loop

P, N = test_ppo.P, test_ppo.N


def short_rollout(rows, seed=0, group_size=1):
  """Prompts of 2..5 tokens in a width of P and replies of 0..3 tokens in a budget of N:
  the full layout is P + N + 1 = 17 wide, the longest row at most 5 + 3 + 1 = 9."""
  rng = np.random.default_rng(seed)
  prompts = rows // group_size
  prompt = np.zeros((prompts, P), np.int32)
  length = rng.integers(2, 6, (prompts,)).astype(np.int32)
  for i, n in enumerate(length):
    prompt[i, :n] = rng.integers(4, 256, n)
  prompt, length = np.repeat(prompt, group_size, 0), np.repeat(length, group_size)
  n_b = rng.integers(0, 4, (rows,)).astype(np.int32)
  finished = rng.random(rows) > 0.3
  tokens = rng.integers(4, 256, (rows, N)).astype(np.int32)
  tokens[np.arange(N)[None, :] >= n_b[:, None]] = test_ppo.TOK.pad_id
  ends = finished & (n_b > 0)
  tokens[np.flatnonzero(ends), n_b[ends] - 1] = test_ppo.TOK.end_of_turn_id
  mask = (np.arange(N)[None, :] < n_b[:, None]).astype(np.int32)
  out = sampling.SampleOutput(jnp.asarray(tokens), jnp.zeros((rows, N), jnp.float32),
                              jnp.asarray(mask), jnp.asarray(n_b), jnp.asarray(finished))
  host = rng.integers(0, 2, (rows,)).astype(np.float32)
  return rl_loop.Rollout(jnp.asarray(prompt), jnp.asarray(length), out, jnp.asarray(host),
                         jnp.asarray(host)), int((length + n_b).max()) + 1, int(n_b.max())


def fresh_state(s, section):
  """A second, identical iteration-0 state (the update programs donate theirs)."""
  params = {r: jax.tree.map(lambda x: jnp.array(x, copy=True), s.state[r]['params'])
            for r in s.algo.roles.trained()}
  return roles_lib.make_state(params, section, 0, s.algo.optimizers, s.algo.shardings, s.mesh)


def prepare_and_train(s, section, r, width, reply_width=None, group=1, **shared):
  """(batch, rollout metrics, per-update metrics, trained params) of rollout `r` laid out
  `width` wide (LM head over `reply_width` positions), then one iteration's epochs of
  minibatch updates (of whole groups of `group` rows). width 'full': every row P + N + 1
  wide, the LM head everywhere. `shared`: prepare's prefix_width."""
  state = fresh_state(s, section)
  trained = {k: state[k]['params'] for k in s.algo.roles.trained()}
  with jax.set_mesh(s.mesh):
    batch, metrics = s.algo.prepare(trained, s.frozen, jnp.float32(0.05), r,
                                    width=None if width == 'full' else width,
                                    reply_width=reply_width, **shared)
    if width == 'full':
      batch = dict(batch)
      del batch['window']
    state, per_update = s.algo.epochs(state, batch,
                                      rl_loop.minibatch_rows(section, 0, 0, group), None)
  return jax.device_get((batch, metrics, per_update,
                         {k: state[k]['params'] for k in s.algo.roles.trained()}))


def assert_trim_matches_full(s, section, r, used, longest_reply, per_token_keys, row_keys,
                             loss_keys):
  full = P + N + 1
  width = rl_loop.row_width(used, full)
  assert used <= width < full and longest_reply < N
  full_batch, full_m, full_u, full_p = prepare_and_train(s, section, r, 'full')
  for w, reply_width in ((used, longest_reply), (width, rl_loop.row_width(longest_reply, N)),
                         (None, None)):
    batch, m, u, params = prepare_and_train(s, section, r, w, reply_width)
    w = w or full
    assert batch['tokens'].shape[1] == w and batch['window'].shape[1] == (reply_width or N)
    np.testing.assert_array_equal(batch['tokens'], full_batch['tokens'][:, :w])
    np.testing.assert_array_equal(batch['mask'], full_batch['mask'][:, :w - 1])
    assert not full_batch['mask'][:, w - 1:].any()  # only padding was cut
    for k in per_token_keys:
      np.testing.assert_allclose(batch[k], full_batch[k][:, :w - 1], rtol=1e-5, atol=1e-6,
                                 err_msg=k)
    for k in row_keys:
      np.testing.assert_allclose(batch[k], full_batch[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for k in full_m:
      np.testing.assert_allclose(m[k], full_m[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for k in loss_keys:
      np.testing.assert_allclose(u[k], full_u[k], rtol=1e-4, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(full_p)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_trimmed_ppo_rows_give_the_full_width_losses_advantages_and_parameters():
  cfg = test_ppo.ppo_config()
  cfg.train.eps = 1e-6  # see test_ppo.one_update: Adam's eps against float-noise gradients
  s = test_ppo.Setup(cfg, jax.devices()[:1])
  r, used, longest_reply = short_rollout(cfg.ppo.rollout_batch)
  assert_trim_matches_full(s, cfg.ppo, r, used, longest_reply,
                           ('old_logp', 'old_values', 'returns', 'advantages'), (),
                           ('policy_loss', 'value_loss', 'clipfrac', 'ratio', 'approxkl'))


@pytest.mark.parametrize('advantage', ['grpo', 'dr_grpo'])
def test_trimmed_grpo_rows_give_the_full_width_losses_advantages_and_parameters(advantage):
  cfg = test_grpo.grpo_config(advantage=advantage)
  cfg.train.eps = 1e-6
  s = test_grpo.Setup(cfg, jax.devices()[:1])
  r, used, longest_reply = short_rollout(cfg.grpo.rollout_batch, group_size=test_grpo.K)
  assert_trim_matches_full(s, cfg.grpo, r, used, longest_reply, ('old_logp', 'ref_logp'),
                           ('advantages',),
                           ('policy_loss', 'kl_loss', 'clipfrac', 'ratio', 'approxkl'))


def test_row_width_rounds_up_to_few_widths_and_never_past_full():
  assert [rl_loop.row_width(u, 49) for u in (1, 8, 9, 33, 40, 41, 48, 49)] == [
      8, 8, 16, 40, 40, 48, 48, 49]
  assert rl_loop.row_width(17, 17) == 17


def scan_and_loop(setup_cls, config_fn, section_name, mesh_shape):
  """(scanned, looped) per-update metrics and final params of one iteration's updates on a
  random full-width batch."""
  cfg = config_fn(mesh_shape)
  cfg.train.eps = 1e-6
  s = setup_cls(cfg, helpers.devices_for(mesh_shape))
  section = cfg[section_name]
  rng = np.random.default_rng(5)
  b, w = section.rollout_batch, P + N + 1
  mask = (rng.random((b, w - 1)) > 0.4).astype(np.float32)
  batch = {'tokens': rng.integers(4, 256, (b, w)).astype(np.int32), 'mask': mask,
           'old_logp': (-5.5 + 0.1 * rng.standard_normal((b, w - 1))).astype(np.float32) * mask}
  if section_name == 'ppo':
    batch.update({k: rng.standard_normal((b, w - 1)).astype(np.float32) * mask
                  for k in ('old_values', 'advantages', 'returns')})
  else:
    batch['ref_logp'] = (-5.5 + 0.1 * rng.standard_normal((b, w - 1))).astype(np.float32) * mask
    batch['advantages'] = rng.standard_normal((b,)).astype(np.float32)
  rows = rl_loop.minibatch_rows(section, 0, 3)
  assert rows.shape == (section.epochs * b // section.batch_size, section.batch_size)
  out = []
  with jax.set_mesh(s.mesh):
    gbatch = loop.global_batch(batch, s.mesh, s.algo.roles.policy.rules)
    state, per_update = s.algo.epochs(fresh_state(s, section), gbatch, rows, None)
    out.append(jax.device_get((per_update, state['policy']['params'])))
    state, looped = fresh_state(s, section), []
    for rows_b in rows:
      state, m = s.algo.update(state, {k: v[rows_b] for k, v in batch.items()})
      looped.append(m)
    looped = jax.device_get(looped)
    out.append(({k: np.stack([m[k] for m in looped]) for k in looped[0]},
                jax.device_get(state['policy']['params'])))
  return out


@pytest.mark.parametrize('algo_name,mesh', [('ppo', (2, 2, 2)), ('grpo', (1, 2, 4))],
                         ids=lambda x: 'x'.join(map(str, x)) if isinstance(x, tuple) else x)
def test_epochs_scan_equals_one_update_per_minibatch(algo_name, mesh):
  """On one device and on the sharded mesh, the scan equals the loop; and the sharded scan
  equals one device's (one device's run computed once for both checks)."""
  mod = {'ppo': (test_ppo.Setup, test_ppo.ppo_config),
         'grpo': (test_grpo.Setup, test_grpo.grpo_config)}[algo_name]
  runs = {m: scan_and_loop(*mod, algo_name, m) for m in ((1, 1, 1), mesh)}
  for m, ((scanned, scanned_p), (looped, looped_p)) in runs.items():
    for k in ('policy_loss', 'clipfrac', 'ratio', 'policy_grad_norm'):
      np.testing.assert_allclose(scanned[k], looped[k], rtol=1e-4, atol=1e-6, err_msg=f'{m} {k}')
    for a, b in zip(jax.tree.leaves(scanned_p), jax.tree.leaves(looped_p)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=str(m))
  (scanned, scanned_p), _ = runs[mesh]
  (one, one_p), _ = runs[(1, 1, 1)]
  for k in ('policy_loss', 'clipfrac', 'ratio'):
    np.testing.assert_allclose(scanned[k], one[k], rtol=1e-4, atol=1e-6, err_msg=k)
  for a, b in zip(jax.tree.leaves(scanned_p), jax.tree.leaves(one_p)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_log_probs_over_the_reply_window_equal_the_full_ones():
  """The LM head at the reply window only: the same log-probs at every reply position, 0
  outside the window, the same entropy; any window at least the longest reply will do."""
  cfg = test_ppo.ppo_config()
  s = test_ppo.Setup(cfg, jax.devices()[:1])
  r, _, longest_reply = short_rollout(cfg.ppo.rollout_batch, seed=4)
  policy = model_lib.merge(s.graphdefs['policy'], s.state['policy']['params'])
  tokens_bw, mask_bt, _ = rollout.assemble(r.prompt_bp, r.length_b, r.out.tokens, r.out.lengths,
                                           test_ppo.TOK.reward_id, test_ppo.TOK.pad_id)
  full_logp_bt, full_logits_btv = rollout.log_probs(policy, tokens_bw, 0.7)
  full_entropy = algo.entropy_sum(full_logits_btv, mask_bt)
  for n in (longest_reply, rl_loop.row_width(longest_reply, N), N):
    window_bn = rollout.reply_window(mask_bt, n)
    logp_bt, logits_bnv = rollout.log_probs(policy, tokens_bw, 0.7, window_bn)
    assert logits_bnv.shape == (tokens_bw.shape[0], n, full_logits_btv.shape[-1])
    np.testing.assert_allclose(logp_bt * mask_bt, full_logp_bt * mask_bt, rtol=1e-5, atol=1e-6)
    t = np.arange(tokens_bw.shape[1] - 1)[None, :]
    outside = (t < window_bn[:, :1]) | (t > window_bn[:, -1:])
    assert not np.asarray(logp_bt)[outside].any()
    np.testing.assert_allclose(algo.entropy_sum(logits_bnv, rollout.in_window(mask_bt, window_bn)),
                               full_entropy, rtol=1e-5)


def shared_prompt_setup(mesh_shape, batch_size, share, lora_rank=0):
  cfg = test_grpo.grpo_config(mesh_shape, batch_size=batch_size, share_prompt=share)
  cfg.model.scan_layers = False  # the update's shared pass needs unrolled layers
  cfg.train.eps = 1e-6
  cfg.lora.rank = lora_rank
  return cfg, test_grpo.Setup(cfg, helpers.devices_for(mesh_shape))


@pytest.mark.parametrize('mesh,batch_size,lora_rank', [((1, 1, 1), 8, 0), ((2, 2, 2), 16, 0),
                                                       ((1, 1, 1), 8, 4)],
                         ids=['1x1x1', '2x2x2', 'lora'])
def test_each_groups_prompt_run_once_gives_the_whole_rows_batch_metrics_and_update(
    mesh, batch_size, lora_rank):
  """GRPO's scoring and update passes with each group's prompt run once (its keys and values
  copied to the group's K rows) give the log-probs, advantages, metrics, losses and updated
  parameters (so the gradients) of whole rows: full fine-tuning on one device and on the
  sharded mesh, and LoRA, whose adapters' gradients flow through the copied prefix."""
  runs = []
  for share in (False, True):
    cfg, s = shared_prompt_setup(mesh, batch_size, share, lora_rank)
    assert s.algo.share_prompt == share and s.algo.minibatch_group == (test_grpo.K if share else 1)
    r, used, longest_reply = short_rollout(cfg.grpo.rollout_batch, seed=6,
                                           group_size=test_grpo.K)
    shared = {'prefix_width': rl_loop.row_width(int(r.length_b.max()), P)} if share else {}
    runs.append(prepare_and_train(s, cfg.grpo, r, rl_loop.row_width(used, P + N + 1),
                                  rl_loop.row_width(longest_reply, N), group=test_grpo.K,
                                  **shared))
  (batch, m, u, params), (s_batch, s_m, s_u, s_params) = runs
  assert 'prefix' not in batch and s_batch['prefix'].shape == (16, 8)
  for k in ('old_logp', 'ref_logp', 'advantages'):
    np.testing.assert_allclose(s_batch[k], batch[k], rtol=1e-5, atol=2e-6, err_msg=k)
  for k in m:
    np.testing.assert_allclose(s_m[k], m[k], rtol=1e-5, atol=2e-6, err_msg=k)
  for k in ('policy_loss', 'kl_loss', 'ratio', 'approxkl', 'policy_grad_norm'):
    np.testing.assert_allclose(s_u[k], u[k], rtol=1e-4, atol=1e-6, err_msg=k)
  for a, b in zip(jax.tree.leaves(s_params), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_prompts_are_shared_only_where_they_divide_over_the_row_shards():
  """(scoring, update) sharing: groups must divide evenly over the row shards (4 on the
  (2, 2, 2) mesh), and the update needs whole groups per minibatch, one micro-batch and
  unrolled layers."""
  def shares(mesh=(1, 1, 1), scan=False, **fields):
    cfg = test_grpo.grpo_config(mesh, **fields)
    cfg.model.scan_layers = scan
    mcfg = model_lib.ModelConfig.from_config(cfg)
    return grpo_algo.shares_prompt(cfg.grpo, mcfg,
                                   sharding.make_mesh(cfg, helpers.devices_for(mesh)))

  assert shares() == (True, True)
  assert shares(share_prompt=False) == (False, False)
  assert shares(group_size=1, batch_size=8) == (False, False)
  assert shares(scan=True) == (True, False)
  assert shares(micro_batches=2) == (True, False)
  assert shares(batch_size=6) == (True, False)             # 6 rows: 1.5 groups
  assert shares((2, 2, 2)) == (True, False)                # 8 rows: 2 groups on 4 shards
  assert shares((2, 2, 2), batch_size=16) == (True, True)
  assert shares((2, 2, 2), rollout_batch=8, batch_size=8) == (False, False)


def test_minibatches_of_whole_groups_permute_groups():
  """minibatch_rows(group=K): each minibatch is whole groups of K consecutive rows, every
  epoch each row once; group=1 is the row permutation as before."""
  section = test_grpo.grpo_config().grpo  # 16 rows, minibatches of 8, 2 epochs, K = 4
  rows = rl_loop.minibatch_rows(section, 0, 1, group=4)
  assert rows.shape == (4, 8)
  for rows_b in rows:
    groups = rows_b.reshape(-1, 4)
    assert (groups == groups[:, :1] + np.arange(4)).all() and (groups[:, 0] % 4 == 0).all()
  for epoch in rows.reshape(2, 2, 8):
    assert sorted(epoch.ravel()) == list(range(16))
  assert len({tuple(rl_loop.minibatch_rows(section, 0, step, group=4)[0])
              for step in range(6)}) > 1  # drawn afresh each iteration
  np.testing.assert_array_equal(rl_loop.minibatch_rows(section, 0, 1, group=1),
                                rl_loop.minibatch_rows(section, 0, 1))
