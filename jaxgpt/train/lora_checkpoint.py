"""What a LoRA run's checkpoint holds: its trained parameters only, and a record of the base.

A train state's parameter trees (`state['params']`, or `state[role]['params']` in RL) hold
base and adapters together. A checkpoint stores only `lora.trainable` of each (adapters, a
scalar head) beside the optimizer state, and its meta records, per tree, where the base
came from (a checkpoints directory, 'hf:DIR' or 'gguf:FILE'), the adapter settings and a
fingerprint of the base (`lora.fingerprint`). Resuming puts the restored adapters back on
the base the run loaded and refuses a different base in one line naming both; a reader
of the finished checkpoint (a next stage, inference, the report, export) rebuilds the
model from the recorded base with the adapters merged in (`jaxgpt.stages.common`).
"""

from __future__ import annotations

from jaxgpt.model import lora
from jaxgpt.train import checkpoint as ckpt_lib

META_KEY = 'lora'


def _param_keys(state) -> list[tuple[str, ...]]:
  """Where the state's parameter trees with adapters are: ('params',) or (role, 'params')."""
  keys = []
  if isinstance(state.get('params'), dict):
    keys.append(('params',))
  keys += [(k, 'params') for k, v in state.items()
           if isinstance(v, dict) and isinstance(v.get('params'), dict)]
  return [k for k in keys if lora.has_adapters(_get(state, k))]


def _get(tree, keys):
  for k in keys:
    tree = tree[k]
  return tree


def _with(tree, keys, value):
  if not keys:
    return value
  return dict(tree, **{keys[0]: _with(tree[keys[0]], keys[1:], value)})


def checkpoint_view(state):
  """The state as saved: each parameter tree with adapters cut to its trained part."""
  for keys in _param_keys(state):
    state = _with(state, keys, lora.trainable(_get(state, keys)))
  return state


def record(state, mcfgs: dict, bases: dict) -> dict:
  """The meta entry of a LoRA state: per parameter tree ('params', 'policy/params'), its
  base's source (`bases`, keyed like that), the adapter settings of its model config
  (`mcfgs`) and the base's fingerprint. {} without adapters."""
  out = {}
  for keys in _param_keys(state):
    name = '/'.join(keys)
    mcfg = mcfgs[name]
    out[name] = {'base': bases[name], 'rank': mcfg.lora_rank, 'alpha': mcfg.lora_alpha,
                 'targets': list(mcfg.lora_targets),
                 'fingerprint': lora.fingerprint(lora.frozen(_get(state, keys)))}
  return {META_KEY: out} if out else {}


def on_base(restored, fresh, meta: dict, directory: str, bases: dict):
  """The restored (trained-part) state completed with the base of `fresh` (the state a
  fresh run starts from, on the bases named in `bases`), after checking it is the base the
  checkpoint was trained on."""
  recorded = meta.get(META_KEY, {})
  for keys in _param_keys(fresh):
    name = '/'.join(keys)
    base = lora.frozen(_get(fresh, keys))
    rec = recorded.get(name)
    if rec is None:
      raise ckpt_lib.CheckpointError(
          f'{directory}: the checkpoint records no LoRA base for {name} (written without '
          'LoRA?): set config.lora.rank as in that run, or use another --workdir.')
    if not lora.same_base(rec['fingerprint'], lora.fingerprint(base)):
      raise ckpt_lib.CheckpointError(
          f"{directory}: its LoRA adapters were trained on the base {rec['base']}, not on this "
          f"run's base {bases.get(name)} (the weights differ): start from "
          f"{rec['base']} again (config.checkpoint.init_from), or use another --workdir.")
    restored = _with(restored, keys, lora.combine(base, _get(restored, keys)))
  return restored


def bases_of(meta: dict) -> dict:
  """Each parameter tree's base source, from a run's meta: the LM stages' and the RL
  policy's 'init_from', PPO's value model's 'reward_from'."""
  return {'params': meta.get('init_from'), 'policy/params': meta.get('init_from'),
          'value/params': meta.get('reward_from')}


def has_adapters(state) -> bool:
  return bool(_param_keys(state))
