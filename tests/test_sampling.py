"""KV-cache sampler: equals full recomputation, exact log-probs, filtering support,
per-row stopping, seeding and padding independence, on sharded CPU meshes.

The references here (a full forward per step, the training forward's log-probs) run
on one device with host parameters, so they also check the sharded program.
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

import helpers
from jaxgpt import losses, sharding
from jaxgpt import model as model_lib
from jaxgpt.inference import sampling, token_choice
from jaxgpt.inference.sampling import SamplingConfig
from jaxgpt.model import kv_cache

repeat_rows = kv_cache.repeat_rows

B, P, N = 4, 8, 8
LENGTHS = np.array([8, 3, 5, 1], np.int32)
SETUPS = [('llama', (2, 2, 2)), ('gpt2', (1, 2, 4)), ('llama', (1, 2, 4)), ('gpt2', (2, 2, 2))]
MAIN_SETUPS = SETUPS[:2]


def setup_id(s):
  return f"{s[0]}-{'x'.join(map(str, s[1]))}"


def tiny(family, mesh_shape=(1, 1, 1)):
  cfg = helpers.tiny_config(family, mesh=mesh_shape)
  cfg.model.init_std = 0.3  # peaked next-token distributions: top-p cuts, greedy has margins
  return cfg


@functools.cache
def host_params(family):
  """One random init per family, on the host (every mesh gets the same weights)."""
  mcfg = model_lib.ModelConfig.from_config(tiny(family))
  return jax.device_get(jax.jit(lambda: model_lib.fresh_params(mcfg, 0))())


class Setup:
  def __init__(self, family, mesh_shape):
    cfg = tiny(family, mesh_shape)
    self.family = family
    self.mesh = sharding.make_mesh(cfg, helpers.devices_for(mesh_shape))
    self.mcfg = model_lib.ModelConfig.from_config(cfg)
    self.graphdef, abstract, logical = model_lib.abstract_model(self.mcfg)
    param_sh = sharding.param_shardings(abstract, logical, self.mesh, self.mcfg.rules)
    self.host_params = host_params(family)
    self.params = jax.device_put(self.host_params, param_sh)  # as the trainer holds them
    rng = np.random.default_rng(1)
    self.prompts = rng.integers(1, 256, size=(B, P)).astype(np.int32)
    # Right padding with junk (not a pad id): it must never influence a row.
    self.prompts[np.arange(P)[None, :] >= LENGTHS[:, None]] = 255

  def sample(self, settings, seed=0, prompts=None, lengths=None):
    out = sampling.sample(self.graphdef, self.params, self.mcfg,
                          self.prompts if prompts is None else prompts,
                          LENGTHS if lengths is None else lengths,
                          jax.random.PRNGKey(seed), settings)
    return jax.device_get(out)


@functools.cache
def get_setup(family, mesh_shape):
  return Setup(family, mesh_shape)


@functools.cache
def full_forward(family):
  """Single-device full forward (no cache): logits (b, t, v) of model(tokens)."""
  graphdef = model_lib.abstract_model(model_lib.ModelConfig.from_config(tiny(family)))[0]
  return jax.jit(lambda params, tokens: model_lib.merge(graphdef, params)(tokens))


@functools.cache
def greedy(family, mesh_shape):
  return get_setup(family, mesh_shape).sample(SamplingConfig(max_new_tokens=N, temperature=0.0))


def response_sequences(s, out):
  """(B, P+N) prompt[:len] + response, right-padded, as the training forward sees it."""
  seq = np.zeros((B, P + N), np.int32)
  for b in range(B):
    n = int(out.lengths[b])
    seq[b, :LENGTHS[b]] = s.prompts[b, :LENGTHS[b]]
    seq[b, LENGTHS[b]:LENGTHS[b] + n] = out.tokens[b, :n]
  return seq


# -- KV cache == full recomputation ---------------------------------------------------------


@pytest.mark.parametrize('setup', SETUPS, ids=setup_id)
def test_greedy_matches_full_recompute(setup):
  s = get_setup(*setup)
  out = greedy(*setup)
  fwd = full_forward(s.family)
  seq = np.zeros((B, P + N), np.int32)
  seq[:, :P] = s.prompts
  ref_tokens = np.zeros((B, N), np.int32)
  ref_logprobs = np.zeros((B, N), np.float32)
  for i in range(N):  # naive: the whole forward again for every new token
    logp = np.asarray(jax.nn.log_softmax(fwd(s.host_params, seq), axis=-1))
    for b in range(B):
      pos = LENGTHS[b] + i - 1
      ref_tokens[b, i] = np.argmax(logp[b, pos])
      ref_logprobs[b, i] = logp[b, pos, ref_tokens[b, i]]
      seq[b, pos + 1] = ref_tokens[b, i]
  np.testing.assert_array_equal(out.tokens, ref_tokens)
  np.testing.assert_allclose(out.logprobs, ref_logprobs, atol=2e-5)
  np.testing.assert_array_equal(out.response_mask, 1)
  np.testing.assert_array_equal(out.lengths, N)
  assert not out.finished.any()


# -- log-probs == training forward, and draws inside the support -----------------------------

SAMPLED = {
    'temperature': SamplingConfig(max_new_tokens=N, temperature=1.3),
    'topk-topp': SamplingConfig(max_new_tokens=N, temperature=0.7, top_k=10, top_p=0.9),
    'topp': SamplingConfig(max_new_tokens=N, temperature=1.0, top_p=0.5),
}


@pytest.mark.parametrize('setup,name', [(SETUPS[0], 'temperature'), (SETUPS[0], 'topp'),
                                        (SETUPS[1], 'topk-topp')],
                         ids=lambda x: setup_id(x) if isinstance(x, tuple) else x)
def test_logprobs_match_training_forward(setup, name):
  settings = SAMPLED[name]
  s = get_setup(*setup)
  out = s.sample(settings, seed=3)
  seq = response_sequences(s, out)
  logits = full_forward(s.family)(s.host_params, seq)
  ref = np.asarray(losses.token_log_probs(logits[:, :-1], jnp.asarray(seq[:, 1:])))
  logits = np.asarray(logits, np.float64)
  for b in range(B):
    for j in range(N):
      pos = LENGTHS[b] - 1 + j
      np.testing.assert_allclose(out.logprobs[b, j], ref[b, pos], atol=2e-5)
      # The drawn token lies in the top-k / top-p support of the tempered logits.
      z = logits[b, pos] / settings.temperature
      tok = out.tokens[b, j]
      if settings.top_k:
        assert (z > z[tok] + 1e-6).sum() < settings.top_k
      if settings.top_p < 1:
        p = np.exp(z - z.max())
        if settings.top_k:
          p[z < np.sort(z)[-settings.top_k] - 1e-6] = 0
        p /= p.sum()
        assert p[p > p[tok] * (1 + 1e-5)].sum() < settings.top_p + 1e-5
  np.testing.assert_array_equal(out.response_mask, 1)  # no stop ids
  # Tempered or filtered sampling draws tokens greedy would not.
  assert (out.tokens != greedy(*setup).tokens).any()


def test_same_seed_same_output_different_seed_different():
  s = get_setup(*MAIN_SETUPS[0])
  settings = SAMPLED['temperature']
  a = s.sample(settings, seed=7)
  misses = sampling._jitted.cache_info().misses
  b, c = s.sample(settings, seed=7), s.sample(settings, seed=8)
  assert sampling._jitted.cache_info().misses == misses  # the jitted sampler is reused
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.logprobs, b.logprobs)
  assert (a.tokens != c.tokens).any()


# -- the filtering function on crafted logits ------------------------------------------------


@functools.partial(jax.jit, static_argnums=(1, 2))
def _filter(logits, top_k, top_p):
  return sampling.filter_logits(logits, top_k, top_p)


def support(logits, top_k=0, top_p=1.0):
  out = np.asarray(_filter(jnp.asarray(logits, jnp.float32), top_k, top_p))
  return [set(np.flatnonzero(np.isfinite(row)).tolist()) for row in out]


def test_top_k_support_and_ties():
  logits = np.array([[1., 3., 3., 2., 3., 0.],
                     [5., 4., 3., 2., 1., 0.],
                     [0., 0., 0., 0., 0., 0.]])
  assert support(logits, top_k=2) == [{1, 2}, {0, 1}, {0, 1}]  # ties -> lower ids, exactly k
  assert support(logits, top_k=4) == [{1, 2, 3, 4}, {0, 1, 2, 3}, {0, 1, 2, 3}]
  assert support(logits, top_k=1) == [{1}, {0}, {0}]
  assert support(logits, top_k=0) == [set(range(6))] * 3
  assert support(logits, top_k=99) == [set(range(6))] * 3
  kept = np.asarray(_filter(jnp.asarray(logits, jnp.float32), 2, 1.0))
  np.testing.assert_array_equal(kept[1, :2], logits[1, :2])  # survivors keep their values


def test_top_p_support_and_ties():
  probs = np.array([[0.05, 0.5, 0.2, 0.25],
                    [0.25, 0.25, 0.25, 0.25],
                    [0.4, 0.3, 0.2, 0.1]])
  logits = np.log(probs)
  # Smallest prefix of (prob desc, id asc) whose mass reaches p; the top token always stays.
  assert support(logits, top_p=0.35) == [{1}, {0, 1}, {0}]
  assert support(logits, top_p=0.6) == [{1, 3}, {0, 1, 2}, {0, 1}]
  assert support(logits, top_p=0.8) == [{1, 2, 3}, {0, 1, 2, 3}, {0, 1, 2}]
  assert support(logits, top_p=1e-6) == [{1}, {0}, {0}]
  assert support(logits, top_p=1.0) == [set(range(4))] * 3
  # top-p acts on the distribution renormalised over the top-k survivors:
  # over {0, 1} of row 3, token 0 has 0.4/0.7 = 0.57 >= 0.55, so token 1 goes.
  assert support(logits[2:], top_k=2, top_p=0.55) == [{0}]
  assert support(logits[2:], top_p=0.55) == [{0, 1}]


@pytest.mark.parametrize('top_k,top_p,expected', [(3, 1.0, {1, 2, 4}), (0, 0.7, {1, 2}),
                                                   (3, 0.9, {1, 2, 4})])
def test_draws_never_leave_the_support(top_k, top_p, expected):
  probs = np.array([0.02, 0.4, 0.3, 0.03, 0.2, 0.05])
  n = 4000
  logits = jnp.asarray(np.log(np.tile(probs, (n, 1))), jnp.float32)
  settings = SamplingConfig(max_new_tokens=1, temperature=1.0, top_k=top_k, top_p=top_p)
  tokens, logprobs, entropy = jax.jit(lambda l, k: sampling.next_token(l, k, settings))(
      logits, jax.random.PRNGKey(0))
  assert entropy is None  # only with SamplingConfig(entropy=True)
  tokens = np.asarray(tokens)
  assert set(tokens.tolist()) == expected  # inside the support, and all of it reached
  renorm = np.zeros_like(probs)
  renorm[list(expected)] = probs[list(expected)]
  renorm /= renorm.sum()
  freq = np.bincount(tokens, minlength=len(probs)) / n
  np.testing.assert_allclose(freq, renorm, atol=0.03)
  # Log-probs are of the unfiltered distribution.
  np.testing.assert_allclose(np.asarray(logprobs), np.log(probs)[tokens], rtol=1e-5)


def test_inverse_cdf_draw_follows_the_distribution_across_vocabulary_blocks():
  """`draw` over a vocabulary of 2.5 blocks: the frequencies are the probabilities, mass
  in several blocks and ids of probability 0 (-inf) at a block's end and the
  vocabulary's are never drawn."""
  v, n = 2 * token_choice.BLOCK + 128, 60000
  probs = np.zeros(v)
  probs[[0, 255, 300, 511, 600]] = [0.1, 0.25, 0.3, 0.15, 0.2]
  logits = jnp.asarray(np.tile(np.log(np.where(probs > 0, probs, 1.0)), (n, 1)), jnp.float32)
  logits = jnp.where(jnp.asarray(probs > 0)[None, :], logits, -jnp.inf)
  tokens = np.asarray(jax.jit(token_choice.draw)(jax.random.PRNGKey(0), logits))
  assert probs[tokens].min() > 0
  np.testing.assert_allclose(np.bincount(tokens, minlength=v) / n, probs, atol=0.01)


