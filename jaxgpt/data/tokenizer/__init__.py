"""Tokenizers: jaxgpt's SentencePiece BPE, and the tokenizers that come with published models.

`load(path)` opens any of them; `check_vocab` checks one against the model's vocabulary.
"""

from jaxgpt.data.tokenizer.hf_tokenizer import load
from jaxgpt.data.tokenizer.sentencepiece_tokenizer import (MIN_VOCAB_SIZE, Tokenizer, check_vocab,
                                                           train_tokenizer)
from jaxgpt.data.tokenizer.special import ROLES, SPECIAL_TOKENS

__all__ = ['MIN_VOCAB_SIZE', 'ROLES', 'SPECIAL_TOKENS', 'Tokenizer', 'check_vocab', 'load',
           'train_tokenizer']
