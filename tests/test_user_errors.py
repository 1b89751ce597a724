"""Every mistake a user can make ends in one clear message, and changes nothing.

A table of bad inputs, each run as a real command line in its own process (`python -m
jaxgpt.main | sample | chat | score`, `tools/*.py`): the exit status is not 0, there is
no traceback, stderr has at most 3 lines and names the culprit, and every file that
existed before is byte-identical after. The processes run a few at a time (each is
mostly importing jax); only the cases pytest selected run.

Then what resuming keeps: a damaged newest checkpoint is moved aside and the run ends
exactly where an uninterrupted run ends; after kill -9 and a resume every step is
logged once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import gc
import glob
import hashlib
import json
import logging
import os
import pathlib
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
from typing import Callable

import jax
import numpy as np
import pytest

import gguf_files
import helpers
import xla_test_flags
from jaxgpt import errors
from jaxgpt import config as config_lib
from jaxgpt import run as run_lib

ROOT = helpers.ROOT


class Skip(Exception):
  """A case this machine cannot set up (the reason is the message)."""


@dataclasses.dataclass(frozen=True)
class Case:
  id: str
  argv: tuple[str, ...]           # after `python`; {d}: the case's directory, {run}: the
                                  # session's finished smoke run (read-only for every case)
  expect: tuple[str, ...]         # what stderr must contain ({d}, {run} filled in)
  setup: Callable[[pathlib.Path, str], None] | None = None  # puts the bad input into {d}
  absent: tuple[str, ...] = ()    # what stderr must not say
  own_cache: bool = True          # JAXGPT_CACHE in {d}; False: the embedded corpus's cache


# -- set-ups --------------------------------------------------------------------------------

WORDS = 'the king said to be or not that is the question romeo loves juliet by night'.split()


def text_docs(n=40, words=300, seed=0) -> dict[str, str]:
  rng = random.Random(seed)
  return {f'corpus/doc{i}.txt': ' '.join(rng.choice(WORDS) for _ in range(words))
          for i in range(n)}


def write(files: dict[str, bytes | str]):
  def setup(d, run):
    del run
    for name, data in files.items():
      path = d / name
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(data if isinstance(data, bytes) else data.encode())
  return setup


def damaged_copy(stage: str, how: str):
  """WORKDIR {d}/wd: the smoke run's `stage` and tokenizer, its newest step damaged."""
  def setup(d, run):
    shutil.copytree(f'{run}/{stage}', d / 'wd' / stage)
    shutil.copy(f'{run}/tokenizer.model', d / 'wd')
    damage(newest_step(d / 'wd' / stage / 'checkpoints'), how)
  return setup


def newest_step(checkpoints) -> pathlib.Path:
  return pathlib.Path(checkpoints) / str(max(int(s) for s in os.listdir(checkpoints)))


def damage(step_dir: pathlib.Path, how: str) -> None:
  if how == 'chunks':  # every array chunk overwritten, as a bad copy or disk would leave it
    for path in glob.glob(str(step_dir / 'state' / 'd' / '*')):
      pathlib.Path(path).write_bytes(b'garbage')
  elif how == 'meta':
    (step_dir / 'meta' / 'metadata').write_text('{"step": 4, "tok')
  else:
    raise ValueError(how)


_MOUNTS: list[pathlib.Path] = []


def _mount_tmpfs(path: pathlib.Path, options: str) -> bool:
  if os.geteuid() != 0 or not shutil.which('mount'):
    return False
  proc = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(path)],
                        capture_output=True, check=False)
  if proc.returncode == 0:
    _MOUNTS.append(path)
  return proc.returncode == 0


def read_only_dir(d, run):
  del run
  (d / 'ro').mkdir()
  if os.geteuid() != 0:
    (d / 'ro').chmod(0o555)
  elif not _mount_tmpfs(d / 'ro', 'ro,size=64k'):
    raise Skip('running as root, where chmod does not stop writes, and no read-only tmpfs '
               'can be mounted here')