def test_log_probs_and_entropy_at_another_temperature():
  """logprob_temperature = T: the log-prob and entropy of softmax(logits / T), unfiltered,
  whatever top-k cut the draw."""
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 3, jnp.float32))
  settings = SamplingConfig(max_new_tokens=1, temperature=0.5, top_k=2,
                            logprob_temperature=0.5, entropy=True)
  tokens, logprobs, entropy = sampling.next_token(logits, jax.random.PRNGKey(0), settings)
  want_v = np.asarray(jax.nn.log_softmax(logits / 0.5, axis=-1))
  np.testing.assert_allclose(logprobs, want_v[0][np.asarray(tokens)], rtol=1e-5)
  np.testing.assert_allclose(entropy, -(np.exp(want_v) * want_v).sum(-1), rtol=1e-5)
  with pytest.raises(ValueError, match='logprob_temperature'):
    SamplingConfig(max_new_tokens=1, logprob_temperature=0.0)


# -- stopping, padding, host convenience ----------------------------------------------------


def pick_stop_id(tokens):
  """A token that some row emits first at a step >= 1 (else 0) and some row never emits."""
  rows = range(tokens.shape[0])
  for min_step in (1, 0):
    for b in rows:
      for j in range(min_step, N - 1):
        t = tokens[b, j]
        if t not in tokens[b, :j] and any(t not in tokens[r] for r in rows):
          return int(t)
  raise AssertionError('no usable stop id in greedy output')


