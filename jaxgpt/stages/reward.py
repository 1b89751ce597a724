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

import functools
import json
import os
import random
import time

import jax
import numpy as np

from jaxgpt import sharding
from jaxgpt import config as config_lib
from jaxgpt import model as model_lib
from jaxgpt.data import chat, comparisons, jsonl, tasks
from jaxgpt.data import reward as reward_data
from jaxgpt.evals import best_of_n as best_of_n_lib
from jaxgpt.evals import samples as samples_lib
from jaxgpt.evals import accuracy as evaluation
from jaxgpt.inference import sampling, scoring
from jaxgpt.stages import common
from jaxgpt.train import loop, metrics, trainer

NAME = 'reward'
PREVIOUS = 'sft'
COMPARISON_FILES = {'train': 'comparisons.jsonl', 'heldout': 'comparisons_heldout.jsonl'}
SAMPLES_FILE = 'samples_heldout.jsonl'  # the distinct held-out samples: score_stats' set
# |r_chosen - r_rejected| bucket edges for the calibration table.
CALIBRATION_EDGES = (0.0, 0.5, 1.0, 2.0, 4.0)


@functools.lru_cache(maxsize=4)
def _jitted_pair_scores(graphdef, mesh, rules):
  def fn(params, batch):
    scores_b2 = trainer.pair_scores_bt2(model_lib.merge(graphdef, params), batch)
    return scores_b2, batch['weight']
  # Replicated: every process gets the scores and weights of all rows of the global batch.
  return jax.jit(fn, out_shardings=sharding.replicated(mesh))


def scores_of_batches(graphdef, params, batches, mesh, rules) -> tuple[np.ndarray, np.ndarray]:
  """(scores (n, 2), weights (n,)) of every pair of the global batches whose local rows
  are `batches` (host numpy, the same on every process): row k*B + i of the result is
  global row i of batch k, so with `RewardData.val_batches` it is heldout[k*B + i]."""
  fn = _jitted_pair_scores(graphdef, mesh, rules)
  scores, weights = [], []
  with jax.set_mesh(mesh):
    for b in batches:
      got = jax.device_get(fn(params, loop.global_batch(b, mesh, rules)))
      scores.append(np.asarray(got[0]))
      weights.append(np.asarray(got[1]))
  if not scores:
    return np.zeros((0, 2), np.float32), np.zeros((0,), np.float32)
  return np.concatenate(scores), np.concatenate(weights)


# -- held-out samples (the set score_stats is over) ------------------------------------------


def distinct_samples(samples) -> list[tuple[tuple[dict, ...], str, bool]]:
  """The distinct (prompt messages, reply, finished) of `samples`, in first-seen order."""
  seen = {}
  for prompt, reply, finished in samples:
    key = (tuple((m['role'], m['content']) for m in prompt), reply, bool(finished))
    seen.setdefault(key, (tuple(prompt), reply, bool(finished)))
  return list(seen.values())


def pair_sides(pairs) -> list[tuple[tuple[dict, ...], str, bool]]:
  """The distinct replies of comparison pairs, as (prompt, reply, finished)."""
  return distinct_samples(side for c in pairs for side in (
      (c.prompt, c.chosen, c.chosen_finished), (c.prompt, c.rejected, c.rejected_finished)))


def write_samples(path, samples) -> None:
  """`{"prompt" | "messages", "response", "finished"}` rows, written atomically."""
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with open(tmp, 'w', encoding='utf-8') as f:
      for prompt, reply, finished in samples:
        single = len(prompt) == 1 and prompt[0]['role'] == 'user'
        row = ({'prompt': prompt[0]['content']} if single else
               {'messages': [{'role': m['role'], 'content': m['content']} for m in prompt]})
        row.update(response=reply, finished=finished)
        f.write(json.dumps(row, ensure_ascii=False) + '\n')
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _sample_row(obj, where):
  del where  # jsonl.read_rows puts it in front of the message
  if not isinstance(obj, dict):
    raise jsonl.BadRow('bad_type', f'expected a JSON object, got {type(obj).__name__}')
  prompt = jsonl.parse_prompt(obj)
  if not isinstance(obj.get('response'), str):
    raise jsonl.BadRow('bad_type', "'response' must be a string")
  if not isinstance(obj.get('finished'), bool):
    raise jsonl.BadRow('bad_finished', "'finished' must be true or false")
  return prompt, obj['response'], obj['finished']


def read_samples(path) -> list[tuple[tuple[dict, ...], str, bool]]:
  """The rows of `write_samples`; a malformed line fails naming it (`path:line:`)."""
  return jsonl.read_rows([path], _sample_row)[0]


# -- comparisons ------------------------------------------------------------------------------


