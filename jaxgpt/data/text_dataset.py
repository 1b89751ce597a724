"""Documents -> a TFDS dataset in array_record format, read back without TensorFlow.

`config.data.source`:
* `embedded` / `files`: the documents of `jaxgpt.data.corpus` are written once by
  the `JaxgptText` builder into `config.data.tfds_dir` (default
  `$JAXGPT_CACHE/tfds`, else `~/.cache/jaxgpt/tfds`) as
  `jaxgpt_text/<name>/1.0.0`, where `<name>` is `shakespeare-val<f>` for the
  embedded corpus and `files-<hash>-val<f>` for local files (the hash covers the
  file list, sizes, mtimes and `config.data.text_field`, so an edited file gives a
  new dataset). Later runs reuse it. With `config.data.qa_share = s > 0` (at most
  0.5), web-like Q/A pages of train-split task instances follow the documents
  (`jaxgpt.data.qa_pages`: about s of all characters) and the name gains
  `-qa<s>-<fingerprint of the page generator>` before `-val<f>`, so another share,
  or changed pages, never reuse a prepared dataset.
* `tfds`: any dataset already prepared in array_record format under `tfds_dir`,
  named by `config.data.tfds_name` (e.g. `my_corpus:1.0.0` or
  `my_corpus/config:1.0.0`), documents in field `config.data.text_field`. Prepare
  one once with your own `tfds.core.GeneratorBasedBuilder`:
      MyCorpus(data_dir=TFDS_DIR).download_and_prepare(file_format='array_record')
  It needs a `train` split; `validation` is used when present. If the builder is
  defined in a module (not a script), give it `url_infos = None` when it downloads
  nothing: tfds otherwise looks for URL checksums through `importlib_resources`,
  a package it uses but does not declare. Q/A pages are not added to such a
  dataset: `config.data.qa_share > 0` fails here, naming the field.

Split: a document (Q/A pages included) goes to `validation` when a hash of its
index (its position in the corpus reading order) falls below
`config.data.val_fraction`: stable when the corpus grows and independent of the
shuffle seed. A corpus too small to get any
validation document has no `validation` split (validation batches are then empty).

Only `as_data_source()` is used (random access through array_record), never
`as_dataset()`, so TensorFlow is not needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from absl import logging
import tensorflow_datasets as tfds

from jaxgpt.config import ConfigError
from jaxgpt.data import corpus, qa_pages

TEXT_FIELD = 'text'
SPLITS = ('train', 'validation')

DocumentsFn = Callable[[corpus.CorpusStats], Iterable[str]]


def is_validation(index: int, val_fraction: float) -> bool:
  """Stable pseudo-random split of document `index`."""
  digest = hashlib.blake2b(str(index).encode(), digest_size=8).digest()
  return int.from_bytes(digest, 'big') / 2**64 < val_fraction


@dataclasses.dataclass(kw_only=True)
class TextCorpusConfig(tfds.core.BuilderConfig):
  """One corpus: where its documents come from and how much goes to validation."""
  documents: DocumentsFn = dataclasses.field(default=lambda stats: (), repr=False)
  val_fraction: float = 0.01


class JaxgptText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Plain-text documents, split into train / validation."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Documents as text, hash-based validation split.'}
  # Nothing is downloaded, so there are no URL checksums to look up (looking them up
  # imports `importlib_resources`, which tfds does not declare as a dependency).
  url_infos = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='jaxgpt pretraining documents.',
        features=tfds.features.FeaturesDict({TEXT_FIELD: tfds.features.Text()}),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    """A first pass counts the documents: TFDS rejects an empty split, so a split
    that would get no document (a tiny corpus, val_fraction=0) is left out."""
    del dl_manager
    cfg = self.builder_config
    stats = corpus.CorpusStats()
    n = sum(1 for _ in cfg.documents(stats))
    self.info.metadata.update(stats.asdict())
    n_val = sum(is_validation(i, cfg.val_fraction) for i in range(n))
    if n == 0:
      raise ValueError(f'corpus {cfg.name}: no documents; its {stats.files} file(s) are empty '
                       f'or blank ({stats.skipped_empty} skipped). Check config.data.paths.')
    if n == n_val:
      raise ValueError(
          f'corpus {cfg.name}: {n} documents, none left for training after the '
          f'validation split (config.data.val_fraction={cfg.val_fraction}); add '
          'documents (config.data.paths) or lower the fraction.')
    splits = ('train', 'validation') if n_val else ('train',)
    return {split: self._generate_examples(split) for split in splits}

  def _generate_examples(self, split: str):
    cfg = self.builder_config
    for index, text in enumerate(cfg.documents(corpus.CorpusStats())):
      if is_validation(index, cfg.val_fraction) == (split == 'validation'):
        yield index, {TEXT_FIELD: text}


# -- naming and preparing ------------------------------------------------------

def tfds_dir(config) -> str:
  """config.data.tfds_dir, else <cache>/tfds."""
  return os.path.expanduser(config.data.tfds_dir) or str(corpus.cache_dir() / 'tfds')


def _files_fingerprint(files: Sequence[str], text_field: str) -> str:
  h = hashlib.sha1(text_field.encode())
  for f in files:
    st = os.stat(f)
    h.update(f'{f}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
  return h.hexdigest()[:12]


def qa_share(config) -> float:
  """config.data.qa_share, checked: in [0, 0.5], and 0 for a prepared tfds dataset."""
  share = qa_pages.check_share(config.data.qa_share)
  if share > 0 and config.data.source not in ('embedded', 'files'):
    raise ConfigError(
        f'config.data.qa_share={share:g}: Q/A pages are added to the embedded or files '
        f"corpora only, not to config.data.source='{config.data.source}' (a dataset "
        'prepared elsewhere); set config.data.qa_share=0.')
  return share


def _with_pages(documents: DocumentsFn, share: float) -> DocumentsFn:
  return lambda stats: qa_pages.with_pages(documents(stats), share, stats)


def corpus_config(config) -> TextCorpusConfig:
  """The builder config for config.data.source = embedded | files."""
  d = config.data
  if not 0.0 <= d.val_fraction < 1.0:
    raise ValueError(f'config.data.val_fraction={d.val_fraction} must be in [0, 1).')
  if d.source == 'embedded':
    name, documents = 'shakespeare', corpus.shakespeare_documents
  elif d.source == 'files':
    files = corpus.resolve_paths(d.paths)
    name = f'files-{_files_fingerprint(files, d.text_field)}'
    documents = lambda stats: corpus.file_documents(  # noqa: E731
        files, d.text_field, stats, d.max_invalid_utf8)
  else:
    raise ValueError(f"config.data.source='{d.source}' has no builder; "
                     'expected embedded or files.')
  share = qa_share(config)
  if share > 0:
    name = f'{name}-qa{share:g}-{qa_pages.fingerprint()}'
    documents = _with_pages(documents, share)
  return TextCorpusConfig(name=f'{name}-val{d.val_fraction:g}', documents=documents,
                          val_fraction=d.val_fraction)


@contextlib.contextmanager
def _quiet_tfds():
  """No progress bars or 'custom data configuration' warnings in training logs."""
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=g-import-not-at-top
  bars, verbosity = getattr(tqdm_utils, '_active', True), logging.get_verbosity()
  tfds.display_progress_bar(False)
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    tfds.display_progress_bar(bars)
    logging.set_verbosity(verbosity)


def prepare_builder(cfg: TextCorpusConfig, data_dir: str) -> JaxgptText:
  """Writes the documents of `cfg` as array_record once; returns the prepared builder.

  A split that gets no document is left out (see `JaxgptText._split_generators`).
  """
  with _quiet_tfds():
    builder = JaxgptText(config=cfg, data_dir=data_dir)
    if builder.data_path.exists():
      return builder
    try:
      builder.download_and_prepare(file_format='array_record')
    except Exception:  # pylint: disable=broad-except
      # Another process (multi-host, shared disk) finished the same dataset first.
      builder = JaxgptText(config=cfg, data_dir=data_dir)
      if not builder.data_path.exists():
        raise
  return builder


def prepare(config) -> JaxgptText:
  """The prepared corpus of config.data.source = embedded | files."""
  return prepare_builder(corpus_config(config), tfds_dir(config))


# -- reading -------------------------------------------------------------------

@dataclasses.dataclass
class TextSplits:
  """Random-access sources for both splits, the text field and prepare-time counts."""
  train: Sequence[dict[str, Any]]
  validation: Sequence[dict[str, Any]]
  text_field: str
  stats: dict[str, int]
  name: str


def _open_prepared(config) -> tfds.core.DatasetBuilder:
  name, root = config.data.tfds_name, tfds_dir(config)
  if not name:
    raise ValueError('config.data.source=tfds needs config.data.tfds_name '
                     "(e.g. 'my_corpus:1.0.0').")
  try:
    builder = tfds.builder(name, data_dir=root)
  except Exception as e:  # tfds lists every known dataset; keep the message short
    raise ValueError(
        f"config.data.tfds_name='{name}': no such dataset under config.data.tfds_dir="
        f"{root} ({type(e).__name__}). Prepare it once with "
        "builder.download_and_prepare(file_format='array_record').") from None
  if not builder.data_path.exists():
    raise ValueError(
        f"config.data.tfds_name='{name}' is not prepared under {builder.data_path}; "
        "run its builder's download_and_prepare(file_format='array_record') with "
        f'data_dir={root}.')
  return builder


def load_splits(config) -> TextSplits:
  """Train/validation sources for config.data.source (prepares on first use)."""
  qa_share(config)
  if config.data.source == 'tfds':
    builder = _open_prepared(config)
    field = config.data.text_field
    splits = set(builder.info.splits.keys())
  else:
    builder = prepare(config)
    field = TEXT_FIELD
    splits = set(builder.info.splits.keys())
  if 'train' not in splits:
    raise ValueError(f'dataset {builder.info.full_name} has no train split '
                     f'(it has {sorted(splits)}).')
  train = builder.as_data_source('train')
  validation = builder.as_data_source('validation') if 'validation' in splits else []
  features = builder.info.features
  if features is not None and field not in features.keys():
    raise ValueError(
        f"config.data.text_field='{field}' is not a feature of {builder.info.full_name}; "
        f'it has {sorted(features.keys())}.')
  stats = {k: int(v) for k, v in dict(builder.info.metadata or {}).items()
           if isinstance(v, (int, float))}
  stats['train_documents'] = len(train)
  stats['val_documents'] = len(validation)
  return TextSplits(train=train, validation=validation, text_field=field, stats=stats,
                    name=builder.info.full_name)