def expected_with_stops(tokens, logprobs, stop_ids, pad_id):
  exp_tok = np.full_like(tokens, pad_id)
  exp_lp = np.zeros_like(logprobs)
  exp_mask = np.zeros_like(tokens)
  for b in range(B):
    hits = [j for j in range(N) if tokens[b, j] in stop_ids]
    n = hits[0] + 1 if hits else N
    exp_tok[b, :n], exp_lp[b, :n], exp_mask[b, :n] = tokens[b, :n], logprobs[b, :n], 1
  return exp_tok, exp_lp, exp_mask


@pytest.mark.parametrize('setup', MAIN_SETUPS, ids=setup_id)
def test_rows_stop_independently(setup):
  s = get_setup(*setup)
  g = greedy(*setup)
  stop = pick_stop_id(g.tokens)
  out = s.sample(SamplingConfig(max_new_tokens=N, temperature=0.0, stop_ids=(stop,), pad_id=-1))
  exp_tok, exp_lp, exp_mask = expected_with_stops(g.tokens, g.logprobs, (stop,), -1)
  stopped = exp_mask.sum(1) < N
  assert stopped.any() and not stopped.all()  # some rows stop, the others run on
  np.testing.assert_array_equal(out.tokens, exp_tok)
  np.testing.assert_array_equal(out.response_mask, exp_mask)
  np.testing.assert_allclose(out.logprobs, exp_lp, atol=1e-6)
  np.testing.assert_array_equal(out.lengths, exp_mask.sum(1))
  np.testing.assert_array_equal(out.finished, stopped)