def full_disk(then=None):
  """{d}/full: a 4 KiB tmpfs (root only), after `then` wrote the rest of the input."""
  def setup(d, run):
    if then is not None:
      then(d, run)
    (d / 'full').mkdir()
    if not _mount_tmpfs(d / 'full', 'size=4k'):
      raise Skip('a full disk is simulated with a tiny tmpfs, which needs root and mount')
  return setup


def gguf_file(how: str):
  """{d}/m.gguf: a tiny LLaMA GGUF, truncated, of another architecture or with a tensor of
  a type id the gguf package does not know."""
  def setup(d, run):
    del run
    path = str(d / 'm.gguf')
    vocab = gguf_files.byte_level_vocab()
    model = gguf_files.RandomLlama(len(vocab['tokens']))
    gguf_files.write_llama(path, model, vocab, arch='mamba' if how == 'arch' else 'llama')
    if how == 'truncated':
      data = (d / 'm.gguf').read_bytes()
      (d / 'm.gguf').write_bytes(data[:len(data) - 1000])
    elif how == 'type':
      gguf_files.set_tensor_type(path, 'blk.0.attn_norm.weight', 77)
  return setup


# -- the table ------------------------------------------------------------------------------

MAIN = ('-m', 'jaxgpt.main', '--config=experiments/tiny.py:smoke')
WD = '--workdir={d}/wd'
TOK = '--config.tokenizer.path={run}/tokenizer.model'
FILES = ('--config.stage=pretrain', '--config.data.source=files',
         '--config.data.paths={d}/corpus/*', '--config.data.tfds_dir={d}/tfds')
SFT = ('--config.stage=sft', '--config.checkpoint.init_from={run}/pretrain/checkpoints', TOK,
       '--config.sft.data={d}/sft.jsonl')
SAMPLE = ('-m', 'jaxgpt.cli.sample')
PREPARE = ('tools/prepare_corpus.py', '--name=corpus', '--tfds_dir={d}/tfds')
GGUF_IMPORT = ('tools/convert_hf.py', 'import', '--gguf', '{d}/m.gguf', '--out', '{d}/ckpt')
NOISE = random.Random(0).randbytes(4000)
# A published model's config.json with a setting jaxgpt does not implement.
HF_IMPORT = ('tools/convert_hf.py', 'import', '--hf={d}/hf', '--out={d}/out')
_DECODER = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=64,
                rms_norm_eps=1e-6)


def hf_config_json(**fields):
  return write({'hf/config.json': json.dumps(dict(_DECODER, **fields))})

