"""The recipe's report on the smoke run: files, rows, ranges, the log-prob self-check and
the PPO checkpoint layout (a policy sub-tree restored alone)."""

import contextlib
import io
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from jaxgpt.stages import RECIPE
from jaxgpt import run as run_lib
from jaxgpt import sharding
from jaxgpt import model as model_lib
from jaxgpt.data import tasks
from jaxgpt.evals import plots, report, report_markdown
from jaxgpt.train import checkpoint as ckpt_lib

SAMPLES = 3
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def report_config():
  return helpers.smoke_config(**{'ppo.eval_per_task': 1, 'ppo.report_samples': SAMPLES})


def add_ppo_run(cfg, workdir):
  """A PPO checkpoint in the PPO stage's layout whose policy is the SFT model (so its KL
  to SFT is 0 and its greedy answers are SFT's), and per-iteration metrics."""
  mesh = sharding.make_mesh(cfg)
  _, target = model_lib.abstract_sharded_params(model_lib.ModelConfig.from_config(cfg), mesh)
  params, meta, _ = ckpt_lib.restore_latest_params(ckpt_lib.checkpoints_dir(workdir, 'sft'), target,
                                                   what='test')
  state = {'step': jnp.int32(2),
           'policy': {'params': params, 'opt_state': {'count': jnp.zeros((), jnp.int32)}},
           'value': {'params': {'w': jnp.ones((3,))}, 'opt_state': {}},
           'kl_coef': jnp.float32(0.05), 'rng': jax.random.key_data(jax.random.PRNGKey(0))}
  ckpt = ckpt_lib.Checkpointer(ckpt_lib.checkpoints_dir(workdir, 'ppo'), async_save=False)
  ckpt.save(2, state, meta=meta)
  ckpt.close()
  with open(os.path.join(workdir, 'ppo', 'metrics.jsonl'), 'w', encoding='utf-8') as f:
    for step in (1, 2):
      f.write(json.dumps({'step': step, 'loss': 1.0 / step, 'scores': 0.1 * step,
                          'kl': 0.5 * step, 'entropy': 2.0, 'response_length': 5.0}) + '\n')
  return params


def check_png(path):
  with open(path, 'rb') as f:
    assert f.read(8) == PNG_MAGIC, path
  import matplotlib.image  # pylint: disable=import-outside-toplevel
  assert matplotlib.image.imread(path).shape[0] > 100


def check_row(r, n_new):
  if r['model'].endswith('few-shot'):  # a prompt measured greedy only: no samples, no KL
    assert 0.0 <= r['gold_greedy'] <= 1.0, r
    assert all(r[key] is None for key in ('gold_sampled', 'pass_sampled', 'distinct', 'length',
                                          'entropy', 'kl_to_sft', 'rm_score')), r
    return
  best_of = r['model'].startswith('best-of-')  # no greedy reply, no pass@k of its own
  for key in ('gold_greedy', 'gold_sampled', 'pass_sampled'):
    if best_of and key != 'gold_sampled':
      assert r[key] is None, (r['model'], key)
      continue
    assert 0.0 <= r[key] <= 1.0, (r['model'], key, r[key])
  assert best_of or r['gold_sampled'] <= r['pass_sampled'], r
  assert 1.0 <= r['distinct'] <= SAMPLES, r
  assert 1.0 <= r['length'] <= n_new, r
  assert 0.0 <= r['entropy'] <= np.log(512) + 1e-4, r
  assert r['rm_score'] is None or np.isfinite(r['rm_score']), r


@pytest.fixture(scope='module')
def full_report(smoke_run, tmp_path_factory):
  """The report on a copy of the smoke run (files written there, not in the shared run),
  written by the same command again (every stage finished, so only the report runs), with
  what it printed."""
  workdir = str(tmp_path_factory.mktemp('report') / 'run')
  shutil.copytree(smoke_run[0], workdir)
  cfg = report_config()
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    run_lib.run(cfg, workdir, 'experiments/tiny.py')
  with open(os.path.join(workdir, 'report.json'), encoding='utf-8') as f:
    out = json.load(f)
  return cfg, workdir, out, printed.getvalue()