def test_all_rows_stopping_ends_the_loop():
  """Every row's first greedy token is a stop id: one token each, the rest padding."""
  setup = MAIN_SETUPS[0]
  s, g = get_setup(*setup), greedy(*setup)
  stops = tuple(sorted(set(g.tokens[:, 0].tolist())))
  out = s.sample(SamplingConfig(max_new_tokens=N, temperature=0.0, stop_ids=stops, pad_id=0))
  np.testing.assert_array_equal(out.lengths, 1)
  assert out.finished.all()
  np.testing.assert_array_equal(out.tokens[:, 0], g.tokens[:, 0])
  np.testing.assert_array_equal(out.tokens[:, 1:], 0)
  np.testing.assert_array_equal(out.logprobs[:, 1:], 0.0)


class ByteTokenizer:
  """Stand-in tokenizer: one id per latin-1 character."""
  pad_id = 0
  eot_id = 1
  end_of_turn_id = 2

  def encode(self, text):
    return [ord(c) for c in text]

  def decode(self, ids):
    return ''.join(chr(i) for i in ids)


def test_generate_text_pads_and_stops():
  """Prompts of different lengths, padded to a 16-token bucket and a batch the mesh
  divides: same greedy tokens as the (B, 8) batch, text cut before the stop token."""
  setup = SETUPS[1]
  s, g = get_setup(*setup), greedy(*setup)
  stop = pick_stop_id(g.tokens[:3])
  prompts = [s.prompts[b, :LENGTHS[b]].tolist() for b in range(3)]
  prompts[1] = ''.join(chr(t) for t in prompts[1])  # a string prompt is encoded
  texts = sampling.generate_text(s.graphdef, s.params, s.mcfg, ByteTokenizer(), prompts,
                                 max_new_tokens=N, stop_ids=(stop,))
  exp_tok, _, exp_mask = expected_with_stops(g.tokens, g.logprobs, (stop,), 0)
  for b in range(3):
    ids = exp_tok[b, :exp_mask[b].sum()].tolist()
    if ids[-1] == stop:
      ids = ids[:-1]
    assert texts[b] == ''.join(chr(i) for i in ids)
  # In chunks of 2 rows (2 calls of one compiled shape): the same texts.
  assert sampling.generate_text(s.graphdef, s.params, s.mcfg, ByteTokenizer(), prompts,
                                max_new_tokens=N, stop_ids=(stop,), batch_size=2) == texts