CASES = [
    # config: command line and experiment files
    Case('cli-typo', (*MAIN, WD, '--config.train.stpes=5'),
         ("config: unknown field 'train.stpes'. Did you mean 'train.steps'?",)),
    Case('config-file-missing', ('-m', 'jaxgpt.main', '--config=experiments/tiny2.py', WD),
         ('experiments/tiny2.py',)),
    Case('cli-bad-value', (*MAIN, WD, '--config.train.steps=ten'),
         ('--config.train.steps=ten',)),
    Case('zero-steps', (*MAIN, WD, '--config.train.steps=0'), ('config.train.steps=0',)),
    # mesh
    Case('mesh-two-free', (*MAIN, WD, '--config.mesh.fsdp=-1'),
         ('config.mesh', "['data', 'fsdp']")),
    Case('batch-indivisible', (*MAIN, WD, '--config.train.batch_size=12'),
         ('config.train.batch_size=12', "('act_batch', ('data', 'fsdp'))",
          'config.mesh.rules')),
    Case('kv-heads-vs-tensor', (*MAIN, WD, '--config.mesh.tensor=4'),
         ('config.model.n_kv_heads=2', "'kv_heads'", 'config.mesh.rules')),
    Case('odd-vocab-vs-tensor', (*MAIN, WD, '--config.mesh.tensor=2',
                                 '--config.model.vocab_size=511',
                                 '--config.tokenizer.vocab_size=511'),
         ('config.model.vocab_size=511', "'vocab'", 'config.mesh.rules')),
    # tokenizer
    Case('tokenizer-missing-llama', ('-m', 'jaxgpt.main', '--config=experiments/llama_7b.py',
                                     WD, '--config.preflight=False'),
         ("'tokenizer.model'", 'config.tokenizer.path', 'tools/train_tokenizer.py')),
    # memory: checked before the tokenizer and before anything is allocated
    Case('llama-does-not-fit', ('-m', 'jaxgpt.main', '--config=experiments/llama_7b.py', WD),
         ('pretrain needs', 'GiB per device', 'a device here has', 'tools/aot.py',
          'config.preflight=False')),
    # the workdir
    Case('workdir-is-a-file', (*MAIN, '--workdir={d}/file'), ('{d}/file', 'not a directory'),
         write({'file': 'x'})),
    Case('workdir-under-a-file', (*MAIN, '--workdir={d}/file/run'), ('{d}/file/run',),
         write({'file': 'x'})),
    Case('workdir-read-only', (*MAIN, '--workdir={d}/ro'), ('{d}/ro',), read_only_dir),
    Case('disk-full', (*MAIN, *FILES, '--workdir={d}/full/run'),
         ('{d}/full/run/tokenizer.model', 'No space left on device'),
         full_disk(write(text_docs()))),
    # pretraining corpora
    Case('corpus-binary-file', (*MAIN, WD, *FILES, TOK), ('{d}/corpus/weights.bin',),
         write({**text_docs(2), 'corpus/weights.bin': NOISE})),
    Case('corpus-directory', (*MAIN, WD, *FILES[:2], '--config.data.paths={d}/corpus', TOK),
         ('{d}/corpus', 'is a directory'), write(text_docs(2))),
    Case('corpus-all-empty', (*MAIN, WD, *FILES, TOK), ('no documents', 'config.data.paths'),
         write({'corpus/a.txt': '  \n', 'corpus/b.txt': ''})),
    Case('corpus-random-bytes', (*MAIN, WD, *FILES, TOK),
         ('{d}/corpus/noise.txt', 'not valid UTF-8', 'max_invalid_utf8'),
         write({**text_docs(2), 'corpus/noise.txt': NOISE})),
    Case('corpus-bad-json-line', (*MAIN, WD, *FILES, TOK), ('{d}/corpus/a.jsonl:2',),
         write({'corpus/a.jsonl': '{"text": "fine"}\n{"text": "cut\n'})),
    # SFT data (starting from the smoke run's pretrained checkpoint)
    Case('sft-unknown-role', (*MAIN, WD, *SFT), ('{d}/sft.jsonl:1', "'robot'"),
         write({'sft.jsonl': '{"messages": [{"role": "robot", "content": "hi"}]}\n'})),
    Case('sft-missing-field', (*MAIN, WD, *SFT), ('{d}/sft.jsonl:2', 'response'),
         write({'sft.jsonl': '{"prompt": "a", "response": "b"}\n{"prompt": "hi"}\n'})),
    Case('sft-bad-utf8', (*MAIN, WD, *SFT), ('{d}/sft.jsonl:1', 'utf-8'),
         write({'sft.jsonl': b'{"prompt": "caf\xe9", "response": "ok"}\n'})),
    Case('sft-before-pretrain', (*MAIN, WD, '--config.stage=sft', TOK),
         ('{d}/wd/pretrain/checkpoints', 'Run that stage first')),
    # DPO's own comparison files (from the smoke run's SFT checkpoint)
    Case('dpo-bad-comparison-row', (*MAIN, WD, '--config.stage=dpo', TOK,
                                    '--config.checkpoint.init_from={run}/sft/checkpoints',
                                    '--config.dpo.data={d}/prefs.jsonl'),
         ('{d}/prefs.jsonl:2', "missing field 'rejected'"),
         write({'prefs.jsonl': '{"prompt": "2 + 3?", "chosen": "5", "rejected": "6"}\n'
                               '{"prompt": "2 + 2?", "chosen": "4"}\n'})),
    # checkpoints
    Case('resume-damaged-stop', (*MAIN, WD, '--config.stage=pretrain',
                                 '--config.checkpoint.on_damaged=stop'),
         ('{d}/wd/pretrain/checkpoints/6 is damaged', 'state/d/', 'on_damaged=fallback'),
         damaged_copy('pretrain', 'chunks'), absent=('must match',), own_cache=False),
    Case('init-from-damaged', (*MAIN, WD, '--config.stage=sft', TOK),
         ('{d}/wd/pretrain/checkpoints/6 is damaged', 'meta/metadata', 'Run that stage again'),
         damaged_copy('pretrain', 'meta')),
    # online-RL rewards (GRPO from the smoke run's SFT checkpoint)
    Case('grpo-reward-typo', (*MAIN, WD, '--config.stage=grpo', '--config.grpo.reward=checkr'),
         ("config.grpo.reward='checkr'", "did you mean 'checker'?")),
    Case('grpo-reward-module-missing', (*MAIN, WD, '--config.stage=grpo', TOK,
                                        '--config.grpo.reward=no_such_module:fn'),
         ('config.grpo.reward', "no module 'no_such_module'", 'PYTHONPATH')),
    Case('grpo-reward-function-bad-return', (*MAIN, WD, '--config.stage=grpo', TOK,
                                             '--config.checkpoint.init_from={run}/sft/checkpoints',
                                             '--config.grpo.reward=builtins:dict'),
         ('config.grpo.reward: builtins:dict returned', 'a list of floats, one per completion')),
    # sample, chat, score
    Case('sample-no-workdir', (*SAMPLE, '--workdir={d}/none', '--prompt=hi'),
         ('{d}/none does not exist', 'python -m jaxgpt.main')),
    Case('sample-no-prompt', (*SAMPLE, '--workdir={run}'), ('--prompt',)),
    Case('sample-prompts-file-missing', (*SAMPLE, '--workdir={run}',
                                         '--prompts_file={d}/prompts.txt'),
         ('{d}/prompts.txt', 'No such file')),
    Case('sample-prompts-file-bad-utf8', (*SAMPLE, '--workdir={run}',
                                          '--prompts_file={d}/prompts.txt'),
         ('{d}/prompts.txt:2', 'UTF-8'), write({'prompts.txt': b'fine\n\xff\xfe\n'})),
    Case('sample-damaged', (*SAMPLE, '--workdir={d}/wd', '--prompt=hi'),
         ('{d}/wd/sft/checkpoints/4 is damaged', 'state/d/', 'tensor params.'),
         damaged_copy('sft', 'chunks'), absent=('must match',)),
    Case('chat-damaged-meta', ('-m', 'jaxgpt.cli.chat', '--workdir={d}/wd'),
         ('{d}/wd/sft/checkpoints/4 is damaged', 'meta/metadata'), damaged_copy('sft', 'meta')),
    Case('score-line-not-object', ('-m', 'jaxgpt.cli.score', '--workdir={run}',
                                   '--jsonl={d}/replies.jsonl'),
         ('{d}/replies.jsonl:1', 'JSON object'), write({'replies.jsonl': '[1, 2]\n'})),
    # tools
    Case('prepare-no-match', (*PREPARE, '--paths={d}/nothing/*.txt'),
         ('--paths', '{d}/nothing/*.txt')),
    Case('prepare-bad-name', (*PREPARE[:1], '--name=my corpus!', '--tfds_dir={d}/tfds',
                              '--paths={d}/corpus/*'), ('--name',), write(text_docs(2))),
    Case('prepare-random-bytes', (*PREPARE, '--paths={d}/corpus/*'),
         ('{d}/corpus/noise.txt', 'not valid UTF-8'),
         write({**text_docs(2), 'corpus/noise.txt': NOISE})),
    Case('prepare-disk-full', (*PREPARE[:2], '--tfds_dir={d}/full/tfds', '--paths={d}/corpus/*'),
         ('No space left on device', '{d}/full/tfds'), full_disk(write(text_docs()))),
    Case('tokenizer-tool-missing-arg', ('tools/train_tokenizer.py', '--out={d}/t.model'),
         ('--vocab_size',)),
    Case('gguf-truncated', GGUF_IMPORT, ('{d}/m.gguf: truncated', "tensor '", 'copy it again'),
         gguf_file('truncated')),
    Case('gguf-unknown-architecture', GGUF_IMPORT,
         ('{d}/m.gguf', "general.architecture='mamba' is not supported", "'llama'"),
         gguf_file('arch')),
    Case('gguf-unknown-quant-type', GGUF_IMPORT,
         ('{d}/m.gguf', "tensor 'blk.0.attn_norm.weight' has ggml type 77", 'Q4_K'),
         gguf_file('type')),
    Case('hf-import-experts', HF_IMPORT, ("model_type='qwen3_moe'", 'mixture-of-experts'),
         hf_config_json(model_type='qwen3_moe', num_experts=8)),
    Case('hf-import-softcapping', HF_IMPORT, ('final_logit_softcapping=30.0', 'soft-capping'),
         hf_config_json(model_type='gemma3_text', final_logit_softcapping=30.0)),
    Case('hf-init-from-rope-yarn', (*MAIN, WD, '--config.checkpoint.init_from=hf:{d}/hf'),
         ("rope_parameters.rope_type='yarn'", "'default', 'linear', 'llama3'"),
         hf_config_json(model_type='llama', rope_parameters={'rope_type': 'yarn', 'factor': 4.0,
                                                             'rope_theta': 1e4})),
    Case('bench-typo', ('tools/bench_decode.py', '--config=experiments/tiny.py:smoke',
                        '--config.model.d_modle=3'), ("unknown field 'model.d_modle'",)),
]
assert len({c.id for c in CASES}) == len(CASES)