def test_report_rows_numbers_and_files(full_report):
  cfg, workdir, out, _ = full_report
  present = {s for s in RECIPE if os.path.isdir(ckpt_lib.checkpoints_dir(workdir, s))}
  assert {'pretrain', 'sft'} <= present, 'the smoke run has no pretrain or sft stage'
  best = f'best-of-{max(cfg.reward.best_of)}'
  names = (['base zero-shot', 'base few-shot', 'SFT'] + [best] * ('reward' in present)
           + ['DPO'] * ('dpo' in present) + ['PPO'] * ('ppo' in present) + ['PPO (checker)'] * ('ppo_checker' in present)
           + [f'GRPO ({cfg.grpo.reward})'] * ('grpo' in present))
  assert [r['model'] for r in out['rows']] == names
  assert set(out['missing']) == set(RECIPE) - present
  assert out['n_prompts'] == 8 and out['samples_per_prompt'] == SAMPLES
  rows = {r['model']: r for r in out['rows']}
  for r in out['rows']:
    check_row(r, cfg.sft.eval_tokens)
    assert (r['rm_score'] is None) == ('reward' not in present or 'few-shot' in r['model'])
  # Self-checks of the log-prob computation: the SFT model against itself, and the
  # sampler's log-probs against the full forward's.
  assert abs(rows['SFT']['kl_to_sft']) < 1e-3
  assert all(r['logprob_gap'] < 1e-3 for r in out['rows'] if r['logprob_gap'] is not None)
  assert rows['base zero-shot']['kl_to_sft'] is None
  if 'reward' in present:
    n = max(cfg.reward.best_of)
    assert rows[best]['kl_to_sft'] == pytest.approx(np.log(n) - (n - 1) / n)
  if 'ppo' in present:
    assert np.isfinite(rows['PPO']['kl_to_sft'])
  assert len(out['claims']) == len(report.CLAIMS) + 1
  # The labeler's verdicts against SFT, each split by the key that decided it.
  chat_rows = [n for n in names if n not in ('base zero-shot', 'base few-shot', 'SFT')]
  assert list(out['win_rates']) == chat_rows
  for r in out['win_rates'].values():
    assert r['wins'] + r['losses'] + r['ties'] == r['n'] == out['n_prompts']
    assert sum(r['wins_by'].values()) == r['wins'] and sum(r['losses_by'].values()) == r['losses']
    assert 0.0 <= r['win_rate'] <= 1.0
  if 'reward' in present:  # best-of-n for n = 1, 2, ..., 64 from one draw of 64 samples
    curve = out['best_of_n_curve']
    assert curve['n'] == [1, 2, 4, 8, 16, 32, 64] and curve['kl_bound'][0] == 0.0
    assert all(0.0 <= g <= 1.0 for g in curve['gold'])
    assert curve['rm_score'] == sorted(curve['rm_score'])  # the expected max rises with n
    # pass@n (the checker picks) rises with n, bounds the RM's pick and starts at its pick
    assert curve['pass'] == sorted(curve['pass'])
    assert curve['pass'][0] == pytest.approx(curve['gold'][0])  # n = 1: the mean either way
    assert all(p >= g for p, g in zip(curve['pass'], curve['gold']))
    by_task = curve['pass_per_task']  # pass@64 per task; tasks hold equal shares of prompts
    assert np.mean(list(by_task.values())) == pytest.approx(curve['pass'][-1])
    # a right majority reply is a right sample: maj@64 <= pass@64 on every task (this
    # config draws exactly 64 samples a prompt, so both count the same ones)
    assert curve['majority_of'] == 64
    assert all(curve['majority_per_task'][t] <= v for t, v in by_task.items())
    assert 'plots/best_of_n.png' in out['plots'] and '## Best-of-n' in open(
        os.path.join(workdir, 'report.md'), encoding='utf-8').read()
  assert {c['verdict'] for c in out['claims']} <= {'holds', 'does not hold', 'not tested'}
  assert 1 <= len(out['samples']) <= report.SAMPLE_PROMPTS

  with open(os.path.join(workdir, 'report.json'), encoding='utf-8') as f:
    assert [r['model'] for r in json.load(f)['rows']] == names
  with open(os.path.join(workdir, 'report.md'), encoding='utf-8') as f:
    md = f.read()
  for name in names:
    assert f'| {name} |' in md
  assert "## The talk's claims" in md and 'PPO beats SFT on gold accuracy' in md
  if {'reward', 'dpo'} <= present:  # the held-out pairs ranked by the RM and by DPO
    assert set(out['heldout_pairs']) == {'reward model', 'DPO implicit reward'}
    assert '## Held-out comparison pairs' in md
  assert out['plots'][0] == 'plots/losses.png'
  for p in out['plots']:
    check_png(os.path.join(workdir, p))
    assert f']({p})' in md


