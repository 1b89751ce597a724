"""report.md from report.json's numbers: what a reader sees, in the order they need it.

A three-line summary (model and data, time, which of the talk's claims held) under a title
that names the experiment, not a path; every table's columns defined before the table; the
population behind every reward-model score named; example answers of every model. The
pieces the README quotes (`summary_lines`, `headline_table`, `examples_table`,
`document_samples`) are functions of their own, so `tools/sync_readme.py` copies exactly
what the report shows.
"""

from __future__ import annotations

import numpy as np

from jaxgpt.evals import win_rate as win_rate_lib
from jaxgpt.stages import PIPELINE

# What the tables lack without a stage.
LOST = {'pretrain': 'no base rows', 'sft': 'no SFT or best-of-N row, no KL to SFT',
        'reward': 'no best-of-N row or curve, no RM scores', 'dpo': 'no DPO row',
        'ppo': 'no PPO row',
        'ppo_checker': 'no row for PPO with the checker reward', 'grpo': 'no GRPO row'}


def _pct(x):
  return 'n/a' if x is None else f'{x:.1%}'


def _num(x, fmt='{:.3f}'):
  return 'n/a' if x is None else fmt.format(x)


def duration(seconds: float) -> str:
  """e.g. '18 min 38 s', '54 s', '1 h 02 min'."""
  s = int(round(seconds))
  if s >= 3600:
    return f'{s // 3600} h {s % 3600 // 60:02d} min'
  return f'{s // 60} min {s % 60:02d} s' if s >= 60 else f'{s} s'


def cell(text, width: int = 48) -> str:
  """A table cell: one line, at most `width` characters, Markdown and HTML escaped."""
  text = str(text).replace('\n', ' ⏎ ')
  text = text if len(text) <= width else text[:width - 1] + '…'
  return (text.replace('&', '&amp;').replace('<', '&lt;').replace('|', '\\|')
          or '*(empty)*')


def _data_line(run: dict) -> str:
  corpus = {'embedded': "the embedded corpus (Shakespeare's works"
                        + (f', {run["qa_share"]:.0%} Q/A pages)' if run['qa_share'] else ')'),
            'files': 'your files', 'tfds': 'a TFDS dataset'}.get(run['data_source'], 'its corpus')
  sft = {'embedded': 'the embedded chats and task examples',
         'tasks': 'train-split task examples'}.get(run['sft_data'], 'your chats')
  prefs = ("labeler-ranked samples of the SFT model" if run['reward_data'] == 'embedded'
           else 'your comparisons')
  start = (f'imported from `{run["base"]}` (not pretrained here)' if run.get('base') else
           f'pretrained on {tokens(run["pretrain_tokens"])} tokens of {corpus}')
  ran = run.get('stages') or ('reward', 'dpo')  # reports from before 'stages' was recorded
  prefs_line = (f'; reward model and DPO on {prefs}' if {'reward', 'dpo'} & set(ran) else '')
  return (f'{start}, fine-tuned on {tokens(run["sft_tokens"])} tokens of {sft}{prefs_line}')


def tokens(n: int) -> str:
  """e.g. '1.6M', '52k', '512'."""
  return f'{n / 1e6:.1f}M' if n >= 1e6 else f'{n / 1e3:.0f}k' if n >= 1e4 else f'{n:,}'


