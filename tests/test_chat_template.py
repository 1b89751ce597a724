"""A model's own chat template: rendered and tokenized as transformers' apply_chat_template
does it (ChatML, Llama 3 and Gemma-style templates), exact loss masks, stop ids, and
the chat_template='jaxgpt' switch."""

import pytest

tokenizers = pytest.importorskip('tokenizers')
transformers = pytest.importorskip('transformers')

from jaxgpt.data import chat, chat_template  # noqa: E402
from jaxgpt.data.tokenizer import hf_tokenizer  # noqa: E402

# Templates in the three common layouts, written for these tests. The ChatML one opens
# with a default system prompt (as SmolLM2's and Qwen's do); the Llama 3 one trims
# contents and writes the BOS itself; the Gemma one folds the system message into the
# first user turn, names the assistant 'model' and refuses turns out of order.
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
GEMMA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first = messages[0]['content'] + '\n\n' %}{% set rest = messages[1:] %}"
    "{% else %}{% set first = '' %}{% set rest = messages %}{% endif %}"
    "{% for message in rest %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")

LAYOUTS = {
    'chatml': (CHATML, ['<|endoftext|>', '<|im_start|>', '<|im_end|>'],
               dict(eos_token='<|im_end|>', bos_token='<|im_start|>', pad_token='<|endoftext|>'),
               '<|im_end|>'),
    'llama3': (LLAMA3, ['<|begin_of_text|>', '<|end_of_text|>', '<|start_header_id|>',
                        '<|end_header_id|>', '<|eot_id|>'],
               dict(bos_token='<|begin_of_text|>', eos_token='<|eot_id|>'), '<|eot_id|>'),
    'gemma': (GEMMA, ['<pad>', '<eos>', '<bos>', '<start_of_turn>', '<end_of_turn>'],
              dict(bos_token='<bos>', eos_token='<eos>', pad_token='<pad>'), '<end_of_turn>'),
}

CONV = [
    {'role': 'system', 'content': 'Answer in one word.'},
    {'role': 'user', 'content': 'What is the capital of France?'},
    {'role': 'assistant', 'content': 'Paris.'},
    {'role': 'user', 'content': "Is 'level' a palindrome? Say <|im_end|> then."},
    {'role': 'assistant', 'content': 'Yes, it reads the same both ways.'},
]
_TRAIN_TEXT = [m['content'] for m in CONV] * 20 + [
    'The quick brown fox jumps over the lazy dog, 0123456789.', 'system user assistant model',
    'You are a helpful assistant.'] * 20


@pytest.fixture(scope='module', params=sorted(LAYOUTS))
def model_dir(request, tmp_path_factory):
  """A small byte-level BPE tokenizer with the layout's special tokens and template,
  saved by transformers as a model's tokenizer directory."""
  template, specials, names, _ = LAYOUTS[request.param]
  tk = tokenizers.Tokenizer(tokenizers.models.BPE())
  tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = tokenizers.decoders.ByteLevel()
  tk.train_from_iterator(_TRAIN_TEXT, tokenizers.trainers.BpeTrainer(
      vocab_size=400, special_tokens=specials,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, chat_template=template,
                                              **names)
  out = str(tmp_path_factory.mktemp(request.param))
  fast.save_pretrained(out)
  return request.param, out


def test_rendering_equals_transformers_apply_chat_template(model_dir):
  layout, path = model_dir
  ref = transformers.AutoTokenizer.from_pretrained(path)
  tok = hf_tokenizer.load(path)
  fmt = tok.chat
  assert isinstance(fmt, chat_template.TemplateFormat)
  cases = [CONV, CONV[1:], CONV[:2], CONV[1:4]]
  for messages in cases:
    for gen in (False, True):
      if layout == 'gemma' and gen != (messages[-1]['role'] == 'user'):
        continue  # the template refuses a user turn after a user turn
      want_text = ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
      want_ids = ref.apply_chat_template(messages, add_generation_prompt=gen,
                                         return_dict=True)['input_ids']
      assert fmt.render_text(messages, add_generation_prompt=gen) == want_text
      assert fmt.render(messages, add_generation_prompt=gen)[0] == want_ids
  assert fmt.prompt(CONV[:4]) == ref.apply_chat_template(
      CONV[:4], add_generation_prompt=True, return_dict=True)['input_ids']


def test_loss_mask_covers_assistant_content_and_end_of_turn(model_dir):
  layout, path = model_dir
  tok = hf_tokenizer.load(path)
  fmt = tok.chat
  eot = tok.token_id(LAYOUTS[layout][3])
  assert fmt.end_of_turn_id == eot and fmt.stop_ids[0] == eot
  ids, mask = fmt.render(CONV)
  assert ids == tok.encode(fmt.render_text(CONV))  # one render of the whole conversation
  runs, current = [], []
  for t, m in zip(ids + [None], mask + [0]):
    if m:
      current.append(t)
    elif current:
      runs.append(current)
      current = []
  assert [tok.decode(r) for r in runs] == [
      m['content'] + LAYOUTS[layout][3] for m in CONV if m['role'] == 'assistant']
  # A reply splits off where the sampler starts; the generation prompt is never learned.
  context, header, reply = fmt.split_reply(CONV[:4], CONV[4]['content'])
  assert context + header == fmt.prompt(CONV[:4])
  assert reply == runs[-1] and header
  assert not any(fmt.render(CONV[:4], add_generation_prompt=True)[1][-len(header):])
  assert fmt.split_reply(CONV[:4], CONV[4]['content'], finished=False)[2] == runs[-1][:-1]
  text, finished = fmt.reply(reply + tok.encode('junk after the stop'))
  assert (text, finished) == (CONV[4]['content'], True)


def test_jaxgpt_choice_and_template_errors(model_dir, tmp_path):
  _, path = model_dir
  tok = hf_tokenizer.load(path, chat_template='jaxgpt')
  with pytest.raises(ValueError, match="'<|end|>'"):
    tok.chat.render(CONV)  # jaxgpt's format needs its tokens, which this tokenizer lacks
  grown, added = hf_tokenizer.with_chat_tokens(tok)
  assert '<|end|>' in added and isinstance(grown.chat, chat.JaxgptFormat)
  with pytest.raises(ValueError, match='chat_template'):
    hf_tokenizer.load(path, chat_template='chatml')
  # With the model's own template only the readout token is added, and a save keeps the
  # template and the stop ids.
  model_tok, added = hf_tokenizer.with_chat_tokens(hf_tokenizer.load(path))
  assert added == ['<|reward|>']
  again = hf_tokenizer.load(hf_tokenizer.save(model_tok, str(tmp_path / 'saved'),
                                              source_dir=path))
  assert again.chat.render(CONV) == model_tok.chat.render(CONV)
  assert again.reward_id == model_tok.vocab_size - 1
  with pytest.raises(chat_template.TemplateError, match='not valid jinja'):
    chat_template.TemplateFormat(again, '{% for m in messages %}')
