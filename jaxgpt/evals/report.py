"""The recipe's report: base / SFT / best-of-N / DPO / PPO / GRPO side by side on held-out
task prompts.

`write_report(cfg, workdir)` evaluates every model the workdir holds on
`tasks.heldout_eval_set(cfg.ppo.eval_per_task)` and writes WORKDIR/report.json (every
number), WORKDIR/report.md (`report_markdown`: a three-line summary, the tables with their
columns defined first, the talk's claims checked, example answers of every model) and
WORKDIR/plots/*.png (`plots`). Missing stages are skipped and named. It says on the console
what it is evaluating, model by model, and ends by naming the files it wrote.

Per model: gold accuracy (task checkers) of the greedy answer and of `cfg.ppo.report_samples`
samples at T=1, pass@k of those samples; the reward model's raw score of the greedy replies
and of the samples; KL to SFT (summed log p_model - log p_SFT over the reply, from full
forwards of the chat-format sequence); entropy of the model's next-token distribution per
reply token; distinct replies per prompt; reply length. Best-of-N has one figure, the
expectation over every N-subset of one draw of SFT samples (the same number as the best-of-n
curve's at N). The sampler is the project's (`sampling.sample`); log-probs come from a
separate full forward, so their agreement with the sampler's is a self-check.
"""

from __future__ import annotations

import collections
import json
import math
import os
import platform
import subprocess
import time

import jax
import numpy as np

from jaxgpt import config as config_lib
from jaxgpt import sharding
from jaxgpt import model as model_lib
from jaxgpt.data import tasks
from jaxgpt.evals import accuracy as evaluation
from jaxgpt.evals import best_of_n as best_of_n_lib
from jaxgpt.evals import plots
from jaxgpt.evals import report_markdown
from jaxgpt.evals import samples as samples_lib
from jaxgpt.evals import win_rate as win_rate_lib
from jaxgpt.inference import sampling, scoring
from jaxgpt.stages import PIPELINE, common

STAGES = PIPELINE
SAMPLE_PROMPTS = 6
CURVE_N = 64  # best-of-n for n = 1, 2, ..., 64
# Asked of every chat model, greedy, for the report's (and the README's) example answers.
EXAMPLE_QUESTIONS = ('Which number is greater, 17 or 71?', 'What is 12 + 34?',
                     "Is 'level' a palindrome?", "How many letters are in 'banana'?",
                     "Spell 'cat' backwards.", 'Hi, how are you?')
TIMES_FILE = 'times.json'  # WORKDIR/times.json: wall seconds per stage (jaxgpt.run writes it)
def say(line: str) -> None:
  """A console line of the report (process 0 only)."""
  if jax.process_index() == 0:
    print(f'[report] {line}', flush=True)


def read_times(workdir: str) -> dict:
  """{stage: wall seconds} from WORKDIR/times.json ({} without it)."""
  path = os.path.join(workdir, TIMES_FILE)
  if not os.path.exists(path):
    return {}
  with open(path, encoding='utf-8') as f:
    return json.load(f)


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