def summary_lines(report: dict) -> list[str]:
  """Three bullet lines: model and data, time, what held."""
  run = report['run']
  family = 'GPT-2-style' if run['family'] == 'gpt2' else 'LLaMA-style'
  model = (f'A {run["n_params"]:,}-parameter {family} '
           f'decoder ({run["n_layers"]} layers, width {run["d_model"]}, {run["n_heads"]} heads, '
           f'vocabulary {run["vocab_size"]:,})')
  times = run.get('stage_seconds') or {}
  spent = [f'{s} {duration(v)}' for s, v in times.items()]
  if run.get('report_seconds') is not None:
    spent.append(f'report {duration(run["report_seconds"])}')
  total = sum(times.values()) + (run.get('report_seconds') or 0)
  where = f'{run["machine"]} ({run["devices"]})' if run.get('machine') else run['devices']
  time_line = (f'{duration(total)} on {where}: ' + ', '.join(spent) if spent
               else f'on {where} (no WORKDIR/times.json: stage times unknown)')
  tested = [c for c in report['claims'] if c['verdict'] != 'not tested']
  held = [c['short'] for c in tested if c['verdict'] == 'holds']
  failed = [c['short'] for c in tested if c['verdict'] != 'holds']
  verdict = (f'{len(held)} of {len(tested)} testable claims of the talk'
             + (f': {"; ".join(held)}' if held else '')
             + (f'. Not: {"; ".join(failed)}' if failed else '') + '.')
  return [f'- **Model and data.** {model}, {_data_line(run)}.',
          f'- **Time.** {time_line}.',
          f'- **What held.** {verdict}']


def source_line(report: dict) -> list[str]:
  """Where the figures come from: the run, its date, commit and machine."""
  run = report.get('run') or {}
  bits = [f'run {report.get("title", "")}'.strip(), run.get('date'),
          run.get('commit') and f'commit {run["commit"]}', run.get('machine')]
  return [f'*Generated from `report.json` of {", ".join(b for b in bits if b)} by '
          '`tools/sync_readme.py`.*']


ACCURACY_COLUMNS = (
    ('gold_greedy', 'greedy', _pct),
    ('gold_sampled', 'T=1', _pct),
    ('pass_sampled', 'pass@{k}', _pct),
)
POLICY_COLUMNS = (
    ('rm_score_greedy', 'RM score, greedy', _num),
    ('rm_score', 'RM score, T=1', _num),
    ('kl_to_sft', 'KL to SFT (nats)', _num),
    ('entropy', 'entropy (nats/token)', _num),
    ('distinct', 'distinct / {k}', lambda x: _num(x, '{:.2f}')),
    ('length', 'length (tokens)', lambda x: _num(x, '{:.1f}')),
)


def _table(report, columns, first=('model', 'checkpoint')) -> list[str]:
  k = report['samples_per_prompt']
  heads = [h.format(k=k) for _, h, _ in columns]
  lines = ['| ' + ' | '.join(list(first) + heads) + ' |',
           '|---' * len(first) + '|' + '---:|' * len(columns)]
  for r in report['rows']:
    cells = [fmt(r.get(key)) for key, _, fmt in columns]
    lead = [r['model']]
    if 'checkpoint' in first:
      lead.append(f'{r["stage"]} @ {r["step"]}' if r['step'] is not None else r['stage'])
    lines.append('| ' + ' | '.join(lead + cells) + ' |')
  return lines


def headline_table(report: dict) -> list[str]:
  """The README's results table: accuracy, reward-model score of the samples, KL to SFT."""
  cols = ACCURACY_COLUMNS + (POLICY_COLUMNS[1], POLICY_COLUMNS[2])
  return _table(report, cols, first=('model',))


def column_notes(report: dict) -> list[str]:
  k, n = report['samples_per_prompt'], report['n_prompts']
  best = next((r for r in report['rows'] if r['model'].startswith('best-of-')), None)
  lines = ['Columns of the tables below:', '',
           f'- **greedy**, **T=1**: gold accuracy (the task checker on the answer) of the greedy '
           f'reply and of {k} samples at temperature 1, over the {n} prompts. Base rows are asked '
           'as documents (zero-shot: the bare question; few-shot: solved examples first) and '
           'answer with the first line of their completion.',
           f'- **pass@{k}**: a prompt counts when any of its {k} samples is right. RL that only '
           'sharpens the SFT model raises T=1 accuracy and lowers pass@k.',
           '- **RM score**: the reward model\'s raw score (not standardised) at the reply\'s '
           f'`<|reward|>` token, mean over the greedy replies ({n}), or over the T=1 samples '
           f'({n} × {k}). The RL stages\' console line and `eval.json` quote the greedy figure.',
           '- **KL to SFT**: mean over the samples of the summed log p_model − log p_SFT over the '
           'reply, from full forwards; base rows are n/a (asked as documents).',
           "- **entropy**: of the model's own next-token distribution, per reply token; "
           f'**distinct**: different replies among the {k} samples of a prompt; **length**: reply '
           'tokens, the stop token included.']
  if best is not None:
    lines.append(f'- **{best["model"]}**: of N SFT samples at T=1, the one the reward model '
                 f'scores highest. Its accuracy and RM score are the expectation over every '
                 f'N-subset of {best.get("population", "its draw")} (the best-of-n curve\'s value '
                 'at N; the reward stage\'s `eval.json` holds an earlier estimate from its own '
                 'samples); it has no greedy reply; its KL is the bound log N − (N−1)/N; entropy, '
                 f'distinct and length come from {k} picks a prompt, each the best of its own N.')
  return lines