# -- running them ---------------------------------------------------------------------------


def _snapshot(root) -> dict[str, str]:
  """{relative path: sha1} of every file under `root`."""
  out = {}
  for path in sorted(pathlib.Path(root).rglob('*')):
    if path.is_file() and not path.is_symlink():
      out[str(path.relative_to(root))] = hashlib.sha1(path.read_bytes()).hexdigest()
  return out


@dataclasses.dataclass
class Outcome:
  d: pathlib.Path
  skip: str = ''
  code: int = 0
  stdout: str = ''
  stderr: str = ''
  before: dict = dataclasses.field(default_factory=dict)
  after: dict = dataclasses.field(default_factory=dict)


def _env(case: Case, d) -> dict[str, str]:
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': xla_test_flags.flags(devices=8)}
  if case.own_cache:
    env['JAXGPT_CACHE'] = str(d / 'cache')
  return env


def _run_case(case: Case, out: Outcome, run: str) -> None:
  argv = [a.format(d=out.d, run=run) for a in case.argv]
  proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=_env(case, out.d), text=True,
                        capture_output=True, stdin=subprocess.DEVNULL, timeout=600,
                        check=False)
  out.code, out.stdout, out.stderr = proc.returncode, proc.stdout, proc.stderr
  out.after = _snapshot(out.d)


