"""The inference tools against one real tiny run: `inference.load`, `python -m jaxgpt.cli.sample`,
the streamed decoder `sampling.stream` and `python -m jaxgpt.cli.chat`.

Every test reads the session's finished smoke run (`smoke_run` in conftest.py).
"""

import contextlib
import io
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags

import helpers
import xla_test_flags
from jaxgpt import errors, sharding
from jaxgpt import config as config_lib
from jaxgpt.cli import chat as chat_cli
from jaxgpt.cli import sample as sample_cli

from jaxgpt.inference import sampling
from jaxgpt.inference import loading as inference
from jaxgpt.train import optim, trainer
from jaxgpt.train import checkpoint as ckpt_lib

PROMPTS = ['What is 2 + 3?', 'ROMEO:']


@pytest.fixture(scope='module')
def workdir(smoke_run):
  """WORKDIR with the tokenizer and pretrain (6 steps) + sft (4 steps) checkpoints."""
  return smoke_run[0]


@pytest.fixture(scope='module')
def sft(workdir):
  return inference.load(workdir, 'sft')


def run_main(module, argv):
  """module.main after parsing `argv` as its command line, inside the error boundary of
  every entry point; (exit code, stdout, stderr)."""
  flags.FLAGS.unparse_flags()
  flags.FLAGS(['prog', *argv])
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = errors.guard(lambda: module.main(['prog']), 'prog')
  flags.FLAGS.unparse_flags()
  return code, out.getvalue(), err.getvalue()


def greedy(tok, max_new_tokens):
  return sampling.SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0,
                                 stop_ids=sampling.default_stop_ids(tok), pad_id=tok.pad_id)


# -- inference.load ---------------------------------------------------------------------------


def test_load_restores_the_checkpoint_params_config_and_tokenizer(workdir, sft):
  graphdef, params, mcfg, tok, cfg = sft[:5]
  assert cfg.model.to_dict() == helpers.smoke_config().model.to_dict()
  assert mcfg.max_seq_len == cfg.model.max_seq_len and mcfg.rules == sft.mcfg.rules
  assert tok.path == os.path.join(workdir, 'tokenizer.model')
  mesh = jax.tree.leaves(params)[0].sharding.mesh
  assert dict(mesh.shape) == {'data': jax.device_count(), 'fsdp': 1, 'tensor': 1}

  # The whole train state, restored the way the training loop resumes it.
  _, abstract, shardings = trainer.abstract_train_state(
      mcfg, mesh, optim.make_optimizer(config_lib.stage_train_config(cfg, 'sft')))
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, 'sft', 'checkpoints'), async_save=False)
  try:
    state, meta = ckpt.restore(ckpt.latest_step(), sharding.abstract_with_shardings(
        abstract, shardings))
  finally:
    ckpt.close()
  assert meta['step'] == 4
  assert jax.tree.structure(state['params']) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(state['params']), jax.tree.leaves(params)):
    assert a.sharding == b.sharding
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  base = inference.load(workdir, 'pretrain')
  assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
             zip(jax.tree.leaves(base.params), jax.tree.leaves(params)))


