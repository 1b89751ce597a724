"""The same model in PyTorch `transformers`, holding the same weights: the peer that the
benchmarks (tools/bench_decode.py, tools/bench_train.py) time beside jaxgpt."""

from __future__ import annotations

import jax
import numpy as np

from jaxgpt.hf import weights as hf


def causal_lm(mcfg, params, *, threads: int = 0):
  """(float32 CPU transformers causal LM loaded with `params`, a line naming the versions,
  threads and attention), or None when torch / transformers are not installed (the `hf`
  extra). `threads` > 0 sets torch's intra-op threads."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  fields = hf.hf_config_from_model(mcfg)
  hf_config = transformers.AutoConfig.for_model(fields.pop('model_type'), **fields)
  model = transformers.AutoModelForCausalLM.from_config(hf_config).to(torch.float32)
  host = jax.tree.map(lambda x: np.array(jax.device_get(x), np.float32), params)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in hf.to_hf(host, mcfg).items()},
                        strict=True)
  if threads:
    torch.set_num_threads(threads)
  about = (f'transformers {transformers.__version__}, torch {torch.__version__} '
           f'({torch.get_num_threads()} threads), attention {model.config._attn_implementation}')
  return model, about