def embedded_comparisons(cfg, out_dir, graphdef, sft_params, sft_mcfg, tok):
  """(train, heldout, stats, heldout_samples): SFT samples ranked by the simulated
  labeler, sampled once and kept in out_dir/comparisons*.jsonl (their counts and timings
  in comparisons_stats.json), and the distinct held-out samples, (prompt, reply,
  finished), in out_dir/samples_heldout.jsonl; a re-run reads the files back."""
  paths = {split: os.path.join(out_dir, name) for split, name in COMPARISON_FILES.items()}
  stats_path = os.path.join(out_dir, 'comparisons_stats.json')
  samples_path = os.path.join(out_dir, SAMPLES_FILE)
  if all(os.path.exists(p) for p in paths.values()):
    out = {split: comparisons.read_comparisons([p])[0] for split, p in paths.items()}
    print(f'[{NAME}] comparisons: reusing {paths["train"]} ({len(out["train"]):,} pairs) and '
          f'{paths["heldout"]} ({len(out["heldout"]):,})', flush=True)
    stats = {}
    if os.path.exists(stats_path):
      with open(stats_path, encoding='utf-8') as f:
        stats = json.load(f)
    if os.path.exists(samples_path):
      samples = read_samples(samples_path)
    else:  # files of an older version: cut replies in them read as finished
      samples = pair_sides(out['heldout'])
      print(f'[{NAME}] no {samples_path}: score_stats over the distinct replies of the '
            'held-out pairs; delete the comparison files to sample them again.', flush=True)
    return out['train'], out['heldout'], dict(stats, reused=1), samples
  r = cfg.reward
  stats = {}
  out, heldout_samples = {}, []
  for split, n_prompts in (('train', r.prompts), ('heldout', r.heldout_prompts)):
    start = time.perf_counter()
    examples = list({e.prompt: e for e in tasks.sample_examples(split, n_prompts,
                                                                seed=cfg.seed + 1)}.values())
    k = int(r.samples_per_prompt)
    per_sample = [e for e in examples for _ in range(k)]
    prompt_ids = [chat.render_prompt([{'role': 'user', 'content': e.prompt}], tok)
                  for e in per_sample]
    samples = sampling.generate(graphdef, sft_params, sft_mcfg, tok, prompt_ids,
                                max_new_tokens=r.response_tokens, temperature=1.0,
                                seed=cfg.seed + (split == 'heldout'), batch_size=1024)
    rng = random.Random(f'labeler|{split}|{cfg.seed}')
    pairs, no_pairs = [], 0
    for i, e in enumerate(examples):
      got = comparisons.comparisons_from_samples(e.prompt, e.task, samples[i * k:(i + 1) * k],
                                                 rng, r.flip_fraction, group=f'{split}-{i}',
                                                 tie_break=r.tie_break)
      no_pairs += not got
      pairs += got
    if split == 'heldout':  # as comparisons_from_samples keeps them: stripped, non-empty
      heldout_samples = distinct_samples(
          (({'role': 'user', 'content': e.prompt.strip()},), text.strip(), finished)
          for e, (text, finished) in zip(per_sample, samples) if text.strip())
    if jax.process_index() == 0:
      if split == 'heldout':  # before the file whose presence means "reuse"
        write_samples(samples_path, heldout_samples)
      comparisons.write_comparisons(paths[split], pairs)
    out[split] = pairs
    accepted = sum(tasks.check(e, None, text) for e, (text, _) in zip(per_sample, samples))
    stats.update({f'{split}_prompts': len(examples), f'{split}_no_pair_prompts': no_pairs,
                  f'{split}_pairs': len(pairs), f'{split}_sample_accuracy':
                  round(accepted / max(1, len(samples)), 4), f'{split}_finished':
                  round(sum(f for _, f in samples) / max(1, len(samples)), 4),
                  f'{split}_sampling_seconds': round(time.perf_counter() - start, 1)})
  stats['heldout_distinct_samples'] = len(heldout_samples)
  if jax.process_index() == 0:
    with open(stats_path, 'w', encoding='utf-8') as f:
      json.dump(stats, f, indent=1)
  print(f'[{NAME}] comparisons sampled from the SFT model ({k} per prompt, temperature 1) and '
        f'ranked by the simulated labeler: {common.format_stats(stats)} -> {paths["train"]}',
        flush=True)
  return out['train'], out['heldout'], stats, heldout_samples


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
  sft_params, sft_meta = common.params_from_checkpoint(init_dir, mesh, sft_mcfg,
                                                       what=f'{NAME}: the SFT model')
  tok = common.recorded_tokenizer(cfg, workdir, sft_meta, NAME)
  out_dir = loop.stage_dir(workdir, NAME)
  os.makedirs(out_dir, exist_ok=True)
  sft_graphdef = model_lib.abstract_model(sft_mcfg)[0]
  if cfg.reward.data == 'embedded':
    train, heldout, source_stats, samples = embedded_comparisons(cfg, out_dir, sft_graphdef,
                                                                 sft_params, sft_mcfg, tok)
  else:
    train, heldout, source_stats = reward_data.load_comparison_files(cfg)
    samples = None
  data = reward_data.make_reward_data(cfg, tok, train, heldout, **common.process_info())
  if samples is None:  # the user's pairs: their distinct held-out replies
    samples = pair_sides(data.heldout)
  print(f'[{NAME}] data: {common.format_stats(data.stats)}', flush=True)

  t = config_lib.stage_train_config(cfg, NAME)
  n_params = model_lib.count_params(model_lib.abstract_model(mcfg)[1])
  # The SFT trunk (its arrays, not a second read of the checkpoint) and a fresh head.
  trunk = {k: v for k, v in sft_params.items() if k != 'lm_head'}
  trunk.update(common.fresh_entries(mesh, mcfg, ('scalar_head',), cfg.seed))
  del sft_params  # the LM head is not needed from here on
  stage = loop.Stage(
      name=NAME, cfg=cfg, train_cfg=t, mcfg=mcfg, mesh=mesh,
      loss_fn=trainer.reward_loss_fn(cfg.reward.center), data=data, init_params=lambda: trunk,
      meta={'tokenizer': tok.path, 'init_from': init_dir, 'source_stats': source_stats,
            'config': cfg.to_json_best_effort()},
      count_tokens=lambda b: int(np.count_nonzero(b['segment_ids'])),
      flops_per_token=metrics.flops_per_token(mcfg, data.seq_len, n_params),
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
  scores, weights = scores_of_batches(graphdef, params, data.val_batches(10 ** 6), mesh,
                                      mcfg.rules)
  scores = scores[weights > 0]
  report = {'heldout_pairs': pairwise_report(scores, data.heldout[:len(scores)])}
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
  return '\n'.join(lines)