def test_load_mesh_override(workdir):
  loaded = inference.load(workdir, 'pretrain', mesh='fsdp=2')
  mesh = jax.tree.leaves(loaded.params)[0].sharding.mesh
  assert dict(mesh.shape) == {'data': jax.device_count() // 2, 'fsdp': 2, 'tensor': 1}
  with pytest.raises(inference.InferenceError, match='--mesh'):
    inference.load(workdir, 'pretrain', mesh='pipeline=2')


def test_load_errors_say_what_to_run(workdir, tmp_path):
  missing = str(tmp_path / 'nowhere')
  with pytest.raises(inference.InferenceError,
                     match=r'nowhere does not exist.*python -m jaxgpt.main'):
    inference.load(missing, 'sft')
  partial = tmp_path / 'partial'
  for stage in ('pretrain', 'sft'):
    (partial / stage / 'checkpoints').mkdir(parents=True)
  with pytest.raises(inference.InferenceError,
                     match=r"has no ppo stage.*\['pretrain', 'sft'\].*--config.stage=ppo"):
    inference.load(str(partial), 'ppo')
  with pytest.raises(inference.InferenceError, match="unknown stage 'sfr'"):
    inference.load(workdir, 'sfr')
  with pytest.raises(inference.InferenceError, match='reward model'):
    inference.load(workdir, 'reward')
  empty = tmp_path / 'empty'
  (empty / 'sft' / 'checkpoints').mkdir(parents=True)
  with pytest.raises(inference.InferenceError, match='no finished checkpoint'):
    inference.load(str(empty), 'sft')


# -- python -m jaxgpt.cli.sample --------------------------------------------------------------------


@pytest.mark.parametrize('stage', ['pretrain', 'sft'])
def test_sample_prints_greedy_completions(workdir, stage):
  loaded = inference.load(workdir, stage)
  tok = loaded.tokenizer
  code, out, _ = run_main(sample_cli, ['--workdir', workdir, '--stage', stage,
                                       '--prompt', PROMPTS[0], '--prompt', PROMPTS[1],
                                       '--temperature=0', '--max_new_tokens=6'])
  assert code == 0
  if stage == 'pretrain':  # a document start, as the pretraining stage's own sampler
    ids = [[tok.eot_id] + tok.encode(p, allow_special=True) for p in PROMPTS]
  else:  # a user turn of the chat template
    ids = [tok.chat.prompt([{'role': 'user', 'content': p}]) for p in PROMPTS]
  expected = sampling.generate_text(loaded.graphdef, loaded.params, loaded.mcfg, tok, ids,
                                    max_new_tokens=6)
  for i, (prompt, completion) in enumerate(zip(PROMPTS, expected), 1):
    assert f'=== [{i}] prompt ===\n{prompt}\n=== [{i}] completion ===\n{completion}\n' in out


def test_sample_prompts_file_and_errors(workdir, tmp_path):
  path = tmp_path / 'prompts.txt'
  path.write_text('first\n\nsecond\n', encoding='utf-8')
  code, out, _ = run_main(sample_cli, ['--workdir', workdir, '--prompts_file', str(path),
                                       '--max_new_tokens=6', '--temperature=0'])
  assert code == 0 and '=== [2] prompt ===\nsecond\n' in out and '[3]' not in out
  code, _, err = run_main(sample_cli, ['--workdir', str(tmp_path / 'none'), '--prompt', 'x'])
  assert code == 1 and 'does not exist' in err and 'python -m jaxgpt.main' in err
  code, _, err = run_main(sample_cli, ['--workdir', workdir, '--stage', 'rlhf', '--prompt', 'x'])
  assert code == 1 and "unknown stage 'rlhf'" in err


# -- sampling.stream --------------------------------------------------------------------------


def test_stream_yields_the_greedy_sample_tokens(sft):
  graphdef, params, mcfg, tok = sft[:4]
  # The trained smoke model, and random weights with peaked distributions (varied tokens).
  peaked = jax.device_put(helpers.random_params(mcfg, seed=3, std=0.5),
                          jax.tree.map(lambda x: x.sharding, params))
  prompts = [tok.chat.prompt([{'role': 'user', 'content': q}])
             for q in PROMPTS]
  settings = greedy(tok, 6)  # the shapes test_sample_* compiled already
  for weights in (params, peaked):
    mult = sampling.batch_multiple(jax.tree.leaves(weights)[0].sharding.mesh, mcfg.rules)
    ids, lengths = sampling.pad_prompts(prompts, tok.pad_id, batch_multiple=mult)
    out = sampling.sample(graphdef, weights, mcfg, ids, lengths, jax.random.PRNGKey(0),
                          settings)
    tokens, n = jax.device_get((out.tokens, out.lengths))
    for row, prompt in enumerate(prompts):
      streamed = list(sampling.stream(graphdef, weights, mcfg, prompt, settings=settings))
      assert streamed == tokens[row, :n[row]].tolist()
  assert len(set(streamed)) > 1  # the peaked model's tokens vary: the check is not vacuous

  # Ends after (and including) a stop id; never runs past the context.
  stop = streamed[2]
  stopping = sampling.SamplingConfig(max_new_tokens=6, temperature=0.0, stop_ids=(stop,))
  got = list(sampling.stream(graphdef, peaked, mcfg, prompts[-1], settings=stopping))
  assert got == streamed[:streamed.index(stop) + 1]
  long_prompt = [tok.eot_id] * (mcfg.max_seq_len - 2)
  assert len(list(sampling.stream(graphdef, peaked, mcfg, long_prompt, settings=settings))) == 2
  with pytest.raises(ValueError, match='max_seq_len'):
    next(sampling.stream(graphdef, peaked, mcfg, [1] * mcfg.max_seq_len, settings=settings))


# -- python -m jaxgpt.cli.chat ----------------------------------------------------------------------


def test_decode_stream_prints_multibyte_characters_whole(sft):
  tok = sft.tokenizer
  text = 'héllo 你好 🙂 end'
  ids = tok.encode(text)
  assert len(ids) > len(text) // 2  # byte fallback: characters span several tokens
  pieces = list(chat_cli.decode_stream(tok, ids))
  assert ''.join(pieces) == text
  assert not any('\ufffd' in p for p in pieces)
  # A reply cut inside a character ends with the replacement character.
  assert ''.join(chat_cli.decode_stream(tok, tok.encode('🙂')[:2])) == tok.decode(
      tok.encode('🙂')[:2])


def test_chat_session_keeps_history_and_truncates_from_the_left(sft):
  tok = sft.tokenizer
  session = chat_cli.Session(sft, system='Be brief.', max_new_tokens=32)
  session.turns = [{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'hello'}]
  ids = session.prompt_ids('and you?')
  assert ids == tok.chat.prompt(
      [{'role': 'system', 'content': 'Be brief.'}, *session.turns,
       {'role': 'user', 'content': 'and you?'}])
  assert session.dropped == 0

  long_turn = 'word ' * 40
  session.turns = [{'role': r, 'content': f'{i} {long_turn}'}
                   for i in range(6) for r in ('user', 'assistant')]
  ids = session.prompt_ids('last question')
  budget = sft.mcfg.max_seq_len - 32
  assert len(ids) <= budget and session.dropped >= 2 and session.dropped % 2 == 0
  kept = session.turns[session.dropped:]
  assert ids == tok.chat.prompt(
      [{'role': 'system', 'content': 'Be brief.'}, *kept,
       {'role': 'user', 'content': 'last question'}])
  with pytest.raises(chat_cli.ContextFull, match='Shorten it'):
    session.prompt_ids('x ' * sft.mcfg.max_seq_len)


def test_chat_repl_streams_two_replies_and_exits_on_eof(workdir):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      [sys.executable, '-m', 'jaxgpt.cli.chat', '--workdir', workdir, '--stage', 'sft',
       '--max_new_tokens=8', '--system', 'You are helpful.'],
      input='hello\n/reset\nwhat is 2 + 3?\n', capture_output=True, text=True, cwd=helpers.ROOT,
      env=env, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert out.count(chat_cli.ASSISTANT_PREFIX) == 2, out
  assert out.startswith(f'{chat_cli.USER_PROMPT}hello\n{chat_cli.ASSISTANT_PREFIX}')
  assert '[conversation cleared]' in out
  assert f'{chat_cli.USER_PROMPT}what is 2 + 3?\n{chat_cli.ASSISTANT_PREFIX}' in out
  assert out.endswith(f'\n{chat_cli.USER_PROMPT}\n')


def test_chat_missing_workdir(tmp_path):
  code, _, err = run_main(chat_cli, ['--workdir', str(tmp_path / 'none')])
  assert code == 1 and 'does not exist' in err


# -- python -m jaxgpt.cli.score and the PPO policy -------------------------------------------------


def test_score_cli_prints_reward_scores_and_comparisons(workdir, tmp_path):
  """`python -m jaxgpt.cli.score` (its own process: its --prompt is not sample's)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=xla_test_flags.flags())

  def score(*args):
    proc = subprocess.run([sys.executable, '-m', 'jaxgpt.cli.score', f'--workdir={workdir}', *args],
                          capture_output=True, text=True, env=env, cwd=helpers.ROOT, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr

  code, out, err = score('--prompt=What is 2 + 3?', '--response=5', '--response=6')
  assert code == 0, err
  assert 'mean' in out and out.count("'What is 2 + 3?' ->") == 2
  rows = tmp_path / 'pairs.jsonl'
  rows.write_text('{"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "six"}\n'
                  '{"prompt": "x", "chosen": 5}\n', encoding='utf-8')
  code, out, err = score(f'--jsonl={rows}')
  assert code == 1 and 'pairs.jsonl:2:' in err and 'Traceback' not in err
  rows.write_text('{"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "six"}\n',
                  encoding='utf-8')
  code, out, err = score(f'--jsonl={rows}')
  assert code == 0 and 'chosen - rejected' in out, err


def test_sample_cli_reads_the_ppo_policy_and_refuses_the_reward_model(workdir):
  loaded = inference.load(workdir, 'ppo')
  assert 'lm_head' in loaded.params and 'opt_state' not in loaded.params
  code, out, err = run_main(sample_cli, [f'--workdir={workdir}', '--stage=ppo',
                                         '--prompt=What is 2 + 3?', '--max_new_tokens=4'])
  assert code == 0 and '=== [1] completion ===' in out, err
  code, out, err = run_main(sample_cli, [f'--workdir={workdir}', '--stage=reward',
                                         '--prompt=hi'])
  assert code == 1 and 'jaxgpt.cli.score' in err