@pytest.fixture(scope='module')
def outcomes(request, smoke_run, tmp_path_factory):
  """{case id: Outcome} of the selected cases, and the smoke run's files before / after."""
  run = smoke_run[0]
  selected = [item.callspec.params['case'] for item in request.session.items
              if item.module is request.module and hasattr(item, 'callspec')
              and 'case' in item.callspec.params]
  results, shared_before = {}, _snapshot(run)
  try:
    for case in selected:
      out = results[case.id] = Outcome(tmp_path_factory.mktemp(case.id))
      try:
        if case.setup is not None:
          case.setup(out.d, run)
      except Skip as e:
        out.skip = str(e)
      out.before = _snapshot(out.d)
    with concurrent.futures.ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
      for f in [pool.submit(_run_case, c, results[c.id], run) for c in selected
                if not results[c.id].skip]:
        f.result()
  finally:
    while _MOUNTS:
      subprocess.run(['umount', str(_MOUNTS.pop())], check=False)
  return results, shared_before, _snapshot(run)


# The outcomes fixture runs every case's command at once: its tests share one xdist
# worker, as every test of the smoke run does (conftest.py), or each worker would run all
# of them again.
@pytest.mark.parametrize('case', CASES, ids=lambda c: c.id)
def test_a_mistake_is_one_clear_message(case, outcomes, smoke_run):
  out = outcomes[0][case.id]
  if out.skip:
    pytest.skip(out.skip)
  report = f'exit {out.code}\n--- stderr\n{out.stderr}\n--- stdout (end)\n{out.stdout[-2000:]}'
  assert out.code not in (0, None), report
  assert 'Traceback' not in out.stderr + out.stdout, report
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert 1 <= len(lines) <= 3, report
  for text in case.expect:
    assert text.format(d=out.d, run=smoke_run[0]) in out.stderr, (text, report)
  for text in case.absent:
    assert text not in out.stderr, (text, report)
  changed = [p for p, h in out.before.items() if out.after.get(p) != h]
  assert not changed, f'changed or removed: {changed}\n{report}'


