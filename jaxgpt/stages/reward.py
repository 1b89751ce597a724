"""Stage 3, the reward model: a scalar read at a `<|reward|>` token, trained on comparisons.

Starts from the SFT stage's final checkpoint (WORKDIR/sft, or config.checkpoint.init_from):
its trunk, no LM head, and a fresh scalar head. Comparisons are either the user's JSONL
(`config.reward.data`) or, by default, sampled the way the talk collects them: K
responses from the SFT model for each train-split task prompt, ranked by a simulated
labeler (`jaxgpt.data.comparisons`), written to WORKDIR/reward/comparisons.jsonl (and
comparisons_heldout.jsonl, from held-out task instances; the distinct held-out samples in
samples_heldout.jsonl) and reused on a re-run. A reply the sampler cut at
response_tokens keeps finished=False: it is trained on without `<|end|>`, as PPO scores it.

Loss: -log sigmoid(r_chosen - r_rejected - margin) per pair, a K-way ranking weighing as
one comparison set, plus an optional centering term. WORKDIR/reward/eval.json reports
pairwise accuracy, calibration, AUC and best-of-N.

Score stats. The final checkpoint's meta holds `score_stats` {mean, std, n}, which PPO
standardises rewards with: the mean and population standard deviation of the model's
scores over n distinct held-out SFT samples. Embedded data: every sample drawn for the
held-out prompts (those whose samples all tied and gave no pair too), stripped, empty
ones left out, each distinct (prompt, reply, finished) once. The user's files: the
distinct (prompt, reply, finished) sides of the kept held-out pairs. Each is scored once
in the training layout (`encode_reply`, the prompt cut from the left to the reward
seq_len; a reply that cannot fit at all is left out).
"""

from __future__ import annotations

import os
import time

import numpy as np

from jaxgpt import sharding
from jaxgpt import config as config_lib
from jaxgpt import model as model_lib
from jaxgpt.data import tasks
from jaxgpt.data import reward as reward_data
from jaxgpt.evals import best_of_n as best_of_n_lib
from jaxgpt.evals import pairwise
from jaxgpt.evals import samples as samples_lib
from jaxgpt.evals import accuracy as evaluation
from jaxgpt.inference import scoring
from jaxgpt.stages import common, preference_data
from jaxgpt.train import loop, trainer

NAME = 'reward'
PREVIOUS = 'sft'


# -- the stage --------------------------------------------------------------------------------


def score_stats(graphdef, params, mcfg, tok, samples, seq_len: int) -> dict:
  """{mean, std, n} of the scores of `samples`, each (prompt, reply, finished) scored once
  as trained (`encode_reply`, prompt cut from the left to seq_len; a reply that cannot
  fit is left out); {} with fewer than 2. std is the population standard deviation."""
  seqs = [ids for ids, _ in (reward_data.encode_reply(prompt, reply, tok, seq_len, 'truncate',
                                                      finished)
                             for prompt, reply, finished in samples) if ids is not None]
  if len(seqs) < 2:
    return {}
  scores = scoring.score_ids(graphdef, params, mcfg, seqs, pad_id=tok.pad_id)
  return {'mean': float(scores.mean()), 'std': float(scores.std()), 'n': len(seqs)}


def score_stats_fn(samples, tok, mcfg, seq_len: int):
  """final_meta hook: `score_stats` over the distinct held-out SFT samples `samples`."""
  def final_meta(graphdef, state):
    stats = score_stats(graphdef, state['params'], mcfg, tok, samples, seq_len)
    return {'score_stats': stats} if stats else {}
  return final_meta


def run(cfg, workdir: str) -> loop.Result:
  mesh = sharding.make_mesh(cfg)
  sft_mcfg = model_lib.ModelConfig.from_config(cfg)
  mcfg = model_lib.ModelConfig.for_stage(cfg, NAME)
  init_dir = common.init_dir(cfg, workdir, PREVIOUS)
  sft_params, tok = common.start_from(cfg, workdir, NAME, init_dir, mesh, sft_mcfg,
                                      what=f'{NAME}: the SFT model')
  out_dir = loop.stage_dir(workdir, NAME)
  os.makedirs(out_dir, exist_ok=True)
  sft_graphdef = model_lib.abstract_model(sft_mcfg)[0]
  train, heldout, source_stats, samples = preference_data.comparisons_for(
      cfg, NAME, out_dir, sft_graphdef, sft_params, sft_mcfg, tok)
  data = reward_data.make_reward_data(cfg, tok, train, heldout, **common.process_info())
  if samples is None:  # the user's pairs: their distinct held-out replies
    samples = preference_data.pair_sides(data.heldout)
  print(f'[{NAME}] data: {common.format_stats(data.stats)}', flush=True)

  t = config_lib.stage_train_config(cfg, NAME)
  # The SFT trunk (its arrays, not a second read of the checkpoint) and a fresh head.
  trunk = {k: v for k, v in sft_params.items() if k != 'lm_head'}
  trunk.update(common.fresh_entries(mesh, mcfg, ('scalar_head',), cfg.seed))
  del sft_params  # the LM head is not needed from here on
  mcfg, trunk = common.with_adapters(cfg, mesh, mcfg, trunk)  # config.lora: trunk frozen
  stage = loop.Stage(
      name=NAME, cfg=cfg, train_cfg=t, mcfg=mcfg, mesh=mesh,
      loss_fn=trainer.reward_loss_fn(cfg.reward.center), data=data, init_params=lambda: trunk,
      meta={'tokenizer': tok.path, 'init_from': init_dir, 'source_stats': source_stats,
            'config': cfg.to_json_best_effort()},
      count_tokens=lambda b: int(np.count_nonzero(b['segment_ids'])),
      seq_len=data.seq_len,
      final_meta=score_stats_fn(samples, tok, mcfg, data.seq_len), perplexity=False)
  result = loop.train(stage, workdir)
  if common.evaluated_before(result, workdir, NAME):
    return result
  write_eval(cfg, workdir, tok, mcfg, result.graphdef, result.state['params'], data, mesh,
             sft_graphdef, sft_mcfg, init_dir, source_stats)
  return result