def test_report_sft_and_ppo_policy_subtree(smoke_run, tmp_path):
  """Only SFT and a PPO checkpoint (policy = the SFT model, in the PPO stage's state
  layout): missing stages are named, the policy sub-tree is restored alone, and its KL
  to SFT is 0."""
  workdir = str(tmp_path / 'run')
  os.makedirs(workdir)
  shutil.copytree(os.path.join(smoke_run[0], 'sft'), os.path.join(workdir, 'sft'))
  shutil.copy(os.path.join(smoke_run[0], 'tokenizer.model'), workdir)
  cfg = report_config()
  params = add_ppo_run(cfg, workdir)
  mesh = sharding.make_mesh(cfg)
  _, target = model_lib.abstract_sharded_params(model_lib.ModelConfig.from_config(cfg), mesh)
  restored = ckpt_lib.restore_subtree(ckpt_lib.checkpoints_dir(workdir, 'ppo'), 2, target,
                                      ('policy', 'params'))
  jax.tree.map(np.testing.assert_array_equal, restored, params)

  out = report.write_report(cfg, workdir)
  assert [r['model'] for r in out['rows']] == ['SFT', 'PPO']
  sft, ppo = out['rows']
  for r in out['rows']:
    check_row(r, cfg.sft.eval_tokens)
    assert r['rm_score'] is None
  assert abs(ppo['kl_to_sft']) < 1e-3 and ppo['greedy_answers'] == sft['greedy_answers']
  assert set(out['missing']) == {'pretrain', 'reward', 'dpo', 'ppo_checker', 'grpo'}
  verdicts = {c['claim']: c['verdict'] for c in out['claims']}
  assert verdicts['PPO raises the reward-model score'] == 'not tested'
  assert verdicts['PPO beats SFT on gold accuracy (greedy)'] != 'not tested'
  assert out['plots'] == ['plots/losses.png', 'plots/ppo.png']
  for p in out['plots']:
    check_png(os.path.join(workdir, p))
  with open(os.path.join(workdir, 'report.md'), encoding='utf-8') as f:
    md = f.read()
  assert 'Not in this report**: pretrain' in md and 'no loss curve for reward' in md


def test_summarise_pass_at_k_counts_prompts_with_any_right_sample():
  eval_set = tasks.heldout_eval_set(1)[:3]
  k = 4
  right_counts = (0, 1, 4)  # prompt i: the first right_counts[i] of its k samples are right
  samples = [(e.answer if j < n else 'no answer', 'reply', 3)
             for e, n in zip(eval_set, right_counts) for j in range(k)]
  row = report.summarise('m', eval_set, ['no answer'] * 3, samples, k)
  assert row['pass_sampled'] == pytest.approx(2 / 3)
  assert row['gold_sampled'] == pytest.approx(5 / 12)
  assert row['gold_greedy'] == 0.0