def write_report(cfg, workdir: str, config_file: str = '') -> dict:
  """Evaluates every model present in `workdir`; writes report.md, report.json, plots/.
  `config_file` (the experiment's path) only goes into the report's title."""
  jax.config.update('jax_threefry_partitionable', True)
  started = time.monotonic()
  mesh = sharding.make_mesh(cfg)
  eval_set = tasks.heldout_eval_set(cfg.ppo.eval_per_task, seed=cfg.seed)
  n_new, k = int(cfg.sft.eval_tokens), int(cfg.ppo.report_samples)
  lm_cfg = model_lib.ModelConfig.from_config(cfg)
  missing, rows, state = {}, [], {'tok': None}
  say(f'evaluating every model of {workdir} on {len(eval_set)} held-out task prompts (greedy '
      f'and {k} samples each at T=1), then best-of-n from SFT samples, then writing '
      'report.md and plots/')

  def load(stage, mcfg, key_path=('params',)):
    if stage == 'pretrain' and cfg.checkpoint.base:  # a published model, not pretrained here
      params, meta = common.params_from_checkpoint(cfg.checkpoint.base, mesh, mcfg,
                                                   what='report: config.checkpoint.base')
      got = samples_lib.StageModel(model_lib.abstract_model(mcfg)[0], params, mcfg, meta, 0)
    else:
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

  def evaluate(name, stage, m, mode, seed, start=None):
    """A table row of model `m` asked the `mode` way; KL to `start` (default: SFT). A
    few-shot row is greedy only: it measures a prompt, and its long prompts made the T=1
    samples the report's most expensive part on a real model."""
    start = start or sft
    clock, tok = time.monotonic(), state['tok']
    prompts = evaluation.prompts_for(mode, tok, eval_set, shots=cfg.sft.few_shot, seed=cfg.seed)
    # a chat model's example answers ride in the same greedy batch: one compilation, not two
    examples = example_prompts(tok) if mode == 'chat' else []
    greedy = sampling.generate(m.graphdef, m.params, m.mcfg, tok, prompts + examples,
                               max_new_tokens=n_new)
    greedy, example_replies = greedy[:len(prompts)], [text for text, _ in greedy[len(prompts):]]
    greedy_answers = [evaluation.answer_text(mode, g) for g, _ in greedy]
    if mode in FEW_SHOT_MODES:
      row = summarise(name, eval_set, greedy_answers, [], k, kl_note='n/a: greedy only',
                      stage=stage, step=m.step)
      row.update(rm_score_greedy=None, greedy_finished=[f for _, f in greedy])
      say(f'{name}: gold accuracy greedy {row["gold_greedy"]:.1%} '
          f'({time.monotonic() - clock:.0f} s)')
      return row
    rep = [p for p in prompts for _ in range(k)]
    drawn = samples_lib.draw(m, tok, rep, n_new=n_new, seed=seed, group=k)
    own = samples_lib.response_logprobs(m, rep, [ids for ids, _ in drawn], group=k)
    gap = max(float(np.abs(lp - f).max(initial=0)) for (_, lp), (f, _) in zip(drawn, own))
    texts, finished = zip(*[tok.chat.reply(ids) for ids, _ in drawn])
    answers = [evaluation.answer_text(mode, t) for t in texts]
    kl, note = None, 'n/a: asked as a document' if mode != 'chat' else 'n/a: no SFT model'
    if mode == 'chat' and start is not None:
      ref = own if m is start else samples_lib.response_logprobs(
          start, rep, [ids for ids, _ in drawn], group=k)
      kl = _mean([float(np.sum(a - b)) for (a, _), (b, _) in zip(own, ref)])
      note = 'exact' if start is sft else 'exact, to the model as shipped'
    row = summarise(name, eval_set, greedy_answers,
                    [(a, t, len(ids)) for a, t, (ids, _) in zip(answers, texts, drawn)], k,
                    scores=rm_scores(answers, finished, k), kl=kl, kl_note=note,
                    entropies=[e for _, e in own], logprob_gap=gap, stage=stage, step=m.step)
    greedy_scores = rm_scores(greedy_answers, [f for _, f in greedy], 1)
    row['rm_score_greedy'] = None if greedy_scores is None else _mean(greedy_scores)
    row['greedy_finished'] = [f for _, f in greedy]
    if mode == 'chat':
      row['examples'] = example_replies
    say(f'{name}: gold accuracy greedy {row["gold_greedy"]:.1%}, T=1 {row["gold_sampled"]:.1%} '
        f'({time.monotonic() - clock:.0f} s)')
    return row

  base = load('pretrain', lm_cfg)
  pretrain_samples = None
  if base is not None and cfg.checkpoint.base:  # an instruct model: asked in its own template
    rows.append(evaluate(SHIPPED, 'pretrain', base, 'chat', cfg.seed + 11, start=base))
    rows.append(evaluate(f'{SHIPPED} few-shot', 'pretrain', base, 'chat_few_shot', cfg.seed + 12,
                         start=base))
  elif base is not None:
    rows.append(evaluate('base zero-shot', 'pretrain', base, 'zero_shot', cfg.seed + 11))
    rows.append(evaluate('base few-shot', 'pretrain', base, 'few_shot', cfg.seed + 12))
    pretrain_samples = document_samples(cfg, base, state['tok'])
  curve = None
  if sft is not None:
    rows.append(evaluate('SFT', 'sft', sft, 'chat', cfg.seed + 13))
    if rm is not None:
      clock = time.monotonic()
      row, curve = best_of_n(cfg, sft, rm, state['tok'], eval_set, n_new, k, rm_len)
      rows.append(row)
      say(f'{row["model"]} and the best-of-n curve from {curve["majority_of"]} SFT samples a '
          f'prompt: gold accuracy {row["gold_sampled"]:.1%} ({time.monotonic() - clock:.0f} s)')
  dpo = load('dpo', lm_cfg)
  if dpo is not None:
    rows.append(evaluate('DPO', 'dpo', dpo, 'chat', cfg.seed + 14 + PIPELINE.index('dpo')))
  del dpo
  for stage, name in rl_rows(cfg):
    m = load(stage, model_lib.ModelConfig.for_stage(cfg, stage), key_path=('policy', 'params'))
    if m is not None:
      rows.append(evaluate(name, stage, m, 'chat', cfg.seed + 14 + PIPELINE.index(stage),
                           start=base if stage == 'grpo_base' else None))
    del m
  del base
  report = {'workdir': os.path.abspath(workdir), 'title': report_title(workdir, config_file),
            'n_prompts': len(eval_set), 'per_task': int(cfg.ppo.eval_per_task),
            'samples_per_prompt': k, 'max_new_tokens': n_new, 'rows': rows, 'missing': missing,
            'win_rates': win_rates(rows, eval_set), 'best_of_n_curve': curve,
            'heldout_pairs': heldout_pairs(workdir),
            'claims': claims(rows, cfg, len(eval_set)),
            'example_questions': list(EXAMPLE_QUESTIONS), 'pretrain_samples': pretrain_samples,
            'run': run_summary(cfg, rows, read_times(workdir))}
  pick = sorted({int(i) for i in np.linspace(0, len(eval_set) - 1, SAMPLE_PROMPTS)})
  report['samples'] = [{'prompt': eval_set[i].prompt, 'gold': eval_set[i].answer,
                        **{r['model']: r['greedy_answers'][i] for r in rows}} for i in pick]
  if jax.process_index() == 0:
    say('drawing the plots and writing report.md')
    report['plots'], report['not_plotted'] = plots.write_plots(workdir, curve)
    report['run']['report_seconds'] = round(time.monotonic() - started, 1)
    with open(os.path.join(workdir, 'report.json'), 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=1)
    with open(os.path.join(workdir, 'report.md'), 'w', encoding='utf-8') as f:
      f.write(report_markdown.markdown(report))
    tested = [c for c in report['claims'] if c['verdict'] != 'not tested']
    held = sum(c['verdict'] == 'holds' for c in tested)
    say(f'wrote {os.path.join(workdir, "report.md")} ({held} of {len(tested)} testable claims '
        f'hold) and {os.path.join(workdir, "report.json")}')
    say('plots: ' + ', '.join(os.path.join(workdir, p) for p in report['plots']))
  return report