@pytest.mark.parametrize('stacked', [False, True], ids=['per-layer', 'stacked'])
def test_grouped_prompts_prefilled_once_give_the_same_samples(monkeypatch, stacked):
  """prompt_group=K (each prompt in K consecutive rows, GRPO's groups): one prefill a
  group, its cache copied to the group's rows, gives what prefilling every row gives,
  greedy and sampled (each row draws its own tokens from the shared prefix)."""
  if stacked:
    monkeypatch.setattr(sampling, 'split_layers_here', lambda: False)
    monkeypatch.setattr(kv_cache, 'BLOCK', 4)
  sampling._jitted.cache_clear()  # compile for this layout (the cache key does not name it)
  copies = []
  monkeypatch.setattr(kv_cache, 'repeat_rows',
                      lambda *a: copies.append(a[1:]) or repeat_rows(*a))
  s = get_setup(*MAIN_SETUPS[0])
  k = 2
  prompts, lengths = np.repeat(s.prompts, k, axis=0), np.repeat(LENGTHS, k)
  for settings in (SamplingConfig(max_new_tokens=N, temperature=0.0, prefill_chunk=3),
                   SAMPLED['temperature']):
    every_row = s.sample(settings, prompts=prompts, lengths=lengths)
    grouped = s.sample(dataclasses.replace(settings, prompt_group=k), prompts=prompts,
                       lengths=lengths)
    np.testing.assert_array_equal(grouped.tokens, every_row.tokens)
    np.testing.assert_allclose(grouped.logprobs, every_row.logprobs, atol=2e-5)
    if settings.temperature:
      assert (every_row.tokens[0::k] != every_row.tokens[1::k]).any()  # rows draw apart
  assert copies == [(k, s.mcfg.n_kv_heads)] * 2  # the grouped programs did share prefills
  # 8 rows in groups of 8 leave one prefill for 4 row shards: every row is prefilled.
  out = s.sample(dataclasses.replace(SAMPLED['temperature'], prompt_group=8),
                 prompts=np.repeat(s.prompts[:1], 8, axis=0), lengths=np.repeat(LENGTHS[:1], 8))
  assert out.tokens.shape == (8, N)
  assert len(copies) == 2
  with pytest.raises(ValueError, match='prompt_group'):
    SamplingConfig(max_new_tokens=N, prompt_group=0)
  sampling._jitted.cache_clear()