def test_summary_names_an_imported_base_and_only_the_data_of_stages_that_ran():
  run = {'base': 'gguf:smollm2-135m-instruct', 'stages': ['sft', 'grpo'], 'sft_data': 'tasks',
         'sft_tokens': 123_000, 'pretrain_tokens': 2_000_000, 'data_source': 'embedded',
         'qa_share': 0.0, 'reward_data': 'embedded'}
  data_line = report_markdown._data_line  # pylint: disable=protected-access
  assert data_line(run) == ('imported from `gguf:smollm2-135m-instruct` (not pretrained '
                            'here), fine-tuned on 123k tokens of train-split task examples')
  line = data_line(dict(run, base='', stages=['pretrain', 'sft', 'dpo']))
  assert line.startswith('pretrained on 2.0M tokens of the embedded corpus')
  assert line.endswith('reward model and DPO on labeler-ranked samples of the SFT model')


def test_claims_about_a_base_model_use_an_imported_models_rows():
  cfg = report_config()
  rows = [{'model': report.SHIPPED, 'gold_greedy': 0.025},
          {'model': f'{report.SHIPPED} few-shot', 'gold_greedy': 0.306},
          {'model': 'SFT', 'gold_greedy': 0.512}]
  got = {c['short']: c for c in report.claims(rows, cfg, 160)}
  assert got['SFT makes an assistant']['verdict'] == 'holds'
  assert got['SFT makes an assistant']['evidence'].startswith(
      f'gold_greedy: SFT 51.2%, {report.SHIPPED} 2.5%')
  assert got['few-shot prompting helps a base model']['verdict'] == 'holds'
  assert got['GRPO beats SFT']['verdict'] == 'not tested'


def test_report_explains_itself(full_report):
  """What a reader meets: the console names the report and the plots; report.md opens with a
  relative title and a three-line summary, defines its columns before the tables, names the
  population of every RM score, keeps one best-of-N figure, and quotes every chat model's
  example answers; the plots are grids a person can read; no stage left an empty file."""
  cfg, workdir, out, printed = full_report
  lines = [l for l in printed.splitlines() if l.strip()]
  assert lines[-1].startswith('[all] done. Read ') and 'report.md' in lines[-1]
  assert any(l.startswith('[report] wrote ') and l.rstrip().endswith('report.json')
             for l in lines[-4:])
  assert any(l.startswith('[report] plots: ') for l in lines[-4:])
  assert any(l.startswith('[report] SFT: gold accuracy greedy') for l in lines)

  with open(os.path.join(workdir, 'report.md'), encoding='utf-8') as f:
    md = f.read()
  head = md.splitlines()
  assert head[0] == '# Report: `experiments/tiny.py`, run `run`' and workdir not in md
  assert [l.split('**')[1] for l in head[2:5]] == ['Model and data.', 'Time.', 'What held.']
  assert 'parameter' in head[2] and ' tokens of the embedded corpus' in head[2]
  assert md.index('- **greedy**, **T=1**') < md.index('## Gold accuracy')
  assert md.index('- **RM score**') < md.index('## Reward-model score')
  assert 'over the greedy replies' in md and 'over the T=1 samples' in md
  rows = {r['model']: r for r in out['rows']}
  assert rows['SFT']['rm_score_greedy'] is not None
  best = next(r for r in out['rows'] if r['model'].startswith('best-of-'))
  n = max(cfg.reward.best_of)
  curve = out['best_of_n_curve']
  assert best['gold_sampled'] == pytest.approx(curve['gold'][curve['n'].index(n)])
  assert best['rm_score'] == pytest.approx(curve['rm_score'][curve['n'].index(n)])
  assert f'Of {curve["majority_of"]} SFT samples per prompt' in md
  chats = [r for r in out['rows'] if r['stage'] not in ('pretrain', 'sft+reward')]
  for r in chats:
    assert len(r['examples']) == len(report.EXAMPLE_QUESTIONS)
  assert '## Example answers' in md and report.EXAMPLE_QUESTIONS[1] in md
  assert [row['prompt'] for row in out['pretrain_samples']['rows']] == list(
      cfg.train.sample_prompts)
  assert out['run']['stage_seconds'] and out['run']['report_seconds'] > 0

  import matplotlib.image  # pylint: disable=import-outside-toplevel
  for p in out['plots']:
    height, width = matplotlib.image.imread(os.path.join(workdir, p)).shape[:2]
    assert width <= 1300 and width / height < 2.5, (p, width, height)

  empty = [os.path.relpath(os.path.join(d, f), workdir) for d, _, files in os.walk(workdir)
           for f in files if os.path.getsize(os.path.join(d, f)) == 0
           and 'checkpoints' not in os.path.relpath(d, workdir).split(os.sep)]
  assert not empty, empty


