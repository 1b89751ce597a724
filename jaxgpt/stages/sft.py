"""Stage 2, supervised fine-tuning: the same cross-entropy, on assistant tokens only.

Starts from the pretraining stage's final checkpoint (WORKDIR/pretrain, or
config.checkpoint.init_from), trains on chat transcripts, then writes
WORKDIR/sft/eval.json: held-out task accuracy of the base model asked directly,
the base model given a few-shot document, and the SFT model.
"""

from __future__ import annotations

from jaxgpt import config as config_lib
from jaxgpt.data import tasks
from jaxgpt.data.sft import make_sft_data
from jaxgpt.evals import accuracy as evaluation
from jaxgpt.inference import sampling
from jaxgpt.stages import common
from jaxgpt.train import loop, trainer

NAME = 'sft'
PREVIOUS = 'pretrain'


def chat_sampler(tok, mcfg, max_new_tokens):
  """Greedy answers to a few held-out task prompts, shown while training."""
  questions = [e.prompt for e in tasks.heldout_eval_set(1, seed=1)[:4]]
  prompts = [tok.chat.prompt([{'role': 'user', 'content': q}]) for q in questions]

  def sample(graphdef, params):
    return list(zip(questions, sampling.generate_text(graphdef, params, mcfg, tok, prompts,
                                                      max_new_tokens=max_new_tokens)))
  return sample


def run(cfg, workdir: str) -> loop.Result:
  mesh, mcfg = common.mesh_and_model(cfg)
  init_dir = common.init_dir(cfg, workdir, PREVIOUS)
  params0, tok = common.start_from(cfg, workdir, NAME, init_dir, mesh, mcfg,
                                   what=f'{NAME} initial weights')
  train_mcfg, start = common.with_adapters(cfg, mesh, mcfg, params0)
  data = make_sft_data(cfg, tok, **common.process_info())
  print(f'[{NAME}] data: {common.format_stats(data.stats)}', flush=True)
  t = config_lib.stage_train_config(cfg, NAME)
  stage = loop.Stage(
      name=NAME, cfg=cfg, train_cfg=t, mcfg=train_mcfg, mesh=mesh,
      loss_fn=trainer.lm_loss_fn(t.z_loss, use_segment_ids=bool(cfg.sft.packing),
                                 loss_chunk=t.loss_chunk, loss_positions=t.loss_positions),
      data=data, head_positions=t.loss_positions,
      init_params=lambda: start, sample_fn=chat_sampler(tok, train_mcfg, cfg.sft.eval_tokens),
      meta={'tokenizer': tok.path, 'init_from': init_dir,
            'config': cfg.to_json_best_effort()})
  result = loop.train(stage, workdir)
  if common.evaluated_before(result, workdir, NAME):
    return result
  eval_mcfg, graphdef, sft = common.merged_model(train_mcfg, result.state['params'])
  write_eval(cfg, workdir, tok, eval_mcfg, graphdef, params0, sft)
  return result


def write_eval(cfg, workdir, tok, mcfg, graphdef, base, sft) -> dict:
  """Held-out accuracy of base (zero- and few-shot) and SFT models -> WORKDIR/sft/eval.json."""
  s = cfg.sft
  eval_set = tasks.heldout_eval_set(s.eval_per_task, seed=cfg.seed)
  kw = dict(max_new_tokens=s.eval_tokens, shots=s.few_shot, seed=cfg.seed)
  # A published instruct model (config.checkpoint.base) is asked in its chat template.
  zero, few = ('chat', 'chat_few_shot') if cfg.checkpoint.base else ('zero_shot', 'few_shot')
  report = {
      'base_zero_shot': evaluation.task_accuracy(graphdef, base, mcfg, tok, zero, eval_set, **kw),
      'base_few_shot': evaluation.task_accuracy(graphdef, base, mcfg, tok, few, eval_set, **kw),
      'sft': evaluation.task_accuracy(graphdef, sft, mcfg, tok, 'chat', eval_set, **kw),
  }
  report['n_prompts'] = len(eval_set)
  return common.write_eval(workdir, NAME, report, lambda path: (
      f'[{NAME}] held-out task accuracy: ' + ', '.join(
          f'{k} {v["accuracy"]:.1%}' for k, v in report.items() if isinstance(v, dict)) +
      f'  ({path})'))