def test_rejects_bad_shapes():
  s = get_setup(*MAIN_SETUPS[0])
  with pytest.raises(ValueError, match='max_seq_len'):
    s.sample(SamplingConfig(max_new_tokens=30))
  with pytest.raises(ValueError, match='lengths'):
    s.sample(SamplingConfig(max_new_tokens=N), lengths=np.array([8, 3, 0, 1], np.int32))
  with pytest.raises(ValueError, match='multiple'):
    s.sample(SamplingConfig(max_new_tokens=N), prompts=s.prompts[:3], lengths=LENGTHS[:3])
  with pytest.raises(ValueError, match='top_p'):
    SamplingConfig(max_new_tokens=N, top_p=0.0)


# -- the cache is written in place -----------------------------------------------------------

_CALLS = re.compile(r'(?:calls|to_apply|body|condition|true_computation|false_computation)'
                    r'=%([\w.\-]+)|branch_computations=\{([^}]*)\}')


def loop_computations(hlo: str) -> dict[str, list[str]]:
  """{name: instruction lines} of the HLO computations that while loops run: their bodies
  and conditions and everything those call (fusions included)."""
  comps, name = {}, None
  for line in hlo.splitlines():
    head = re.match(r'(?:ENTRY )?%([\w.\-]+) \(.*\{$', line)
    if head:
      name = head.group(1)
      comps[name] = []
    elif name is not None:
      comps[name].append(line)
  todo = [m for lines in comps.values() for line in lines if ' while(' in line
          for m in re.findall(r'(?:body|condition)=%([\w.\-]+)', line)]
  seen = set()
  while todo:
    name = todo.pop()
    if name in seen or name not in comps:
      continue
    seen.add(name)
    for line in comps[name]:
      for called, branches in _CALLS.findall(line):
        todo.extend([called] if called else re.findall(r'%([\w.\-]+)', branches))
  return {n: comps[n] for n in seen}


@pytest.mark.parametrize('stacked', [False, True], ids=['per-layer', 'stacked-blocks'])
def test_cache_is_written_in_place(monkeypatch, stacked):
  """No instruction inside the compiled sampler's loops copies or scatters a buffer of the
  cache's shape: each step writes its keys and values into the one cache (a
  dynamic-update-slice). `stacked`: the GPU / TPU layout, one (L, B, K, S, H) array per
  keys and values, read in blocks of 4 slots here (so the loop over blocks runs), with
  the prompts prefilled 3 tokens at a time; the same tokens and log-probs either way."""
  if stacked:
    monkeypatch.setattr(sampling, 'split_layers_here', lambda: False)
    monkeypatch.setattr(kv_cache, 'BLOCK', 4)
  setup = MAIN_SETUPS[0]
  s = get_setup(*setup)
  settings = SamplingConfig(max_new_tokens=N, temperature=0.0, prefill_chunk=3)
  fn = jax.jit(sampling.decode_fn(s.graphdef, s.mcfg, settings))
  rows = sharding.batch_sharding(s.mesh, s.mcfg.rules)
  args = (s.params, jax.device_put(s.prompts, rows), jax.device_put(LENGTHS, rows),
          jax.random.PRNGKey(0))
  with jax.set_mesh(s.mesh):
    compiled = fn.lower(*args).compile()
    out = jax.device_get(compiled(*args))
  g = greedy(*setup)
  np.testing.assert_array_equal(out.tokens, g.tokens)
  np.testing.assert_allclose(out.logprobs, g.logprobs, atol=2e-5)

  m = s.mcfg
  shape = (m.n_layers, B * m.n_kv_heads, P + N - 1, m.head_dim)[0 if stacked else 1:]
  spec = sampling.cache_spec(m.rules, len(shape))
  shard = NamedSharding(s.mesh, spec).shard_shape(shape)
  buffer = re.compile(r'= f32\[%s\]\{[\d,]*\} ([\w\-]+)\(' % ','.join(map(str, shard)))
  ops = [match.group(1) for lines in loop_computations(compiled.as_text()).values()
         for line in lines for match in [buffer.search(line)] if match]
  assert 'dynamic-update-slice' in ops  # the loops do write the cache (the check has teeth)
  assert not {'copy', 'scatter'} & set(ops), ops
