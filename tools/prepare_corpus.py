r"""Prepares local text once as a named TFDS dataset (array_record) for large runs.

  python tools/prepare_corpus.py --paths '/data/web/*.jsonl' --text_field text \
      --name my_corpus --tfds_dir /data/tfds

prints the flags that train on it, e.g. for experiments/gpt2_124m.py:
  --config.data.tfds_name=jaxgpt_text/my_corpus:1.0.0 --config.data.tfds_dir=/data/tfds

`.txt` files are one document each; `.jsonl` files one document per line (field
--text_field). Any other TFDS dataset prepared with
`download_and_prepare(file_format='array_record')` works the same way.
"""

from absl import app, flags

from jaxgpt.data import corpus, text_dataset

_PATHS = flags.DEFINE_string('paths', None, 'Comma-separated globs of .txt / .jsonl files.')
_NAME = flags.DEFINE_string('name', None, 'Dataset name (letters, digits, _ and -).')
_TFDS_DIR = flags.DEFINE_string('tfds_dir', None, 'Where TFDS datasets live.')
_FIELD = flags.DEFINE_string('text_field', 'text', 'JSONL field holding the document.')
_VAL = flags.DEFINE_float('val_fraction', 0.005, 'Share of documents kept for validation.')
flags.mark_flags_as_required(['paths', 'name', 'tfds_dir'])


def main(argv):
  del argv
  files = corpus.resolve_paths(_PATHS.value)
  cfg = text_dataset.TextCorpusConfig(
      name=_NAME.value, val_fraction=_VAL.value,
      documents=lambda stats: corpus.file_documents(files, _FIELD.value, stats))
  builder = text_dataset.prepare_builder(cfg, _TFDS_DIR.value)
  splits = {k: v.num_examples for k, v in builder.info.splits.items()}
  print(f'prepared {builder.data_path}: {splits}; counts {dict(builder.info.metadata)}')
  print(f'train on it with: --config.data.source=tfds '
        f'--config.data.tfds_name=jaxgpt_text/{_NAME.value}:1.0.0 '
        f'--config.data.tfds_dir={_TFDS_DIR.value}')


if __name__ == '__main__':
  app.run(main)