def markdown(report: dict) -> str:
  k = report['samples_per_prompt']
  title = report.get('title') or 'the recipe'
  lines = [f'# Report: {title}', '']
  if report.get('run'):
    lines += summary_lines(report) + ['']
  lines += [f'{report["n_prompts"]} held-out task prompts ({report["per_task"]} per task, none '
            f'seen in training); greedy replies and {k} samples per prompt at temperature 1, '
            f'up to {report["max_new_tokens"]} new tokens.', '']
  lines += column_notes(report)
  lines += ['', '## Gold accuracy', ''] + _table(report, ACCURACY_COLUMNS)
  lines += ['', '## Reward-model score and the shape of the distribution', '']
  lines += _table(report, POLICY_COLUMNS)
  gaps = [r['logprob_gap'] for r in report['rows'] if r['logprob_gap'] is not None]
  if gaps:
    lines += ['', f'Self-check: the sampler\'s log-probs and the full forward\'s agree within '
                  f'{max(gaps):.1e} nats per token.']
  not_in = [s for s in PIPELINE if s in report['missing']]
  if not_in:
    lines.append('')
  for stage in not_in:
    lines.append(f'- **Not in this report**: {stage} ({report["missing"][stage]}): '
                 f'{LOST[stage]}.')
  lines += claim_lines(report)
  lines += example_lines(report)
  lines += win_rate_lines(report.get('win_rates') or {})
  lines += pair_lines(report.get('heldout_pairs') or {})
  lines += curve_lines(report.get('best_of_n_curve'))
  lines += heldout_sample_lines(report)
  lines += ['', '## Plots', '']
  lines += [f'![{p}]({p})' for p in report.get('plots', [])]
  lines += [f'- {why}.' for why in report.get('not_plotted', [])]
  return '\n'.join(lines) + '\n'


def claim_lines(report: dict) -> list[str]:
  tested = [c for c in report['claims'] if c['verdict'] != 'not tested']
  return (['', "## The talk's claims, checked", '',
           f'{sum(c["verdict"] == "holds" for c in tested)} of {len(tested)} testable claims '
           'hold on these numbers (point estimates; accuracy differences within two standard '
           'errors are marked as noise).', '']
          + [f'- {c["claim"]}: **{c["verdict"]}** ({c["evidence"]}).' for c in report['claims']])


def examples_table(report: dict) -> list[str]:
  """Every chat model's greedy reply to the fixed example questions."""
  chats = [r for r in report['rows'] if r.get('examples')]
  if not chats:
    return []
  lines = ['| question | ' + ' | '.join(r['model'] for r in chats) + ' |',
           '|---' * (len(chats) + 1) + '|']
  for i, q in enumerate(report.get('example_questions') or []):
    lines.append(f'| {cell(q)} | ' + ' | '.join(cell(r['examples'][i], 32) for r in chats)
                 + ' |')
  return lines


def document_samples(report: dict) -> list[str]:
  """The base model's continuations of the pretraining sample prompts, as a code block."""
  got = report.get('pretrain_samples')
  if not got:
    return []
  lines = ['```']
  for row in got['rows']:
    lines.append(f'{row["prompt"]} -> {row["completion"]}'.replace('```', "'''"))
  return lines + ['```']


