"""The recipe's report: base / SFT / best-of-N / DPO / PPO / GRPO side by side on held-out
task prompts.

`write_report(cfg, workdir)` evaluates every model the workdir holds on
`tasks.heldout_eval_set(cfg.ppo.eval_per_task)` and writes WORKDIR/report.md (the table,
the talk's claims checked against it, sample answers), WORKDIR/report.json (the same
numbers) and WORKDIR/plots/*.png (loss curves of every stage, PPO's per-iteration
statistics). Missing stages are skipped and named. Columns: gold accuracy (task checkers)
of the greedy answer and of `cfg.ppo.report_samples` samples at T=1; the reward model's
mean score of those samples; KL to SFT (summed log p_model - log p_SFT over the reply,
from full forwards of the chat-format sequence; best-of-N: the bound log N - (N-1)/N);
entropy of the model's next-token distribution per reply token; distinct replies per
prompt; reply length. The sampler is the project's (`sampling.sample`); log-probs come
from a separate full forward, so their agreement with the sampler's is a self-check.
"""

from __future__ import annotations

import collections
import json
import math
import os

import jax
import numpy as np

from jaxgpt import sharding
from jaxgpt import model as model_lib
from jaxgpt.data import tasks
from jaxgpt.evals import accuracy as evaluation
from jaxgpt.evals import best_of_n as best_of_n_lib
from jaxgpt.evals import samples as samples_lib
from jaxgpt.evals import win_rate as win_rate_lib
from jaxgpt.inference import sampling, scoring
from jaxgpt.stages import PIPELINE, common

STAGES = PIPELINE
PPO_KEYS = ('scores', 'gold', 'kl', 'entropy', 'response_length')  # per RL iteration
RL_STAGES = ('ppo', 'ppo_checker', 'grpo')
LOSS_KEYS = ('loss', 'val_loss', 'policy_loss', 'value_loss')  # PPO logs the last two
SAMPLE_PROMPTS = 6
CURVE_N = 64  # best-of-n for n = 1, 2, ..., 64
# What the table lacks without a stage.
LOST = {'pretrain': 'no base rows', 'sft': 'no SFT or best-of-N row, no KL to SFT',
        'reward': 'no best-of-N row or curve, no RM scores', 'dpo': 'no DPO row',
        'ppo': 'no PPO row',
        'ppo_checker': 'no row for PPO with the checker reward', 'grpo': 'no GRPO row'}


def _mean(xs):
  xs = [x for x in xs if x is not None]
  return float(np.mean(xs)) if xs else None


def per_task_means(eval_set, values) -> dict:
  """{task: mean of `values` (one per eval_set example) over that task's examples}."""
  return {t: _mean([float(v) for e, v in zip(eval_set, values) if e.task == t])
          for t in sorted({e.task for e in eval_set})}


