"""The decoder shared by every stage."""

from jaxgpt.model.params import abstract_model, abstract_sharded_params, count_params, fresh_params, init_params, merge
from jaxgpt.model.kv_cache import KVCache
from jaxgpt.model.transformer import ModelConfig, Transformer, init_cache, split_layers

__all__ = ['KVCache', 'ModelConfig', 'Transformer', 'abstract_model', 'abstract_sharded_params', 'count_params', 'fresh_params', 'init_cache',
           'init_params', 'merge', 'split_layers']