SHIPPED = 'as shipped'  # the row of config.checkpoint.base's model, asked in its own template
FEW_SHOT_MODES = ('few_shot', 'chat_few_shot')


def report_title(workdir: str, config_file: str) -> str:
  """The report's title: the experiment file and the workdir's name, never an absolute path."""
  name = os.path.basename(os.path.normpath(workdir))
  what = f'`{config_file}`' if config_file else 'the recipe'
  return f'{what}, run `{name}`'


def example_prompts(tok) -> list[list[int]]:
  """EXAMPLE_QUESTIONS in the chat template, each a prompt for the model's reply."""
  return [tok.chat.prompt([{'role': 'user', 'content': q}]) for q in EXAMPLE_QUESTIONS]


def document_samples(cfg, base, tok) -> dict:
  """The base model's continuations of config.train.sample_prompts, drawn as the pretraining
  stage draws its samples (a document start, T=0.8, top-k 40)."""
  from jaxgpt.stages import pretrain  # pylint: disable=import-outside-toplevel
  sample = pretrain.text_sampler(tok, base.mcfg, list(cfg.train.sample_prompts),
                                 int(cfg.train.sample_tokens))
  return {'step': base.step, 'temperature': 0.8, 'top_k': 40,
          'rows': [{'prompt': p, 'completion': c} for p, c in sample(base.graphdef, base.params)]}