# -- evaluation -------------------------------------------------------------------------------


def _auc(scores, labels) -> float | None:
  """P(score of an accepted reply > score of a rejected one), ties counting half."""
  pos, neg = scores[labels], scores[~labels]
  if not len(pos) or not len(neg):
    return None
  order = np.argsort(np.concatenate([pos, neg]), kind='stable')
  ranks = np.empty(len(order))
  ranks[order] = np.arange(1, len(order) + 1)
  allv = np.concatenate([pos, neg])
  for v in np.unique(allv):  # average ranks of ties
    same = allv == v
    ranks[same] = ranks[same].mean()
  return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def best_of_n(cfg, tok, rm, sft, eval_set, ns, seed) -> dict:
  """Gold accuracy of best-of-n SFT samples by RM score, for each n in `ns` (the expected
  pick over every n-subset of max(ns) samples per prompt), and the AUC of the score."""
  got = best_of_n_lib.sample_scored(sft, rm, tok, eval_set, max(ns),
                                    n_new=cfg.reward.response_tokens, seed=seed,
                                    rm_len=cfg.reward.seq_len or cfg.data.seq_len)
  task_names = np.array([e.task for e in eval_set])

  def per_task(x_p):
    return {t: float(x_p[task_names == t].mean()) for t in sorted(set(task_names))}

  out = {'auc_accepted': _auc(got.scores_pn.ravel(), got.gold_pn.ravel()),
         'sample_accuracy': float(got.gold_pn.mean()),
         'sample_accuracy_per_task': per_task(got.gold_pn.mean(axis=1)), 'best_of': {}}
  for n in ns:
    picked_p = best_of_n_lib.expected_best_of(got.gold_pn, got.scores_pn, n)
    out['best_of'][str(n)] = {'accuracy': float(picked_p.mean()), 'per_task': per_task(picked_p)}
  return out


def write_eval(cfg, workdir, tok, mcfg, graphdef, params, data, mesh, sft_graphdef, sft_mcfg,
               init_dir, source_stats) -> dict:
  """WORKDIR/reward/eval.json and its table on the console."""
  r = cfg.reward
  scores, weights = pairwise.over_batches(trainer.pair_scores_bt2, graphdef, params,
                                         data.val_batches(10 ** 6), mesh, mcfg.rules)
  scores = np.zeros((0, 2), np.float32) if scores is None else scores[weights > 0]
  report = {'heldout_pairs': pairwise.pairwise_report(scores, data.heldout[:len(scores)])}
  sft_params, _ = common.params_from_checkpoint(init_dir, mesh, sft_mcfg,
                                                what=f'{NAME}: the SFT model')
  eval_set = tasks.heldout_eval_set(r.eval_per_task, seed=cfg.seed)
  start = time.perf_counter()
  rm = samples_lib.StageModel(graphdef, params, mcfg, {}, 0)
  sft = samples_lib.StageModel(sft_graphdef, sft_params, sft_mcfg, {}, 0)
  report.update(best_of_n(cfg, tok, rm, sft, eval_set, tuple(int(n) for n in r.best_of),
                          seed=cfg.seed + 7))
  report['best_of_seconds'] = round(time.perf_counter() - start, 1)
  greedy = evaluation.task_accuracy(sft_graphdef, sft_params, sft_mcfg, tok, 'chat', eval_set,
                                    max_new_tokens=cfg.sft.eval_tokens, seed=cfg.seed)
  report['sft_greedy'] = greedy
  report['n_prompts'] = len(eval_set)
  report['comparison_source'] = source_stats
  return common.write_eval(workdir, NAME, report,
                           lambda path: format_table(report) + f'\n  ({path})')


def format_table(report) -> str:
  """The console / README table of eval.json."""
  held = report['heldout_pairs']
  acc = held['pairwise_accuracy']
  lines = [f'[{NAME}] held-out pairwise accuracy '
           f'{"n/a" if acc is None else f"{acc:.1%}"} on {held["pairs"]} pairs; '
           f'AUC of the score for "checker accepts" '
           f'{report["auc_accepted"] if report["auc_accepted"] is None else round(report["auc_accepted"], 3)}',
           f'  {"gold accuracy on " + str(report["n_prompts"]) + " held-out prompts":<44} accuracy',
           f'  {"SFT greedy":<44} {report["sft_greedy"]["accuracy"]:.1%}',
           f'  {"SFT sample (T=1), mean":<44} {report["sample_accuracy"]:.1%}']
  for n, v in report['best_of'].items():
    lines.append(f'  {"best-of-" + n + " by reward model":<44} {v["accuracy"]:.1%}')
  if report['best_of']:  # the report draws more samples: say whose figure this is
    lines.append(f'  (best-of-n over every n-subset of {max(map(int, report["best_of"]))} '
                 'samples a prompt; report.md gives the figure from more)')
  return '\n'.join(lines)
