"""Stage 1, pretraining: next-token prediction on packed raw text.

With config.checkpoint.init_from (a checkpoint, or 'hf:DIR' / 'gguf:FILE' for a published
model) it is continued pretraining from those weights; otherwise the model starts random.
With config.checkpoint.base (a published model) there is nothing to pretrain: the later
stages start from that model, and this stage only says so.
"""

from __future__ import annotations

from jaxgpt.data.pretrain import make_pretrain_data
from jaxgpt.inference import sampling
from jaxgpt.stages import common
from jaxgpt.train import loop, trainer

NAME = 'pretrain'


def text_sampler(tok, mcfg, prompts, max_new_tokens, seed=0):
  """Completions of fixed prompts, each started like a document (after <|endoftext|>)."""
  prompt_ids = [[tok.eot_id] + tok.encode(p, allow_special=False) for p in prompts]

  def sample(graphdef, params):
    outs = sampling.generate_text(graphdef, params, mcfg, tok, prompt_ids,
                                  max_new_tokens=max_new_tokens, temperature=0.8, top_k=40,
                                  seed=seed)
    return list(zip(prompts, outs))
  return sample


def build(cfg, workdir: str) -> loop.Stage:
  tok = common.train_or_load_tokenizer(cfg, workdir)
  data = make_pretrain_data(cfg, tok, **common.process_info())
  print(f'[{NAME}] data: {common.format_stats(data.stats)}', flush=True)
  mesh, mcfg = common.mesh_and_model(cfg)
  t = cfg.train
  init_params = None
  if cfg.checkpoint.init_from:  # read only when there is no checkpoint of this run to resume
    init_params = lambda: common.params_from_checkpoint(  # noqa: E731
        cfg.checkpoint.init_from, mesh, mcfg, what=f'{NAME} initial weights')[0]
  return loop.Stage(
      name=NAME, cfg=cfg, train_cfg=t, mcfg=mcfg, mesh=mesh,
      loss_fn=trainer.lm_loss_fn(t.z_loss, cfg.data.segment_ids, t.loss_chunk), data=data,
      init_params=init_params,
      sample_fn=text_sampler(tok, mcfg, list(t.sample_prompts), t.sample_tokens),
      meta={'tokenizer': tok.path, 'data_stats': data.stats,
            'config': cfg.to_json_best_effort()})


def run(cfg, workdir: str) -> loop.Result:
  if cfg.checkpoint.base and not cfg.checkpoint.init_from:
    print(f'[{NAME}] config.checkpoint.base={cfg.checkpoint.base}: the later stages start from '
          'that model; nothing to pretrain.', flush=True)
    return loop.Result(None, None, None, {}, steps_run=0)
  return loop.train(build(cfg, workdir), workdir)
