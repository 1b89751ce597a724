"""Loss functions against values worked out by hand."""

import math

import jax.numpy as jnp
import numpy as np

import helpers
from jaxgpt import losses
from jaxgpt import model as model_lib

from jaxgpt.data.tokenizer import train_tokenizer
from jaxgpt.train import trainer


def test_masked_cross_entropy_equals_hand_computed_value():
  # Two positions; vocabulary of 3. Position 0 is masked out.
  logits = jnp.array([[[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]]])
  targets = jnp.array([[1, 2]])
  weights = jnp.array([[0.0, 1.0]])
  loss_sum, nll_sum = losses.masked_lm_loss_sum(logits, targets, weights)
  # -log softmax([1, 2, 3])[2] = log(e + e^2 + e^3) - 3
  expected = math.log(math.e + math.e ** 2 + math.e ** 3) - 3
  assert math.isclose(float(nll_sum), expected, rel_tol=1e-6)
  assert math.isclose(float(loss_sum), expected, rel_tol=1e-6)
  # z-loss adds z * logsumexp^2 on the weighted position only.
  z = 1e-2
  loss_sum, _ = losses.masked_lm_loss_sum(logits, targets, weights, z_loss=z)
  lse = math.log(math.e + math.e ** 2 + math.e ** 3)
  assert math.isclose(float(loss_sum), expected + z * lse ** 2, rel_tol=1e-6)


def test_token_log_probs():
  logits = jnp.array([[[math.log(1.0), math.log(3.0)]]])
  np.testing.assert_allclose(losses.token_log_probs(logits, jnp.array([[1]])),
                             [[math.log(0.75)]], rtol=1e-6)


def test_sft_loss_counts_only_assistant_tokens_over_the_whole_step(tmp_path):
  """The SFT step's loss is the mean over assistant targets of all micro-batches."""
  tok = train_tokenizer(['hello there, how are you? fine thanks. ' * 50],
                        str(tmp_path / 'tok.model'), 300)
  convo = [{'role': 'user', 'content': 'hello there'},
           {'role': 'assistant', 'content': 'fine thanks'},
           {'role': 'user', 'content': 'how are you?'},
           {'role': 'assistant', 'content': 'fine'}]
  ids, mask = tok.chat.render(convo)
  t = len(ids) - 1
  cfg = helpers.tiny_config(batch_size=2, seq_len=t, vocab=tok.vocab_size,
                            micro_batches=2)
  cfg.model.max_seq_len = max(cfg.model.max_seq_len, t)
  mcfg = model_lib.ModelConfig.from_config(cfg)
  graphdef, _, _ = model_lib.abstract_model(mcfg)
  params = helpers.random_params(mcfg, seed=0, std=0.5)
  inputs = np.array([ids[:-1], ids[:-1]], np.int32)
  targets = np.array([ids[1:], ids[1:]], np.int32)
  weights = np.array([mask[1:], [0] * (t - 4) + mask[-4:]], np.float32)  # row 2: last turn only
  batch = {'inputs': inputs, 'targets': targets, 'weights': weights,
           'segment_ids': np.ones_like(inputs), 'positions': np.tile(np.arange(t), (2, 1))}

  logits = np.asarray(model_lib.merge(graphdef, params)(inputs), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  expected = (nll * weights).sum() / weights.sum()

  loss_fn = trainer.lm_loss_fn()
  grad_fn = trainer.make_grad_fn(graphdef, loss_fn, 2, mcfg.rules)
  _, sums = grad_fn(params, batch)
  assert float(sums['weight']) == weights.sum()
  np.testing.assert_allclose(float(sums['loss']) / float(sums['weight']), expected, rtol=1e-5)
