r"""Prepares local text once as a named TFDS dataset (array_record) for large runs.

  python tools/prepare_corpus.py --paths '/data/web/*.jsonl' --text_field text \
      --name my_corpus --tfds_dir /data/tfds

prints the flags that train on it, e.g. for experiments/gpt2_124m.py:
  --config.data.tfds_name=jaxgpt_text/my_corpus:1.0.0 --config.data.tfds_dir=/data/tfds

`.txt` files are one document each; `.jsonl` files one document per line (field
--text_field). A file more than --max_invalid_utf8 of whose bytes are not UTF-8 is
refused. Any other TFDS dataset prepared with
`download_and_prepare(file_format='array_record')` works the same way.
"""

import re

from absl import app, flags

from jaxgpt import errors
from jaxgpt.data import corpus, text_dataset

_PATHS = flags.DEFINE_string('paths', None, 'Comma-separated globs of .txt / .jsonl files.')
_NAME = flags.DEFINE_string('name', None, 'Dataset name (letters, digits, _ and -).')
_TFDS_DIR = flags.DEFINE_string('tfds_dir', None, 'Where TFDS datasets live.')
_FIELD = flags.DEFINE_string('text_field', 'text', 'JSONL field holding the document.')
_VAL = flags.DEFINE_float('val_fraction', 0.005, 'Share of documents kept for validation.')
_MAX_INVALID = flags.DEFINE_float('max_invalid_utf8', corpus.MAX_INVALID_UTF8,
                                  'Share of a file\'s bytes that may be invalid UTF-8.')
flags.mark_flags_as_required(['paths', 'name', 'tfds_dir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}.')
  if not re.fullmatch(r'[A-Za-z0-9_-]+', _NAME.value):
    raise app.UsageError(f'--name={_NAME.value!r}: use letters, digits, _ and - only.')
  if not 0.0 <= _VAL.value < 1.0:
    raise app.UsageError(f'--val_fraction={_VAL.value} must be in [0, 1).')
  files = corpus.resolve_paths(_PATHS.value, field='--paths')
  cfg = text_dataset.TextCorpusConfig(
      name=_NAME.value, val_fraction=_VAL.value,
      documents=lambda stats: corpus.file_documents(files, _FIELD.value, stats,
                                                    _MAX_INVALID.value))
  builder = text_dataset.prepare_builder(cfg, _TFDS_DIR.value)
  splits = {k: v.num_examples for k, v in builder.info.splits.items()}
  print(f'prepared {builder.data_path}: {splits}; counts {dict(builder.info.metadata)}')
  print(f'train on it with: --config.data.source=tfds '
        f'--config.data.tfds_name=jaxgpt_text/{_NAME.value}:1.0.0 '
        f'--config.data.tfds_dir={_TFDS_DIR.value}')


if __name__ == '__main__':
  errors.run(main, 'prepare_corpus')