def example_lines(report: dict) -> list[str]:
  table = examples_table(report)
  lines = []
  if table:
    lines += ['', '## Example answers', '',
              'Greedy replies of every chat model to the same questions (`python -m '
              'jaxgpt.cli.sample --workdir WORKDIR --stage STAGE --temperature 0 --prompt '
              '"..."` gives the same):', ''] + table
  docs = document_samples(report)
  if docs:
    got = report['pretrain_samples']
    lines += ['', f'The base model (step {got["step"]}) continuing documents, at temperature '
                  f'{got["temperature"]}, top-k {got["top_k"]}, as the pretraining stage samples:',
              ''] + docs
  return lines


def heldout_sample_lines(report: dict) -> list[str]:
  rows = report['rows']
  if not rows:
    return []
  names = [r['model'] for r in rows]
  lines = ['', '## Held-out prompts and their greedy answers', '',
           '| prompt | gold | ' + ' | '.join(names) + ' |', '|---' * (len(names) + 2) + '|']
  for s in report['samples']:
    lines.append('| ' + ' | '.join(cell(s[c]) for c in ['prompt', 'gold'] + names) + ' |')
  return lines


def win_rate_lines(rates: dict) -> list[str]:
  """The labeler's win rate of each model against the model it started from (SFT, or the
  model as shipped), split by the key that decided."""
  if not rates:
    return []
  keys = win_rate_lib.DECIDING_KEYS
  lines = ['', "## The labeler's verdict against each model's start (greedy replies)", '',
           'Each held-out prompt\'s greedy reply (best-of-N: one pick) against the greedy reply '
           'of the model it started from, judged by '
           'the simulated labeler: right first, then finished, then free of repetition, then '
           'shorter; ties count half. A win "by shorter" is a win between two equally right (or '
           'wrong) replies.', '',
           '| model | against | win rate | wins | losses | ties | ' +
           ' | '.join(f'wins / losses by {k}' for k in keys) + ' |',
           '|---|---|---:|---:|---:|---:|' + '---:|' * len(keys)]
  for name, r in rates.items():
    split = ' | '.join(f'{r["wins_by"][k]} / {r["losses_by"][k]}' for k in keys)
    lines.append(f'| {name} | {r.get("against", "SFT")} | {r["win_rate"]:.1%} | {r["wins"]} | '
                 f'{r["losses"]} | {r["ties"]} | {split} |')
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
    cells = ' | '.join(_pct(v['per_task'].get(t)) for t in tasks_)
    lines.append(f'| {name} | {v["pairs"]} | {v["pairwise_accuracy"]:.1%} | {cells} |')
  return lines


def curve_lines(curve) -> list[str]:
  if not curve:
    return []
  drawn = curve.get('majority_of') or curve['n'][-1]
  lines = ['', '## Best-of-n with the reward model', '',
           f'Of {drawn} SFT samples per prompt at T=1, the one the RM scores highest, averaged '
           'over every n-subset (unbiased); KL is the bound log n - (n-1)/n. Where the RM score '
           'keeps rising and gold accuracy does not, the RM is being over-optimised (Gao et al. '
           '2022). pass@n: the task checker picks instead, the ceiling of any reranking of these '
           'samples (and of RL that only sharpens them). Plot: plots/best_of_n.png.', '',
           '| n | KL bound (nats) | RM score of the pick | gold accuracy | pass@n |',
           '|---:|---:|---:|---:|---:|']
  passes = curve.get('pass') or [None] * len(curve['n'])
  for n, kl, s, g, p in zip(curve['n'], curve['kl_bound'], curve['rm_score'], curve['gold'],
                            passes):
    lines.append(f'| {n} | {kl:.3f} | {s:.3f} | {g:.1%} | {_pct(p)} |')
  for key, what in (('pass_per_task', f'pass@{curve["n"][-1]}'),
                    ('majority_per_task', f'maj@{drawn} (the most frequent of all {drawn} '
                                          'replies)')):
    if curve.get(key):
      by_task = curve[key]
      lines += ['', f'{what}: {np.mean(list(by_task.values())):.1%}; per task ' + ', '.join(
          f'{t} {v:.1%}' for t, v in by_task.items()) + '.']
  return lines