def test_no_case_touched_the_shared_run(outcomes):
  _, before, after = outcomes
  assert before == after


# -- resuming keeps clean records -----------------------------------------------------------


def read_jsonl(path):
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def assert_each_step_once(stage_dir):
  """metrics.jsonl has one training row per logged step and one evaluation row per
  evaluation step; samples.jsonl one row per (step, prompt)."""
  rows = read_jsonl(os.path.join(stage_dir, 'metrics.jsonl'))
  for kind in ('loss', 'val_loss'):
    steps = [r['step'] for r in rows if kind in r]
    assert steps == sorted(set(steps)), (kind, steps)
  samples = [(r['step'], r['prompt']) for r in read_jsonl(os.path.join(stage_dir,
                                                                       'samples.jsonl'))]
  assert len(samples) == len(set(samples)), samples
  return rows


def tensorboard_purge_steps(stage_dir) -> list[int]:
  """Steps of the SessionLog.START events (TensorBoard hides the earlier events at or
  after such a step) in the stage's event files, oldest file first."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  steps = []
  for path in sorted(glob.glob(os.path.join(stage_dir, 'events.out.tfevents.*'))):
    data = pathlib.Path(path).read_bytes()
    pos = 0
    while pos + 12 <= len(data):  # TFRecord: length, crc, payload, crc
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 16 + length
      if event.HasField('session_log') and event.session_log.status == 1:  # START
        steps.append(event.step)
  return steps


def test_damaged_newest_checkpoint_is_moved_aside_and_the_run_ends_as_if_uninterrupted(
    smoke_run, tmp_path):
  """The smoke run's pretraining (checkpoints 3 and 6) with step 6 damaged, as a
  scheduler restarting a pre-empted job would find it: the same command moves 6 aside,
  resumes from 3 and ends with the uninterrupted run's parameters; steps 4-6 are logged
  once."""
  run, results = smoke_run
  workdir = tmp_path / 'run'
  shutil.copytree(os.path.join(run, 'pretrain'), workdir / 'pretrain')
  shutil.copy(os.path.join(run, 'tokenizer.model'), workdir)
  checkpoints = workdir / 'pretrain' / 'checkpoints'
  damage(checkpoints / '6', 'chunks')
  damaged = _snapshot(checkpoints / '6')

  result = run_lib.run(helpers.smoke_config(stage='pretrain'), str(workdir))['pretrain']

  assert result.steps_run == 3
  assert _snapshot(workdir / 'pretrain' / 'damaged_checkpoints' / '6') == damaged  # kept
  assert sorted(os.listdir(checkpoints)) == ['3', '6']
  for a, b in zip(jax.tree.leaves(results['pretrain'].state['params']),
                  jax.tree.leaves(result.state['params'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  rows = assert_each_step_once(workdir / 'pretrain')
  assert [r['step'] for r in rows if 'loss' in r] == [2, 4, 6]
  assert tensorboard_purge_steps(workdir / 'pretrain')[-1] == 4  # hides the first 4..6


@pytest.mark.slow
def test_kill_9_then_resume_logs_each_step_once(smoke_run, tmp_path):
  """kill -9 (no chance to save or flush) after step 5 of a run that checkpoints every
  2 steps; the same command resumes from the newest finished checkpoint (or from the
  start, if the kill beat the first asynchronous save), and metrics.jsonl and TensorBoard
  hold each step once."""
  tokenizer = os.path.join(smoke_run[0], 'tokenizer.model')
  cmd = [sys.executable, '-m', 'jaxgpt.main', '--config=experiments/tiny.py:smoke',
         f'--workdir={tmp_path}', '--config.stage=pretrain', f'--config.tokenizer.path={tokenizer}',
         '--config.train.log_every=1', '--config.train.eval_every=1000',
         '--config.train.sample_every=1000', '--config.checkpoint.every_steps=2',
         '--config.checkpoint.max_to_keep=5', '--config.train.peak_flops=1e12']
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': xla_test_flags.flags()}
  proc = subprocess.Popen(cmd + ['--config.train.steps=1000'], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
  for line in proc.stdout:
    if re.search(r'\[pretrain\]\s+5/1000', line):
      proc.send_signal(signal.SIGKILL)
      break
  proc.communicate(timeout=120)
  stage_dir = tmp_path / 'pretrain'
  logged = [r['step'] for r in read_jsonl(stage_dir / 'metrics.jsonl') if 'loss' in r]
  assert logged[-1] >= 5
  again = subprocess.run(cmd + ['--config.train.steps=8'], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=600, check=False)
  assert again.returncode == 0, again.stdout + again.stderr
  found = re.search(r'resumed from .*/checkpoints/(\d+)', again.stdout)
  resumed = int(found.group(1)) if found else 0
  assert resumed < logged[-1]  # some logged steps are redone
  rows = assert_each_step_once(stage_dir)
  assert [r['step'] for r in rows if 'loss' in r] == list(range(1, 9))
  assert tensorboard_purge_steps(stage_dir)[-1] == resumed + 1


def test_a_bug_keeps_its_traceback_and_verbose_shows_every_one(capsys):
  """Only jaxgpt's own checks (and the file system) count as the user's mistake."""
  with pytest.raises(KeyError):
    errors.guard(lambda: {}['missing'], 'prog')
  with pytest.raises(ValueError):  # raised inside numpy: an input jaxgpt did not check
    errors.guard(lambda: np.zeros(3).reshape(2), 'prog')
  bad = helpers.tiny_config()
  bad.train.steps = 0
  assert errors.guard(lambda: config_lib.validate(bad, 1), 'prog') == 1
  assert capsys.readouterr().err == 'prog: config.train.steps=0 must be >= 1.\n'
  assert errors.guard(lambda: config_lib.validate(bad, 1), 'prog', verbose=True) == 1
  err = capsys.readouterr().err
  assert 'Traceback' in err and err.endswith('prog: config.train.steps=0 must be >= 1.\n')


def test_a_user_error_is_not_followed_by_a_librarys_leftover_futures(caplog):
  """orbax reads a checkpoint's arrays concurrently: when one read fails, the others'
  failed futures are collected after the one-line report, and asyncio would log each with
  a traceback (seen on a damaged checkpoint)."""
  loop = asyncio.new_event_loop()
  leftover = loop.create_future()
  leftover.set_exception(ValueError('OUT_OF_RANGE: the same damaged file'))
  bad = helpers.tiny_config()
  bad.train.steps = 0
  asyncio_logger = logging.getLogger('asyncio')
  level = asyncio_logger.level
  try:
    assert errors.guard(lambda: config_lib.validate(bad, 1), 'prog') == 1
    del leftover
    gc.collect()
  finally:
    asyncio_logger.setLevel(level)
    loop.close()
  assert not [r for r in caplog.records if r.name == 'asyncio']