def documented_metric_keys() -> dict[str, set[str]]:
  """{stage: metric keys docs/reference/outputs.md lists for it} (a `val_<key>` row lets
  every documented key through with a val_ prefix, marked by the key 'val_<key>')."""
  path = os.path.join(helpers.ROOT, 'docs', 'reference', 'outputs.md')
  with open(path, encoding='utf-8') as f:
    text = f.read().split('## Metric keys', 1)[1]
  out = {s: set() for s in report.STAGES}
  for section in text.split('\n### ')[1:]:
    heading, body = section.split('\n', 1)
    keys = {k for row in re.findall(r'^\| (`[^|]+)\|', body, flags=re.M)
            for k in re.findall(r'`([^`]+)`', row)}
    for stage in heading.split(', '):
      out[stage.strip()] |= keys
  return out


def test_every_logged_metric_and_file_is_documented(full_report):
  """docs/reference/outputs.md lists every key each stage of the smoke run logs, and every
  file it writes."""
  _, workdir, _, _ = full_report
  documented = documented_metric_keys()
  for stage in RECIPE:  # the smoke run's stages (grpo_base is not in the default recipe)
    logged = set()
    for row in plots.read_metrics(os.path.join(workdir, stage, 'metrics.jsonl')):
      logged |= set(row)
    assert logged, stage
    docs = documented[stage]
    missing = {k for k in logged if k not in docs and not (
        k.startswith('val_') and 'val_<key>' in docs and k[4:] in docs)}
    assert not missing, f'{stage} logs {sorted(missing)}: add them to docs/reference/outputs.md'
  with open(os.path.join(helpers.ROOT, 'docs', 'reference', 'outputs.md'),
            encoding='utf-8') as f:
    files = f.read().split('## Metric keys')[0]
  for d, _, names in os.walk(workdir):
    rel = os.path.relpath(d, workdir).split(os.sep)
    if 'checkpoints' in rel or 'plots' in rel:
      continue
    for name in names:
      shown = 'events.out.tfevents.*' if name.startswith('events.out.tfevents.') else name
      assert f'{shown}`' in files or f'/{shown}' in files, (
          f'{os.path.join(*rel, name)} is not in docs/reference/outputs.md')


def test_sync_readme_copies_the_reports_tables(full_report, tmp_path):
  """tools/sync_readme.py fills a document's marked blocks with exactly what report.md shows."""
  _, workdir, out, _ = full_report
  sync = helpers.load_tool('sync_readme')
  doc = ('intro\n<!-- report:results -->\nold\n<!-- /report:results -->\nmiddle\n'
         '<!-- report:examples -->\n<!-- /report:examples -->\nend\n')
  new = sync.synced(doc, out, 'README.md')
  with open(os.path.join(workdir, 'report.md'), encoding='utf-8') as f:
    md = f.read()
  table = '\n'.join(report_markdown.headline_table(out))
  assert table in new and 'old' not in new and new.startswith('intro\n')
  assert '\n'.join(report_markdown.examples_table(out)) in new
  assert '\n'.join(report_markdown.examples_table(out)) in md
  assert sync.synced(new, out, 'README.md') == new  # idempotent
  with pytest.raises(ValueError, match='unknown block'):
    sync.synced('<!-- report:nope -->\n<!-- /report:nope -->', out, 'README.md')