def summarise(name, eval_set, greedy, samples, k, *, scores=None, kl=None, kl_note='',
              entropies=(), logprob_gap=None, stage=None, step=None) -> dict:
  """One table row from greedy answers (one per prompt) and k samples per prompt, each
  sample (answer text, full reply text, length in tokens)."""
  right = [tasks.check(e, None, a) for e, a in zip(eval_set, greedy)]
  gold = [tasks.check(eval_set[i // k], None, a) for i, (a, _, _) in enumerate(samples)]
  # pass@k beside pass@1 (gold_sampled): RL that only sharpens raises the one, lowers the other
  passed = [any(gold[i:i + k]) for i in range(0, len(gold), k)]
  per_task = per_task_means(eval_set, right)
  replies = [s[1] for s in samples]
  tokens = np.concatenate(list(entropies)) if len(entropies) else np.zeros(0)
  return {'model': name, 'stage': stage, 'step': step, 'gold_greedy': _mean(right),
          'gold_sampled': _mean(gold), 'pass_sampled': _mean(passed),
          'rm_score': None if scores is None else _mean(scores),
          'kl_to_sft': kl, 'kl_note': kl_note,
          'entropy': float(tokens.mean()) if tokens.size else None,
          'distinct': _mean([len(set(replies[i:i + k])) for i in range(0, len(replies), k)]),
          'length': _mean([s[2] for s in samples]), 'per_task_greedy': per_task,
          'logprob_gap': logprob_gap, 'greedy_answers': list(greedy)}


def write_report(cfg, workdir: str) -> dict:
  """Evaluates every model present in `workdir`; writes report.md, report.json, plots/."""
  jax.config.update('jax_threefry_partitionable', True)
  mesh = sharding.make_mesh(cfg)
  eval_set = tasks.heldout_eval_set(cfg.ppo.eval_per_task, seed=cfg.seed)
  n_new, k = int(cfg.sft.eval_tokens), int(cfg.ppo.report_samples)
  lm_cfg = model_lib.ModelConfig.from_config(cfg)
  missing, rows, state = {}, [], {'tok': None}

  def load(stage, mcfg, key_path=('params',)):
    got = samples_lib.load_stage(workdir, stage, mcfg, mesh, key_path)
    if isinstance(got, str):
      missing[stage] = got
      return None
    state['tok'] = state['tok'] or common.recorded_tokenizer(cfg, workdir, got.meta, 'report')
    return got

  sft = load('sft', lm_cfg)
  rm = load('reward', model_lib.ModelConfig.for_stage(cfg, 'reward'))
  rm_len = cfg.reward.seq_len or cfg.data.seq_len
  questions = [[{'role': 'user', 'content': e.prompt}] for e in eval_set]

  def rm_scores(answers, finished, per_prompt):
    if rm is None:
      return None
    items = [(questions[i // per_prompt], a, f) for i, (a, f) in enumerate(zip(answers, finished))]
    return scoring.score_replies(rm.graphdef, rm.params, rm.mcfg, state['tok'], items,
                                 seq_len=rm_len).tolist()

  def evaluate(name, stage, m, mode, seed):
    tok = state['tok']
    prompts = evaluation.prompts_for(mode, tok, eval_set, shots=cfg.sft.few_shot, seed=cfg.seed)
    greedy = sampling.generate(m.graphdef, m.params, m.mcfg, tok, prompts,
                               max_new_tokens=n_new)
    rep = [p for p in prompts for _ in range(k)]
    drawn = samples_lib.draw(m, tok, rep, n_new=n_new, seed=seed)
    own = samples_lib.response_logprobs(m, rep, [ids for ids, _ in drawn])
    gap = max(float(np.abs(lp - f).max(initial=0)) for (_, lp), (f, _) in zip(drawn, own))
    texts, finished = zip(*[tok.chat.reply(ids) for ids, _ in drawn])
    answers = [evaluation.answer_text(mode, t) for t in texts]
    kl, note = None, 'n/a: asked as a document' if mode != 'chat' else 'n/a: no SFT model'
    if mode == 'chat' and sft is not None:
      ref = own if m is sft else samples_lib.response_logprobs(sft, rep, [ids for ids, _ in drawn])
      kl, note = _mean([float(np.sum(a - b)) for (a, _), (b, _) in zip(own, ref)]), 'exact'
    row = summarise(name, eval_set, [evaluation.answer_text(mode, g) for g, _ in greedy],
                    [(a, t, len(ids)) for a, t, (ids, _) in zip(answers, texts, drawn)], k,
                    scores=rm_scores(answers, finished, k), kl=kl, kl_note=note,
                    entropies=[e for _, e in own], logprob_gap=gap, stage=stage, step=m.step)
    row['greedy_finished'] = [f for _, f in greedy]
    return row

  base = load('pretrain', lm_cfg)
  if base is not None:
    rows.append(evaluate('base zero-shot', 'pretrain', base, 'zero_shot', cfg.seed + 11))
    rows.append(evaluate('base few-shot', 'pretrain', base, 'few_shot', cfg.seed + 12))
  del base
  curve = None
  if sft is not None:
    rows.append(evaluate('SFT', 'sft', sft, 'chat', cfg.seed + 13))
    if rm is not None:
      row, curve = best_of_n(cfg, sft, rm, state['tok'], eval_set, n_new, k, rm_len)
      rows.append(row)
  dpo = load('dpo', lm_cfg)
  if dpo is not None:
    rows.append(evaluate('DPO', 'dpo', dpo, 'chat', cfg.seed + 14 + PIPELINE.index('dpo')))
  del dpo
  for stage, name in rl_rows(cfg):
    m = load(stage, model_lib.ModelConfig.for_stage(cfg, stage), key_path=('policy', 'params'))
    if m is not None:
      rows.append(evaluate(name, stage, m, 'chat', cfg.seed + 14 + PIPELINE.index(stage)))
    del m
  report = {'workdir': os.path.abspath(workdir), 'n_prompts': len(eval_set),
            'per_task': int(cfg.ppo.eval_per_task), 'samples_per_prompt': k,
            'max_new_tokens': n_new, 'rows': rows, 'missing': missing,
            'win_rates': win_rates(rows, eval_set), 'best_of_n_curve': curve,
            'heldout_pairs': heldout_pairs(workdir),
            'claims': claims(rows, cfg, len(eval_set))}
  pick = sorted({int(i) for i in np.linspace(0, len(eval_set) - 1, SAMPLE_PROMPTS)})
  report['samples'] = [{'prompt': eval_set[i].prompt, 'gold': eval_set[i].answer,
                        **{r['model']: r['greedy_answers'][i] for r in rows}} for i in pick]
  if jax.process_index() == 0:
    report['plots'], report['not_plotted'] = write_plots(workdir, curve)
    with open(os.path.join(workdir, 'report.json'), 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=1)
    with open(os.path.join(workdir, 'report.md'), 'w', encoding='utf-8') as f:
      f.write(markdown(report))
  return report


def rl_rows(cfg) -> list[tuple[str, str]]:
  """(stage, table name) of the online-RL stages, the reward each was trained on in the name."""
  return [('ppo', 'PPO' if cfg.ppo.reward == 'model' else f'PPO ({cfg.ppo.reward})'),
          ('ppo_checker', 'PPO (checker)'), ('grpo', f'GRPO ({cfg.grpo.reward})')]


def best_of_n(cfg, sft, rm, tok, eval_set, n_new, k, rm_len) -> tuple[dict, dict]:
  """From one draw of max(CURVE_N, N * k) SFT samples per prompt at T=1: the best-of-N
  table row (N = max(config.reward.best_of), k picks per prompt, each the best of its own
  N) and the best-of-n curve: for n = 1, 2, 4, ..., CURVE_N the expected gold accuracy and
  RM score of the pick over every n-subset of all the samples, against the KL bound
  log n - (n-1)/n (Gao et al. 2022)."""
  n = max(int(x) for x in cfg.reward.best_of)
  got = best_of_n_lib.sample_scored(sft, rm, tok, eval_set, max(CURVE_N, n * k), n_new=n_new,
                                    seed=cfg.seed + 15, rm_len=rm_len)
  flat = best_of_n_lib.pick_best(got.scores_pn[:, :n * k], n).ravel()
  flat = flat // (n * k) * got.scores_pn.shape[1] + flat % (n * k)  # rows of the full draw
  own = samples_lib.response_logprobs(sft, [got.prompts[i] for i in flat],
                                      [got.ids[i] for i in flat])
  picks = [(got.texts[i], got.texts[i], len(got.ids[i])) for i in flat]
  row = summarise(f'best-of-{n}', eval_set, [picks[j * k][0] for j in range(len(eval_set))],
                  picks, k, scores=got.scores_pn.ravel()[flat].tolist(),
                  kl=best_of_n_lib.kl_bound(n), kl_note='analytic bound log N - (N-1)/N',
                  entropies=[e for _, e in own], stage='sft+reward')
  row['greedy_finished'] = [got.finished[flat[j * k]] for j in range(len(eval_set))]
  curve = {'n': [], 'kl_bound': [], 'gold': [], 'rm_score': [], 'pass': []}
  m = 1
  while m <= CURVE_N:
    curve['n'].append(m)
    curve['kl_bound'].append(best_of_n_lib.kl_bound(m))
    curve['gold'].append(float(best_of_n_lib.expected_best_of(got.gold_pn, got.scores_pn,
                                                              m).mean()))
    curve['rm_score'].append(float(best_of_n_lib.expected_best_of(got.scores_pn, got.scores_pn,
                                                                  m).mean()))
    # pass@n: the checker itself picks, the most any reranking (or RL that only sharpens
    # the SFT distribution) could get out of n samples
    curve['pass'].append(float(best_of_n_lib.expected_best_of(got.gold_pn, got.gold_pn,
                                                              m).mean()))
    m *= 2
  curve['pass_per_task'] = per_task_means(
      eval_set, best_of_n_lib.expected_best_of(got.gold_pn, got.gold_pn, CURVE_N))
  # maj@N: the most frequent of a prompt's N replies (first seen on a tie), checked: what
  # sharpening the sampled distribution onto its mode would answer
  n_all = curve['majority_of'] = got.gold_pn.shape[1]
  majority = [collections.Counter(got.texts[p * n_all:(p + 1) * n_all]).most_common(1)[0][0]
              for p in range(len(eval_set))]
  curve['majority_per_task'] = per_task_means(
      eval_set, [tasks.check(e, None, a) for e, a in zip(eval_set, majority)])
  return row, curve


def heldout_pairs(workdir: str) -> dict:
  """Held-out pairwise accuracy of the reward model's score and of DPO's implicit reward
  beta (log pi - log pi_ref), from the eval.json each stage wrote ({} without either)."""
  out = {}
  for stage, name in (('reward', 'reward model'), ('dpo', 'DPO implicit reward')):
    path = common.eval_path(workdir, stage)
    if os.path.exists(path):
      with open(path, encoding='utf-8') as f:
        held = json.load(f).get('heldout_pairs') or {}
      if held.get('pairwise_accuracy') is not None:
        out[name] = {k: held[k] for k in ('pairwise_accuracy', 'pairs', 'per_task')}
  return out


def win_rates(rows, eval_set) -> dict:
  """Per chat model row (other than SFT): the simulated labeler's verdicts of its greedy
  replies against SFT's, split by the key that decided each (see evals/win_rate.py)."""
  sft = next((r for r in rows if r['model'] == 'SFT'), None)
  if sft is None:
    return {}
  prompts = [e.prompt for e in eval_set]
  base = list(zip(sft['greedy_answers'], sft['greedy_finished']))
  return {r['model']: win_rate_lib.win_rate(
      prompts, list(zip(r['greedy_answers'], r.get('greedy_finished') or [True] * len(prompts))),
      base) for r in rows if r['stage'] not in ('pretrain', 'sft')}


# -- the talk's claims --------------------------------------------------------------------------

# (claim, row, compared with, column, the row should be higher)
CLAIMS = (
    ('A base model completes documents; a few-shot prompt gets answers out of it',
     'base few-shot', 'base zero-shot', 'gold_greedy', True),
    ('SFT turns the base model into an assistant that answers', 'SFT', 'base zero-shot',
     'gold_greedy', True),
    ('The reward model is useful: best-of-N beats plain SFT samples', 'best-of', 'SFT',
     'gold_sampled', True),
    ('PPO beats SFT on gold accuracy (greedy)', 'PPO', 'SFT', 'gold_greedy', True),
    ('PPO beats SFT on gold accuracy (samples at T=1)', 'PPO', 'SFT', 'gold_sampled', True),
    ('PPO raises the reward-model score', 'PPO', 'SFT', 'rm_score', True),
    ('RLHF lowers the entropy of the model', 'PPO', 'SFT', 'entropy', False),
    ('RLHF makes replies less diverse (fewer distinct samples)', 'PPO', 'SFT', 'distinct', False),
    ('A checkable reward helps: PPO with the checker beats SFT (greedy)', 'PPO (checker)', 'SFT',
     'gold_greedy', True),
    ('GRPO with the checker beats SFT on gold accuracy (greedy)', 'GRPO', 'SFT', 'gold_greedy',
     True),
    ('DPO on the same comparisons beats SFT on gold accuracy (greedy)', 'DPO', 'SFT',
     'gold_greedy', True),
)


def claims(rows, cfg, n_prompts: int) -> list[dict]:
  """Each claim of the talk checked against the table: holds / does not hold / not tested.
  Accuracy differences within two standard errors (over the prompts) are called noise."""
  def get(name, key):
    return next((r[key] for r in rows if r['model'].startswith(name)), None)

  out = []
  for text, a, b, key, higher in CLAIMS:
    va, vb = get(a, key), get(b, key)
    if va is None or vb is None:
      out.append({'claim': text, 'verdict': 'not tested', 'evidence': f'needs the {a} and {b} '
                  'rows' + (' and a reward model' if key == 'rm_score' else '')})
      continue
    show = '{:.1%}' if key.startswith('gold') else '{:.3f}'
    evidence = f'{key}: {a} {show.format(va)}, {b} {show.format(vb)}'
    if key.startswith('gold'):  # two standard errors of the difference
      noise = 2 * math.sqrt((va * (1 - va) + vb * (1 - vb)) / max(n_prompts, 1))
      if 0 < abs(va - vb) <= noise:
        evidence += f', within noise (±{noise:.1%} at {n_prompts} prompts)'
    verdict = 'holds' if (va > vb if higher else va < vb) else 'does not hold'
    out.append({'claim': text, 'verdict': verdict,
                'evidence': evidence + (', equal' if va == vb else '')})
  kl, target = get('PPO', 'kl_to_sft'), float(cfg.ppo.kl_target)
  verdict = 'not tested' if kl is None or target <= 0 else (
      'holds' if kl <= target else 'does not hold')
  evidence = ('needs the PPO and SFT rows' if kl is None else
              f'KL(PPO || SFT) {kl:.3f} nats per reply, '
              + (f'controller target {target:g}' if target > 0 else 'no target (fixed beta)'))
  out.append({'claim': 'The KL penalty keeps the PPO policy close to SFT', 'verdict': verdict,
              'evidence': evidence})
  return out


def _cell(text, width: int = 48) -> str:
  text = str(text).replace('\n', ' ⏎ ')
  text = text if len(text) <= width else text[:width - 1] + '…'
  return (text.replace('&', '&amp;').replace('<', '&lt;').replace('|', '\\|')
          or '*(empty)*')


def markdown(report: dict) -> str:
  k, rows = report['samples_per_prompt'], report['rows']
  columns = (('gold_greedy', 'gold acc. greedy', '{:.1%}'),
             ('gold_sampled', 'gold acc. T=1', '{:.1%}'),
             ('pass_sampled', f'pass@{k} T=1', '{:.1%}'), ('rm_score', 'RM score', '{:.3f}'),
             ('kl_to_sft', 'KL to SFT (nats)', '{:.3f}'),
             ('entropy', 'entropy (nats/token)', '{:.3f}'),
             ('distinct', f'distinct / {k}', '{:.2f}'), ('length', 'length (tokens)', '{:.1f}'))
  lines = [f'# State of GPT, reproduced: `{report["workdir"]}`', '',
           f'{report["n_prompts"]} held-out task prompts ({report["per_task"]} per task, none '
           f'seen in training); greedy answers and {k} samples per prompt at temperature 1, '
           f'up to {report["max_new_tokens"]} new tokens.', '',
           '| model | checkpoint | ' + ' | '.join(c[1] for c in columns) + ' |',
           '|---|---|' + '---:|' * len(columns)]
  for r in rows:
    cells = ['n/a' if r[key] is None else fmt.format(r[key]) for key, _, fmt in columns]
    where = f'{r["stage"]} @ {r["step"]}' if r['step'] is not None else r['stage']
    lines.append(f'| {r["model"]} | {where} | ' + ' | '.join(cells) + ' |')
  gaps = [r['logprob_gap'] for r in rows if r['logprob_gap'] is not None]
  lines += ['', '- Gold accuracy: task checkers on the answer (base rows: the first line of '
            'the completion, less an `A:` label, which is also what the RM scores). KL to SFT: '
            'mean over samples of the summed log p_model - log p_SFT over the reply, from full '
            'forwards of the chat-format sequence; base rows n/a (asked as documents); '
            'best-of-N: the analytic bound log N - (N-1)/N. Entropy: per reply token, of the '
            "model's own next-token distribution (best-of-N: the SFT model's, along the picks)."
            ' Length counts the stop token. pass@k: a prompt counts when any of its k samples '
            'is right; RL that only sharpens the SFT model raises T=1 accuracy and lowers pass@k.'
            ' best-of-N keeps, of N SFT samples at T=1, the one '
            'the RM scores highest; its greedy column is one such pick per prompt.']
  if gaps:
    lines.append(f'- Self-check: the sampler\'s log-probs and the full forward\'s agree within '
                 f'{max(gaps):.1e} nats per token.')
  for stage in (s for s in STAGES if s in report['missing']):
    lines.append(f'- **Not in this report**: {stage} ({report["missing"][stage]}): '
                 f'{LOST[stage]}.')
  lines += win_rate_lines(report.get('win_rates') or {})
  lines += pair_lines(report.get('heldout_pairs') or {})
  lines += curve_lines(report.get('best_of_n_curve'))
  tested = [c for c in report['claims'] if c['verdict'] != 'not tested']
  lines += ['', "## The talk's claims, checked", '',
            f'{sum(c["verdict"] == "holds" for c in tested)} of {len(tested)} testable claims '
            'hold on these numbers (point estimates; accuracy differences within two standard '
            'errors are marked as noise).', '']
  lines += [f'- {c["claim"]}: **{c["verdict"]}** ({c["evidence"]}).' for c in report['claims']]
  if rows:
    names = [r['model'] for r in rows]
    lines += ['', '## Sample answers (greedy)', '',
              '| prompt | gold | ' + ' | '.join(names) + ' |', '|---' * (len(names) + 2) + '|']
    for s in report['samples']:
      lines.append('| ' + ' | '.join(_cell(s[c]) for c in ['prompt', 'gold'] + names) + ' |')
  lines += ['', '## Plots', '']
  lines += [f'![{p}]({p})' for p in report.get('plots', [])]
  lines += [f'- {why}.' for why in report.get('not_plotted', [])]
  return '\n'.join(lines) + '\n'


def win_rate_lines(rates: dict) -> list[str]:
  """The labeler's win rate against SFT per model, split by the key that decided."""
  if not rates:
    return []
  keys = win_rate_lib.DECIDING_KEYS
  lines = ['', "## The labeler's verdict against SFT (greedy replies)", '',
           'Each held-out prompt\'s greedy reply against SFT\'s, judged by the simulated '
           'labeler: right first, then finished, then free of repetition, then shorter; '
           'ties count half. A win "by shorter" is a win between two equally right (or wrong) '
           'replies.', '',
           '| model | win rate | wins | losses | ties | ' +
           ' | '.join(f'wins / losses by {k}' for k in keys) + ' |',
           '|---|---:|---:|---:|---:|' + '---:|' * len(keys)]
  for name, r in rates.items():
    split = ' | '.join(f'{r["wins_by"][k]} / {r["losses_by"][k]}' for k in keys)
    lines.append(f'| {name} | {r["win_rate"]:.1%} | {r["wins"]} | {r["losses"]} | {r["ties"]} | '
                 f'{split} |')
  return lines


def pair_lines(held: dict) -> list[str]:
  """The held-out comparison pairs ranked by the reward model and by DPO's implicit reward."""
  if not held:
    return []
  tasks_ = sorted({t for v in held.values() for t in v['per_task']})
  lines = ['', '## Held-out comparison pairs', '',
           'The share of held-out pairs (labeler-ranked SFT samples of unseen task instances) '
           'each learner ranks as the labeler did: the reward model by its score, DPO by its '
           'implicit reward beta (log pi - log pi_ref).', '',
           '| ranked by | pairs | accuracy | ' + ' | '.join(tasks_) + ' |',
           '|---|---:|---:|' + '---:|' * len(tasks_)]
  for name, v in held.items():
    cells = ' | '.join('n/a' if v['per_task'].get(t) is None else f'{v["per_task"][t]:.1%}'
                       for t in tasks_)
    lines.append(f'| {name} | {v["pairs"]} | {v["pairwise_accuracy"]:.1%} | {cells} |')
  return lines


def curve_lines(curve) -> list[str]:
  if not curve:
    return []
  lines = ['', '## Best-of-n with the reward model', '',
           f'Of {curve["n"][-1]} SFT samples per prompt at T=1, the one the RM scores highest, '
           'averaged over every n-subset (unbiased); KL is the bound log n - (n-1)/n. Where '
           'the RM score keeps rising and gold accuracy does not, the RM is being '
           'over-optimised (Gao et al. 2022). pass@n: the task checker picks instead, the '
           'ceiling of any reranking of these samples (and of RL that only sharpens them). '
           'Plot: plots/best_of_n.png.', '',
           '| n | KL bound (nats) | RM score | gold accuracy | pass@n |',
           '|---:|---:|---:|---:|---:|']
  passes = curve.get('pass') or [None] * len(curve['n'])
  for n, kl, s, g, p in zip(curve['n'], curve['kl_bound'], curve['rm_score'], curve['gold'],
                            passes):
    lines.append(f'| {n} | {kl:.3f} | {s:.3f} | {g:.1%} | '
                 f'{"n/a" if p is None else format(p, ".1%")} |')
  for key, what in (('pass_per_task', f'pass@{curve["n"][-1]}'),
                    ('majority_per_task', f'maj@{curve.get("majority_of")} (the most frequent '
                                          f'of all {curve.get("majority_of")} replies)')):
    if curve.get(key):
      by_task = curve[key]
      lines += ['', f'{what}: {np.mean(list(by_task.values())):.1%}; per task ' + ', '.join(
          f'{t} {v:.1%}' for t, v in by_task.items()) + '.']
  return lines


def read_metrics(path: str) -> list[dict]:
  """The rows of a metrics.jsonl ([] if absent), less a last line cut short by a crash."""
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    lines = [l for l in f if l.strip()]
  return [json.loads(l) for l in lines if l.rstrip().endswith('}')]


def _series(rows, key):
  """(steps, values) of `key`, the last value logged at each step (a resumed run repeats)."""
  last = {int(r['step']): float(r[key]) for r in rows if key in r and 'step' in r}
  return sorted(last), [last[s] for s in sorted(last)]


def write_plots(workdir: str, curve=None) -> tuple[list[str], list[str]]:
  """plots/losses.png (a panel per stage), plots/<rl stage>.png (per iteration: RM score,
  gold accuracy of the rollouts, KL, ...) and plots/best_of_n.png (gold and RM score of
  best-of-n against its KL bound): (paths relative to workdir, what could not be plotted
  and why)."""
  # pylint: disable=import-outside-toplevel
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  os.makedirs(os.path.join(workdir, 'plots'), exist_ok=True)
  metrics = {s: read_metrics(os.path.join(workdir, s, 'metrics.jsonl')) for s in STAGES}
  written = []

  def figure(name, panels):
    if not panels:
      return
    fig = Figure(figsize=(4 * len(panels), 3.2))
    FigureCanvasAgg(fig)
    for ax, (title, rows, keys) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
      for key in keys:
        steps, values = _series(rows, key)
        if steps:
          ax.plot(steps, values, marker='.' if len(steps) < 30 else None, label=key)
      ax.set(title=title, xlabel='step')
      ax.xaxis.get_major_locator().set_params(integer=True)
      ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, 'plots', name), dpi=90)
    written.append(f'plots/{name}')

  losses_of = [s for s in STAGES if any(_series(metrics[s], k)[0] for k in LOSS_KEYS)]
  figure('losses.png', [(s, metrics[s], LOSS_KEYS) for s in losses_of])
  skipped = [f'no loss curve for {s} (no {s}/metrics.jsonl rows with a loss)'
             for s in STAGES if s not in losses_of]
  for stage in RL_STAGES:  # per iteration: the proxy (RM score) beside gold accuracy
    keys = [k for k in PPO_KEYS if _series(metrics[stage], k)[0]]
    figure(f'{stage}.png', [(f'{stage}: {k}', metrics[stage], (k,)) for k in keys])
    if not keys:
      skipped.append(f'no {stage} statistics (none of {", ".join(PPO_KEYS)} in '
                     f'{stage}/metrics.jsonl)')
  if curve:
    fig = Figure(figsize=(5, 3.4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(curve['kl_bound'], curve['gold'], marker='o', color='tab:green', label='gold accuracy')
    ax.set(xlabel='KL bound log n - (n-1)/n (nats)', ylabel='gold accuracy',
           title='best-of-n (SFT samples, RM picks)')
    for x, y, n in zip(curve['kl_bound'], curve['gold'], curve['n']):
      ax.annotate(str(n), (x, y), textcoords='offset points', xytext=(2, 4), fontsize=7)
    right = ax.twinx()
    right.plot(curve['kl_bound'], curve['rm_score'], marker='s', color='tab:blue',
               label='RM score')
    right.set(ylabel='RM score')
    fig.legend(loc='lower right', fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, 'plots', 'best_of_n.png'), dpi=90)
    written.append('plots/best_of_n.png')
  return written, skipped
