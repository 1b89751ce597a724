"""Safetensors files of a Hugging Face model directory, read and written a tensor at a time.

`SafetensorsReader` opens `model.safetensors`, or the shards `model.safetensors.index.json`
lists, and hands out one tensor per call (numpy, bfloat16 through ml_dtypes), checking its
shape first. Each read opens and closes its file: the memory map a read touches (and the
resident pages it brings in) lives only while that one tensor is copied out.
`ShardWriter` writes tensors into files of at most `max_shard_bytes` (and the index when
there are several), keeping one file's worth in memory. Every failure names the file and
the tensor.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxgpt.hf.weights import ConversionError, check_all_used, check_shape

INDEX = 'model.safetensors.index.json'
SINGLE = 'model.safetensors'
_FLOAT_DTYPES = ('F64', 'F32', 'F16', 'BF16')


def _open(path):
  try:
    return safe_open(path, framework='numpy')
  except (SafetensorError, OSError) as e:
    raise ConversionError(f'{path}: not a readable safetensors file ({e}); it may be '
                          'truncated or corrupted: copy it again.') from e


class SafetensorsReader:
  """`hf.Read` over the safetensors files of a model directory."""

  def __init__(self, directory: str):
    self.directory = os.path.abspath(directory)
    index_path = os.path.join(self.directory, INDEX)
    if os.path.exists(index_path):
      try:
        with open(index_path, encoding='utf-8') as f:
          weight_map = dict(json.load(f)['weight_map'])
      except (ValueError, KeyError, TypeError) as e:
        raise ConversionError(f'{index_path}: not a safetensors index (a JSON object with '
                              f"a 'weight_map'): {e}") from e
      self.file_of = {k: os.path.join(self.directory, v) for k, v in weight_map.items()}
      for path in sorted(set(self.file_of.values())):
        if not os.path.exists(path):
          raise ConversionError(f'{index_path} lists {os.path.basename(path)}, which is not '
                                f'in {self.directory}.')
      listed = self.file_of
      self.file_of = {}
      for path in sorted(set(listed.values())):
        with _open(path) as f:
          held = set(f.keys())
        for key in held:
          self.file_of[key] = path
        missing = sorted(k for k, p in listed.items() if p == path and k not in held)
        if missing:
          raise ConversionError(f'{index_path} puts tensor {missing[0]!r} in '
                                f'{os.path.basename(path)}, which does not hold it.')
    else:
      files = sorted(glob.glob(os.path.join(self.directory, '*.safetensors')))
      if not files:
        found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(self.directory, '*')))
        raise ConversionError(
            f'{self.directory} has no *.safetensors weights (found {found[:8]}); save the '
            'model with save_pretrained(..., safe_serialization=True).')
      self.file_of = {}
      for path in files:
        with _open(path) as f:
          for key in f.keys():
            self.file_of[key] = path
    self.used: set[str] = set()

  def keys(self):
    return self.file_of.keys()

  def __contains__(self, key):
    return key in self.file_of

  def __call__(self, key: str, shape) -> np.ndarray:
    if key not in self.file_of:
      raise ConversionError(f"{self.directory}: no tensor '{key}' in its safetensors files; "
                            'is it a checkpoint of this architecture and size (config.json)?')
    path = self.file_of[key]
    where = f'{os.path.basename(path)} tensor'
    try:
      with _open(path) as f:
        view = f.get_slice(key)
        dtype = view.get_dtype()
        if dtype not in _FLOAT_DTYPES:
          raise ConversionError(f"{where} '{key}' has dtype {dtype}; expected one of "
                                f'{_FLOAT_DTYPES} (quantised checkpoints are not supported).')
        check_shape(key, tuple(view.get_shape()), shape, where)
        x = np.asarray(view[...])  # safetensors copies the bytes out of its memory map
    except SafetensorError as e:
      raise ConversionError(f"{path}: cannot read tensor '{key}' ({e}); the file may be "
                            'truncated or corrupted.') from e
    self.used.add(key)
    return x

  def check_all_used(self) -> None:
    check_all_used(self.file_of.keys(), self.used, f'{self.directory}: the jaxgpt model')


class ShardWriter:
  """Writes tensors to `out_dir` as model.safetensors, or as numbered shards of at most
  `max_shard_bytes` each plus model.safetensors.index.json."""

  def __init__(self, out_dir: str, max_shard_bytes: int):
    self.out_dir = out_dir
    self.max_shard_bytes = max_shard_bytes
    self._pending: dict[str, np.ndarray] = {}
    self._pending_bytes = 0
    self._files: list[tuple[str, list[str]]] = []  # (temporary name, keys)
    self.total_bytes = 0
    os.makedirs(out_dir, exist_ok=True)

  def add(self, key: str, x: np.ndarray) -> None:
    if self._pending and self._pending_bytes + x.nbytes > self.max_shard_bytes:
      self._flush()
    self._pending[key] = np.ascontiguousarray(x)
    self._pending_bytes += x.nbytes
    self.total_bytes += x.nbytes

  def _flush(self) -> None:
    name = f'.shard-{len(self._files):05d}.tmp'
    save_file(self._pending, os.path.join(self.out_dir, name), metadata={'format': 'pt'})
    self._files.append((name, list(self._pending)))
    self._pending, self._pending_bytes = {}, 0

  def close(self) -> list[str]:
    """Renames the files to their final names; returns them."""
    if self._pending or not self._files:
      self._flush()
    n = len(self._files)
    names = [SINGLE] if n == 1 else [f'model-{i + 1:05d}-of-{n:05d}.safetensors'
                                     for i in range(n)]
    weight_map = {}
    for (tmp, keys), name in zip(self._files, names):
      os.replace(os.path.join(self.out_dir, tmp), os.path.join(self.out_dir, name))
      weight_map.update({k: name for k in keys})
    index = os.path.join(self.out_dir, INDEX)
    if n > 1:
      with open(index, 'w', encoding='utf-8') as f:
        json.dump({'metadata': {'total_size': self.total_bytes}, 'weight_map': weight_map}, f,
                  indent=1)
    elif os.path.exists(index):
      os.remove(index)
    return names
