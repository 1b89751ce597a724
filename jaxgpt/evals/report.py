"""The recipe's report: base / SFT / best-of-N / PPO side by side on held-out task prompts.

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

import json
import math
import os

import jax
import numpy as np

from jaxgpt import sharding
from jaxgpt import model as model_lib
from jaxgpt.data import chat, tasks
from jaxgpt.evals import accuracy as evaluation
from jaxgpt.evals import best_of_n as best_of_n_lib
from jaxgpt.evals import samples as samples_lib
from jaxgpt.inference import sampling, scoring
from jaxgpt.stages import PIPELINE, common

STAGES = PIPELINE
PPO_KEYS = ('scores', 'kl', 'entropy', 'response_length')
LOSS_KEYS = ('loss', 'val_loss', 'policy_loss', 'value_loss')  # PPO logs the last two
SAMPLE_PROMPTS = 6
# What the table lacks without a stage.
LOST = {'pretrain': 'no base rows', 'sft': 'no SFT or best-of-N row, no KL to SFT',
        'reward': 'no best-of-N row, no RM scores', 'ppo': 'no PPO row'}


def _mean(xs):
  xs = [x for x in xs if x is not None]
  return float(np.mean(xs)) if xs else None


def summarise(name, eval_set, greedy, samples, k, *, scores=None, kl=None, kl_note='',
              entropies=(), logprob_gap=None, stage=None, step=None) -> dict:
  """One table row from greedy answers (one per prompt) and k samples per prompt, each
  sample (answer text, full reply text, length in tokens)."""
  right = [tasks.check(e, None, a) for e, a in zip(eval_set, greedy)]
  gold = [tasks.check(eval_set[i // k], None, a) for i, (a, _, _) in enumerate(samples)]
  per_task = {t: _mean([r for e, r in zip(eval_set, right) if e.task == t])
              for t in sorted({e.task for e in eval_set})}
  replies = [s[1] for s in samples]
  tokens = np.concatenate(list(entropies)) if len(entropies) else np.zeros(0)
  return {'model': name, 'stage': stage, 'step': step, 'gold_greedy': _mean(right),
          'gold_sampled': _mean(gold), 'rm_score': None if scores is None else _mean(scores),
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

  def rm_scores(answers, per_prompt):
    if rm is None:
      return None
    items = [(questions[i // per_prompt], a) for i, a in enumerate(answers)]
    return scoring.score_replies(rm.graphdef, rm.params, rm.mcfg, state['tok'], items,
                                 seq_len=rm_len).tolist()

  def evaluate(name, stage, m, mode, seed):
    tok = state['tok']
    prompts = evaluation.prompts_for(mode, tok, eval_set, shots=cfg.sft.few_shot, seed=cfg.seed)
    greedy = sampling.generate_text(m.graphdef, m.params, m.mcfg, tok, prompts,
                                    max_new_tokens=n_new)
    rep = [p for p in prompts for _ in range(k)]
    drawn = samples_lib.draw(m, tok, rep, n_new=n_new, seed=seed)
    own = samples_lib.response_logprobs(m, rep, [ids for ids, _ in drawn])
    gap = max(float(np.abs(lp - f).max(initial=0)) for (_, lp), (f, _) in zip(drawn, own))
    texts = [chat.completion_text(ids, tok)[0] for ids, _ in drawn]
    answers = [evaluation.answer_text(mode, t) for t in texts]
    kl, note = None, 'n/a: asked as a document' if mode != 'chat' else 'n/a: no SFT model'
    if mode == 'chat' and sft is not None:
      ref = own if m is sft else samples_lib.response_logprobs(sft, rep, [ids for ids, _ in drawn])
      kl, note = _mean([float(np.sum(a - b)) for (a, _), (b, _) in zip(own, ref)]), 'exact'
    return summarise(name, eval_set, [evaluation.answer_text(mode, g) for g in greedy],
                     [(a, t, len(ids)) for a, t, (ids, _) in zip(answers, texts, drawn)], k,
                     scores=rm_scores(answers, k), kl=kl, kl_note=note,
                     entropies=[e for _, e in own], logprob_gap=gap, stage=stage, step=m.step)

  base = load('pretrain', lm_cfg)
  if base is not None:
    rows.append(evaluate('base zero-shot', 'pretrain', base, 'zero_shot', cfg.seed + 11))
    rows.append(evaluate('base few-shot', 'pretrain', base, 'few_shot', cfg.seed + 12))
  del base
  if sft is not None:
    rows.append(evaluate('SFT', 'sft', sft, 'chat', cfg.seed + 13))
    if rm is not None:
      rows.append(best_of_n(cfg, sft, rm, state['tok'], eval_set, n_new, k, rm_len))
  ppo = load('ppo', model_lib.ModelConfig.for_stage(cfg, 'ppo'), key_path=('policy', 'params'))
  if ppo is not None:
    rows.append(evaluate('PPO', 'ppo', ppo, 'chat', cfg.seed + 14))
  report = {'workdir': os.path.abspath(workdir), 'n_prompts': len(eval_set),
            'per_task': int(cfg.ppo.eval_per_task), 'samples_per_prompt': k,
            'max_new_tokens': n_new, 'rows': rows, 'missing': missing,
            'claims': claims(rows, cfg, len(eval_set))}
  pick = sorted({int(i) for i in np.linspace(0, len(eval_set) - 1, SAMPLE_PROMPTS)})
  report['samples'] = [{'prompt': eval_set[i].prompt, 'gold': eval_set[i].answer,
                        **{r['model']: r['greedy_answers'][i] for r in rows}} for i in pick]
  if jax.process_index() == 0:
    report['plots'], report['not_plotted'] = write_plots(workdir)
    with open(os.path.join(workdir, 'report.json'), 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=1)
    with open(os.path.join(workdir, 'report.md'), 'w', encoding='utf-8') as f:
      f.write(markdown(report))
  return report


def best_of_n(cfg, sft, rm, tok, eval_set, n_new, k, rm_len) -> dict:
  """k best-of-N picks per prompt: of N SFT samples at T=1, the one the RM scores highest."""
  n = max(int(x) for x in cfg.reward.best_of)
  got = best_of_n_lib.sample_scored(sft, rm, tok, eval_set, k * n, n_new=n_new,
                                    seed=cfg.seed + 15, rm_len=rm_len)
  flat = best_of_n_lib.pick_best(got.scores_pn, n).ravel()
  own = samples_lib.response_logprobs(sft, [got.prompts[i] for i in flat],
                                      [got.ids[i] for i in flat])
  picks = [(got.texts[i], got.texts[i], len(got.ids[i])) for i in flat]
  return summarise(f'best-of-{n}', eval_set, [picks[j * k][0] for j in range(len(eval_set))],
                   picks, k, scores=got.scores_pn.ravel()[flat].tolist(),
                   kl=best_of_n_lib.kl_bound(n), kl_note='analytic bound log N - (N-1)/N',
                   entropies=[e for _, e in own], stage='sft+reward')


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
  columns = (('gold_greedy', 'gold acc. greedy', '{:.1%}'), ('gold_sampled', 'gold acc. T=1',
             '{:.1%}'), ('rm_score', 'RM score', '{:.3f}'), ('kl_to_sft', 'KL to SFT (nats)',
             '{:.3f}'), ('entropy', 'entropy (nats/token)', '{:.3f}'),
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
            ' Length counts the stop token. best-of-N keeps, of N SFT samples at T=1, the one '
            'the RM scores highest; its greedy column is one such pick per prompt.']
  if gaps:
    lines.append(f'- Self-check: the sampler\'s log-probs and the full forward\'s agree within '
                 f'{max(gaps):.1e} nats per token.')
  for stage in (s for s in STAGES if s in report['missing']):
    lines.append(f'- **Not in this report**: {stage} ({report["missing"][stage]}): '
                 f'{LOST[stage]}.')
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


def write_plots(workdir: str) -> tuple[list[str], list[str]]:
  """plots/losses.png (a panel per stage) and plots/ppo.png: (paths relative to workdir,
  what could not be plotted and why)."""
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
  ppo_keys = [k for k in PPO_KEYS if _series(metrics['ppo'], k)[0]]
  figure('losses.png', [(s, metrics[s], LOSS_KEYS) for s in losses_of])
  figure('ppo.png', [(f'ppo: {k}', metrics['ppo'], (k,)) for k in ppo_keys])
  skipped = [f'no loss curve for {s} (no {s}/metrics.jsonl rows with a loss)'
             for s in STAGES if s not in losses_of]
  if not ppo_keys:
    skipped.append(f'no PPO statistics (none of {", ".join(PPO_KEYS)} in ppo/metrics.jsonl)')
  return written, skipped
