"""Stage 3, offline branch: direct preference optimisation (DPO, IPO or SimPO).

The policy learns from the comparisons themselves, with no reward model and no sampling
loop. It starts from the SFT checkpoint (WORKDIR/sft, or config.checkpoint.init_from) and
trains on the reward model's pairs: `config.dpo.data='embedded'` reads
WORKDIR/reward/comparisons*.jsonl (sampled and ranked here, into WORKDIR/dpo, when the
reward stage has not run), or the user's JSONL files in every format the reward stage
reads (pairwise, messages, HH, K-way rankings, groups, margins; the same bad-row and
long-row policies).

A reply is laid out as the reward model sees it (`data.reward.encode_reply`: prompt,
`<|assistant|>`, reply, `<|end|>` if it finished, `<|reward|>`), and its log-prob is
the sum over the tokens a policy generates: content and `<|end|>`, never the prompt, the
`<|assistant|>`, the `<|reward|>` or padding (`batch['reply_mask']`). The reference (the
SFT model) scores every pair once before training; its log-probs travel with the batches
and the reference is not held while the policy trains (SimPO needs none). Training is
the shared LM loop (resume, checkpoints, stop flag, metrics under TRL's names:
rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen,
logps/rejected). WORKDIR/dpo/eval.json: the held-out pairs' accuracy of the implicit
reward beta * (log pi - log pi_ref) beside the same metrics, and held-out greedy task
accuracy. What it leaves out: no online sampling (that is PPO / GRPO), no reference
model refreshed during training.
"""

from __future__ import annotations

import os

import numpy as np

from jaxgpt import config as config_lib
from jaxgpt import model as model_lib
from jaxgpt.data import reward as reward_data
from jaxgpt.data import tasks
from jaxgpt.evals import accuracy as evaluation
from jaxgpt.evals import pairwise
from jaxgpt.stages import common, preference_data
from jaxgpt.train import loop, trainer

NAME = 'dpo'
PREVIOUS = 'sft'


def reply_logps(model, batch):
  """For `pairwise.over_batches`: (b, 2) summed reply log-probs, (b, 2) reply lengths and
  the batch's reference log-probs (None before they exist)."""
  logps_b2, lengths_b2 = trainer.pair_logps_b2(model, batch)
  return {'logps': logps_b2, 'lengths': lengths_b2, 'ref': batch.get('ref_logp')}


def loss_fn(cfg) -> trainer.LossFn:
  """config.dpo's preference loss."""
  d = cfg.dpo
  return trainer.preference_loss_fn(d.loss, d.beta, d.label_smoothing, d.gamma, d.nll_coef)


def reference_fn(graphdef, params, mesh, rules):
  """local batch -> (B, 2) reply log-probs of the global batch under `params` (every
  process gets all rows): `make_reward_data`'s reference_fn."""
  def fn(local_batch):
    got, _ = pairwise.over_batches(reply_logps, graphdef, params, [local_batch], mesh, rules)
    return got['logps']
  return fn


def pair_data(cfg, tok, train, heldout, graphdef, sft_params, mesh, rules):
  """The DPO batches: pairs with reply masks and, unless the loss is reference-free, the
  SFT model's log-probs of every pair, computed here once."""
  reference = (None if cfg.dpo.loss == 'simpo' else
               reference_fn(graphdef, sft_params, mesh, rules))
  return reward_data.make_reward_data(cfg, tok, train, heldout, section=NAME, policy=True,
                                      reference_fn=reference, **common.process_info())


def run(cfg, workdir: str) -> loop.Result:
  mesh, mcfg = common.mesh_and_model(cfg)
  init_dir = common.init_dir(cfg, workdir, PREVIOUS)
  sft_params, tok = common.start_from(cfg, workdir, NAME, init_dir, mesh, mcfg,
                                      what=f'{NAME}: the SFT model')
  out_dir = loop.stage_dir(workdir, NAME)
  os.makedirs(out_dir, exist_ok=True)
  graphdef, _, _ = model_lib.abstract_model(mcfg)
  train, heldout, source_stats, _ = preference_data.comparisons_for(
      cfg, NAME, out_dir, graphdef, sft_params, mcfg, tok,
      reuse_dirs=(loop.stage_dir(workdir, 'reward'),))
  data = pair_data(cfg, tok, train, heldout, graphdef, sft_params, mesh, mcfg.rules)
  print(f'[{NAME}] data: {common.format_stats(data.stats)}', flush=True)

  t = config_lib.stage_train_config(cfg, NAME)
  mcfg, start = common.with_adapters(cfg, mesh, mcfg, sft_params)  # config.lora
  stage = loop.Stage(
      name=NAME, cfg=cfg, train_cfg=t, mcfg=mcfg, mesh=mesh, loss_fn=loss_fn(cfg), data=data,
      init_params=lambda: start,
      meta={'tokenizer': tok.path, 'init_from': init_dir, 'source_stats': source_stats,
            'config': cfg.to_json_best_effort()},
      count_tokens=lambda b: int(np.count_nonzero(b['segment_ids'])),
      seq_len=data.seq_len, perplexity=False)
  result = loop.train(stage, workdir)
  if common.evaluated_before(result, workdir, NAME):
    return result
  write_eval(cfg, workdir, tok, mcfg, result, data, mesh, source_stats)
  return result


def implicit_rewards(cfg, graphdef, params, batches, mesh, rules) -> np.ndarray:
  """(n, 2) implicit rewards of the real pairs of `batches`: beta (log pi - log pi_ref)
  (SimPO: beta times the per-token log-prob)."""
  got, weights = pairwise.over_batches(reply_logps, graphdef, params, batches, mesh, rules)
  if cfg.dpo.loss == 'simpo':
    rewards = got['logps'] / np.maximum(got['lengths'], 1)
  else:
    rewards = got['logps'] - got['ref']
  return (cfg.dpo.beta * rewards)[weights > 0]


def write_eval(cfg, workdir, tok, mcfg, result, data, mesh, source_stats) -> dict:
  """WORKDIR/dpo/eval.json and its summary line."""
  rules = mcfg.rules
  batches = data.val_batches(10 ** 6)
  report = {}
  if batches:
    rewards = implicit_rewards(cfg, result.graphdef, result.state['params'], batches, mesh,
                               rules)
    report['heldout_pairs'] = pairwise.pairwise_report(rewards, data.heldout[:len(rewards)])
    eval_step = trainer.make_eval_step(result.graphdef, loss_fn(cfg),
                                       result.shardings['params'], mesh, rules, list(batches[0]))
    report['heldout_metrics'] = loop.evaluate(eval_step, result.state['params'], batches,
                                              mesh, rules, perplexity=False)
  eval_set = tasks.heldout_eval_set(cfg.dpo.eval_per_task, seed=cfg.seed)
  report['dpo'] = evaluation.task_accuracy(result.graphdef, result.state['params'], mcfg, tok,
                                           'chat', eval_set, max_new_tokens=cfg.sft.eval_tokens,
                                           seed=cfg.seed)
  report['n_prompts'] = len(eval_set)
  report['comparison_source'] = source_stats

  def summary(path):
    held = report.get('heldout_pairs', {}).get('pairwise_accuracy')
    return (f'[{NAME}] held-out pairwise accuracy of the implicit reward '
            f'{"n/a" if held is None else f"{held:.1%}"} on '
            f'{report.get("heldout_pairs", {}).get("pairs", 0)} pairs; held-out greedy task '
            f'accuracy {report["dpo"]["accuracy"]:.1%}  ({path})')
  return common.write_eval(workdir, NAME, report, summary)
