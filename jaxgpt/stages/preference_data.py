"""Comparison pairs for the preference stages (the reward model, DPO), from one place.

Embedded: SFT samples ranked by the simulated labeler (`embedded_comparisons`), sampled
once into a stage directory's comparisons.jsonl / comparisons_heldout.jsonl (with the
distinct held-out samples in samples_heldout.jsonl) and read back on a re-run; DPO reads
the reward stage's files when they are there, so both learn from the same pairs. Or the
user's JSONL files (`config.<stage>.data`, `jaxgpt.data.reward.load_comparison_files`).
"""

from __future__ import annotations

import json
import os
import random
import time

import jax

from jaxgpt.data import comparisons, jsonl, tasks
from jaxgpt.data import reward as reward_data
from jaxgpt.inference import sampling
from jaxgpt.stages import common

COMPARISON_FILES = {'train': 'comparisons.jsonl', 'heldout': 'comparisons_heldout.jsonl'}
SAMPLES_FILE = 'samples_heldout.jsonl'  # the distinct held-out samples: score_stats' set


def have_embedded(directory: str) -> bool:
  """Whether `directory` holds sampled comparisons to reuse."""
  return all(os.path.exists(os.path.join(directory, f)) for f in COMPARISON_FILES.values())


def comparisons_for(cfg, name: str, out_dir: str, sft_graphdef, sft_params, sft_mcfg, tok,
                    reuse_dirs=()):
  """(train, heldout, source stats, held-out samples or None) for stage `name`:
  config.<name>.data's files, or the embedded comparisons of the first of `reuse_dirs`
  that has them, else sampled now into out_dir."""
  if cfg[name].data != 'embedded':
    return (*reward_data.load_comparison_files(cfg, name), None)
  where = next((d for d in reuse_dirs if have_embedded(d)), out_dir)
  return embedded_comparisons(cfg, where, sft_graphdef, sft_params, sft_mcfg, tok, name)


# -- held-out samples (the set the reward model's score_stats is over) ---------------------


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


def embedded_comparisons(cfg, out_dir, graphdef, sft_params, sft_mcfg, tok, name='reward'):
  """(train, heldout, stats, heldout_samples): SFT samples ranked by the simulated
  labeler, sampled once and kept in out_dir/comparisons*.jsonl (their counts and timings
  in comparisons_stats.json), and the distinct held-out samples, (prompt, reply,
  finished), in out_dir/samples_heldout.jsonl; a re-run reads the files back."""
  paths = {split: os.path.join(out_dir, name) for split, name in COMPARISON_FILES.items()}
  stats_path = os.path.join(out_dir, 'comparisons_stats.json')
  samples_path = os.path.join(out_dir, SAMPLES_FILE)
  if all(os.path.exists(p) for p in paths.values()):
    out = {split: comparisons.read_comparisons([p])[0] for split, p in paths.items()}
    print(f'[{name}] comparisons: reusing {paths["train"]} ({len(out["train"]):,} pairs) and '
          f'{paths["heldout"]} ({len(out["heldout"]):,})', flush=True)
    stats = {}
    if os.path.exists(stats_path):
      with open(stats_path, encoding='utf-8') as f:
        stats = json.load(f)
    if os.path.exists(samples_path):
      samples = read_samples(samples_path)
    else:  # files of an older version: cut replies in them read as finished
      samples = pair_sides(out['heldout'])
      print(f'[{name}] no {samples_path}: score_stats over the distinct replies of the '
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
    prompt_ids = [tok.chat.prompt([{'role': 'user', 'content': e.prompt}])
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
  print(f'[{name}] comparisons sampled from the SFT model ({k} per prompt, temperature 1) and '
        f'ranked by the simulated labeler: {common.format_stats(stats)} -> {paths["train"]}',
        flush=True)
  return out['train'], out['heldout'], stats, heldout_samples