def run_summary(cfg, rows, times: dict) -> dict:
  """What the report's first lines say: the model, the data, the time, the devices."""
  m, t = cfg.model, cfg.train
  n_params = model_lib.count_params(
      model_lib.abstract_model(model_lib.ModelConfig.from_config(cfg))[1])
  seq = int(cfg.data.seq_len)
  return {'n_params': int(n_params), 'family': m.family, 'n_layers': int(m.n_layers),
          'd_model': int(m.d_model), 'n_heads': int(m.n_heads),
          'vocab_size': int(m.vocab_size),
          'pretrain_tokens': int(t.steps) * int(t.batch_size) * seq,
          'sft_tokens': int(cfg.sft.steps) * int(t.batch_size) * seq,
          'data_source': cfg.data.source, 'qa_share': float(cfg.data.qa_share),
          'sft_data': cfg.sft.data, 'reward_data': cfg.reward.data,
          'base': cfg.checkpoint.base, 'stages': list(times),
          'stage_seconds': {s: float(times[s]) for s in PIPELINE if s in times},
          'devices': f'{jax.device_count()} × {jax.devices()[0].device_kind}',
          'machine': machine(), 'date': time.strftime('%Y-%m-%d', time.gmtime()),
          'commit': commit(), 'models': [r['model'] for r in rows]}


def machine() -> str:
  """The host's CPU model and core count, e.g. 'AMD EPYC 9B14, 2 cores'."""
  name = ''
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      name = next((l.split(':', 1)[1].strip() for l in f if l.startswith('model name')), '')
  except OSError:
    pass
  return f'{name or platform.processor() or platform.machine()}, {os.cpu_count()} cores'


def commit() -> str | None:
  """The jaxgpt checkout's commit (short hash, '+changes' when its files differ), if any."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    head = subprocess.run(['git', '-C', root, 'rev-parse', '--short', 'HEAD'], capture_output=True,
                          text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(['git', '-C', root, 'status', '--porcelain', '--untracked-files=no'],
                           capture_output=True, text=True, timeout=10, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return head + ('+changes' if dirty else '')


def rl_rows(cfg) -> list[tuple[str, str]]:
  """(stage, table name) of the online-RL stages, the reward each was trained on in the name
  (GRPO from the pretrained / shipped model only when the recipe has it)."""
  rows = [('ppo', 'PPO' if cfg.ppo.reward == 'model' else f'PPO ({cfg.ppo.reward})'),
          ('ppo_checker', 'PPO (checker)'), ('grpo', f'GRPO ({cfg.grpo.reward})')]
  if 'grpo_base' in cfg.recipe:
    start = SHIPPED if cfg.checkpoint.base else 'base'
    reward = config_lib.with_grpo_base(cfg).grpo.reward
    rows.append(('grpo_base', f'GRPO from {start} ({reward})'))
  return rows


def best_of_n(cfg, sft, rm, tok, eval_set, n_new, k, rm_len) -> tuple[dict, dict]:
  """From one draw of max(CURVE_N, N * k) SFT samples per prompt at T=1: the best-of-N
  table row (N = max(config.reward.best_of); its accuracy and RM score the expectation over
  every N-subset, its entropy, length, diversity and win rate from k picks per prompt, each
  the best of its own N) and the best-of-n curve: for n = 1, 2, 4, ..., CURVE_N the expected
  gold accuracy and RM score of the pick over every n-subset of all the samples, against
  the KL bound log n - (n-1)/n (Gao et al. 2022)."""
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
  # One best-of-N figure: the expectation over every N-subset of the draw (the curve's value
  # at N), not the k picks' noisier mean; no greedy answer and no pass@k of its own.
  row['gold_sampled'] = float(best_of_n_lib.expected_best_of(got.gold_pn, got.scores_pn, n).mean())
  row['rm_score'] = float(best_of_n_lib.expected_best_of(got.scores_pn, got.scores_pn, n).mean())
  row['gold_greedy_pick'], row['gold_greedy'], row['pass_sampled'] = row['gold_greedy'], None, None
  row['population'] = f'{got.gold_pn.shape[1]} SFT samples a prompt'
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
  def replies(row):
    return list(zip(row['greedy_answers'], row.get('greedy_finished') or [True] * len(prompts)))
  prompts = [e.prompt for e in eval_set]
  sft = next((r for r in rows if r['model'] == 'SFT'), None)
  shipped = next((r for r in rows if r['model'] == SHIPPED), None)
  out = {}
  for r in rows:
    start = shipped if r['stage'] == 'grpo_base' or (r['stage'] == 'sft' and shipped) else sft
    if r['stage'] != 'pretrain' and start is not None and start is not r:
      out[r['model']] = win_rate_lib.win_rate(prompts, replies(r), replies(start))
      out[r['model']]['against'] = start['model']
  return out


# -- the talk's claims --------------------------------------------------------------------------

# (claim, row, compared with, column, the row should be higher, short name for the summary)
CLAIMS = (
    ('A base model completes documents; a few-shot prompt gets answers out of it',
     'base few-shot', 'base zero-shot', 'gold_greedy', True,
     'few-shot prompting helps a base model'),
    ('SFT turns the base model into an assistant that answers', 'SFT', 'base zero-shot',
     'gold_greedy', True, 'SFT makes an assistant'),
    ('The reward model is useful: best-of-N beats plain SFT samples', 'best-of', 'SFT',
     'gold_sampled', True, 'best-of-N beats SFT samples'),
    ('PPO beats SFT on gold accuracy (greedy)', 'PPO', 'SFT', 'gold_greedy', True,
     'PPO beats SFT (greedy)'),
    ('PPO beats SFT on gold accuracy (samples at T=1)', 'PPO', 'SFT', 'gold_sampled', True,
     'PPO beats SFT (T=1)'),
    ('PPO raises the reward-model score', 'PPO', 'SFT', 'rm_score', True,
     'PPO raises the RM score'),
    ('RLHF lowers the entropy of the model', 'PPO', 'SFT', 'entropy', False,
     'RLHF lowers entropy'),
    ('RLHF makes replies less diverse (fewer distinct samples)', 'PPO', 'SFT', 'distinct', False,
     'RLHF lowers diversity'),
    ('A checkable reward helps: PPO with the checker beats SFT (greedy)', 'PPO (checker)', 'SFT',
     'gold_greedy', True, 'PPO on the checker beats SFT'),
    ('GRPO with the checker beats SFT on gold accuracy (greedy)', 'GRPO', 'SFT', 'gold_greedy',
     True, 'GRPO beats SFT'),
    ('DPO on the same comparisons beats SFT on gold accuracy (greedy)', 'DPO', 'SFT',
     'gold_greedy', True, 'DPO beats SFT'),
)


SHIPPED_ALIASES = {'base zero-shot': SHIPPED, 'base few-shot': f'{SHIPPED} few-shot'}


def claims(rows, cfg, n_prompts: int) -> list[dict]:
  """Each claim of the talk checked against the table: holds / does not hold / not tested.
  Accuracy differences within two standard errors (over the prompts) are called noise."""
  def get(name, key):
    return next((r.get(key) for r in rows if r['model'] == name or
                 (name not in SHIPPED_ALIASES.values() and r['model'].startswith(name))), None)

  shipped = any(r['model'] == SHIPPED for r in rows)
  out = []
  for text, a, b, key, higher, short in CLAIMS:
    if shipped:  # an imported instruct model stands where a base model would
      a, b = SHIPPED_ALIASES.get(a, a), SHIPPED_ALIASES.get(b, b)
    va, vb = get(a, key), get(b, key)
    if va is None or vb is None:
      out.append({'claim': text, 'short': short, 'verdict': 'not tested',
                  'evidence': f'needs the {a} and {b} rows'
                  + (' and a reward model' if key == 'rm_score' else '')})
      continue
    show = '{:.1%}' if key.startswith('gold') else '{:.3f}'
    evidence = f'{key}: {a} {show.format(va)}, {b} {show.format(vb)}'
    if key.startswith('gold'):  # two standard errors of the difference
      noise = 2 * math.sqrt((va * (1 - va) + vb * (1 - vb)) / max(n_prompts, 1))
      if 0 < abs(va - vb) <= noise:
        evidence += f', within noise (±{noise:.1%} at {n_prompts} prompts)'
    verdict = 'holds' if (va > vb if higher else va < vb) else 'does not hold'
    out.append({'claim': text, 'short': short, 'verdict': verdict,
                'evidence': evidence + (', equal' if va == vb else '')})
  kl, target = get('PPO', 'kl_to_sft'), float(cfg.ppo.kl_target)
  verdict = 'not tested' if kl is None or target <= 0 else (
      'holds' if kl <= target else 'does not hold')
  evidence = ('needs the PPO and SFT rows' if kl is None else
              f'KL(PPO || SFT) {kl:.3f} nats per reply, '
              + (f'controller target {target:g}' if target > 0 else 'no target (fixed beta)'))
  out.append({'claim': 'The KL penalty keeps the PPO policy close to SFT',
              'short': 'the KL penalty holds PPO near SFT', 'verdict': verdict,
              'evidence': evidence})
  return out


