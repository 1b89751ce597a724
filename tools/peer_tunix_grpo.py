"""Per-iteration seconds of one GRPO configuration run by Google's Tunix.

A benchmark peer for jaxgpt's GRPO timings (see tools/bench_rlhf.py): the same
work -- a SmolLM2-135M-shaped LLaMA model with random float32 weights, 8 prompts
x 8 generations of 64 new tokens, reference-model KL (beta 0.04), clip 0.2,
AdamW -- done by Tunix's GRPOLearner / RLCluster on one CPU device.

Each timed iteration is split into three phases by wrapping Tunix's own methods:
  generate  RLCluster.generate (sampling the rollouts with Tunix's Sampler)
  score     the rest of GRPOLearner._generate_and_compute_advantage: reference
            log-probs, rewards and group advantages (Tunix computes no old-policy
            log-probs when num_iterations == 1)
  update    RLCluster.update_actor (forward/backward and optimizer steps)
  total     GRPOLearner._run_global_step wall time (phases plus Tunix's queueing)

This file must not import jaxgpt: it runs in its own virtual environment,
  python -m venv /tmp/tunix-venv
  /tmp/tunix-venv/bin/pip install google-tunix==0.1.7
and is started as
  /tmp/tunix-venv/bin/python tools/peer_tunix_grpo.py [--prompts_json FILE]
      [--iterations 2] [--minibatching per_minibatch_rollout|grad_accumulation]
The last line of stdout is one JSON object with the mean seconds per timed
iteration; a missing or broken Tunix install exits 2 with one line on stderr.
"""

import argparse
import json
import os
import sys
import time


def parse_args():
  parser = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  shape = parser.add_argument_group('model shape (SmolLM2-135M by default)')
  shape.add_argument('--vocab_size', type=int, default=49152)
  shape.add_argument('--d_model', type=int, default=576)
  shape.add_argument('--n_layers', type=int, default=30)
  shape.add_argument('--n_heads', type=int, default=9)
  shape.add_argument('--n_kv_heads', type=int, default=3)
  shape.add_argument('--head_dim', type=int, default=64)
  shape.add_argument('--ffn_hidden', type=int, default=1536)
  shape.add_argument('--rope_theta', type=float, default=100000.0)
  shape.add_argument('--norm_eps', type=float, default=1e-5)
  shape.add_argument('--untied_embeddings', action='store_true',
                     help='separate output head instead of tied embeddings')
  grpo = parser.add_argument_group('GRPO')
  grpo.add_argument('--prompts_per_iteration', type=int, default=8)
  grpo.add_argument('--generations', type=int, default=8,
                    help='rollouts per prompt')
  grpo.add_argument('--max_new_tokens', type=int, default=64)
  grpo.add_argument('--temperature', type=float, default=1.0)
  grpo.add_argument('--beta', type=float, default=0.04, help='KL coefficient')
  grpo.add_argument('--epsilon', type=float, default=0.2, help='clip range')
  grpo.add_argument('--epochs', type=int, default=1,
                    help='passes over each batch of rollouts (num_iterations)')
  grpo.add_argument('--minibatches', type=int, default=2,
                    help="minibatches per iteration's rollouts")
  grpo.add_argument(
      '--minibatching', default='per_minibatch_rollout',
      choices=['per_minibatch_rollout', 'grad_accumulation'],
      help="how Tunix splits an iteration: per_minibatch_rollout = Tunix's "
      'mini_batch_size, one rollout+score+optimizer step per minibatch; '
      'grad_accumulation = one rollout of the whole batch, gradients of the '
      'minibatches accumulated into one optimizer step')
  grpo.add_argument('--learning_rate', type=float, default=1e-6)
  grpo.add_argument('--max_prompt_length', type=int, default=0,
                    help="left-pad prompts to this length; 0 = Tunix's rule, "
                    'the next power of two above the longest prompt')
  run = parser.add_argument_group('run')
  run.add_argument('--prompts_json', default=None,
                   help='JSON list of prompts, each a list of int token ids')
  run.add_argument('--iterations', type=int, default=2,
                   help='timed iterations after one warm-up iteration')
  run.add_argument('--seed', type=int, default=0)
  return parser.parse_args()


def fail(reason):
  """Expected failures (no Tunix, bad input) end with one line, not a trace."""
  print(f'peer_tunix_grpo: {reason}', file=sys.stderr)
  sys.exit(2)


def import_tunix():
  try:
    import jax  # pylint: disable=import-outside-toplevel
    import optax  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel
    from tunix.models.llama3 import model as llama3  # pylint: disable=import-outside-toplevel
    from tunix.rl import rl_cluster as rl_cluster_lib  # pylint: disable=import-outside-toplevel
    from tunix.rl.grpo import grpo_learner  # pylint: disable=import-outside-toplevel
    from tunix.rl.rollout import base_rollout  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    fail(f'cannot import Tunix or its dependencies ({error}); run this file '
         'with a venv that has google-tunix installed')
  return jax, optax, nnx, llama3, rl_cluster_lib, grpo_learner, base_rollout


class IdTokenizer:
  """Maps token ids to words "t<id>" and back, so no vocabulary is downloaded.

  Tunix works on prompt and completion strings; this lets ids pass through
  them unchanged. eos is one past the vocabulary: random weights can never
  sample it, so every reply runs the full max_new_tokens.
  """

  def __init__(self, vocab_size):
    self.vocab_size = vocab_size

  def encode(self, text, **unused_kwargs):
    return [int(word[1:]) for word in text.split()]

  def decode(self, ids, **unused_kwargs):
    return ' '.join(f't{int(token)}' for token in ids)

  def bos_id(self):
    return None  # Tunix's sampler prepends a bos only when this is truthy.

  def eos_id(self):
    return self.vocab_size

  def pad_id(self):
    return 0


def load_prompts(args, rng):
  if args.prompts_json is None:
    # Id 0 is the pad id, so random prompts avoid it.
    return [rng.integers(1, args.vocab_size, size=rng.integers(18, 31)).tolist()
            for _ in range(args.prompts_per_iteration)]
  try:
    with open(args.prompts_json, encoding='utf-8') as handle:
      prompts = json.load(handle)
  except (OSError, ValueError) as error:
    fail(f'cannot read --prompts_json {args.prompts_json}: {error}')
  if (not isinstance(prompts, list) or not prompts
      or not all(isinstance(p, list) and p and all(isinstance(t, int) for t in p)
                 for p in prompts)):
    fail(f'{args.prompts_json} is not a non-empty JSON list of lists of ints')
  if any(t < 0 or t >= args.vocab_size for p in prompts for t in p):
    fail(f'{args.prompts_json} has token ids outside [0, {args.vocab_size})')
  if len(prompts) < args.prompts_per_iteration:
    fail(f'{args.prompts_json} has {len(prompts)} prompts, fewer than '
         f'--prompts_per_iteration {args.prompts_per_iteration}')
  return prompts


def build_model(args, jax, nnx, llama3):
  config = llama3.ModelConfig(
      num_layers=args.n_layers,
      vocab_size=args.vocab_size,
      embed_dim=args.d_model,
      hidden_dim=args.ffn_hidden,
      num_heads=args.n_heads,
      head_dim=args.head_dim,
      num_kv_heads=args.n_kv_heads,
      rope_theta=args.rope_theta,
      norm_eps=args.norm_eps,
      weight_tying=not args.untied_embeddings,
  )
  model = llama3.Llama3(config, rngs=nnx.Rngs(params=args.seed))
  # Tunix initialises MLP kernels to zero; give them random values like every
  # other weight so the run is a real random-weight model.
  key = jax.random.PRNGKey(args.seed + 1)
  for layer in model.layers:
    for projection in (layer.mlp.gate_proj, layer.mlp.up_proj,
                       layer.mlp.down_proj):
      key, subkey = jax.random.split(key)
      zeros = projection.kernel.get_value()
      projection.kernel.set_value(
          0.02 * jax.random.normal(subkey, zeros.shape, zeros.dtype))
  return model


class PhaseClock:
  """Adds up seconds per phase for each GRPO iteration (Tunix global step)."""

  def __init__(self):
    self.iterations = []
    self.current = None

  def start_iteration(self):
    self.current = {'generate': 0.0, 'score': 0.0, 'update': 0.0,
                    'total': 0.0, 'reply_tokens': [], 'rollout_batches': []}
    self.iterations.append(self.current)

  def add(self, phase, seconds):
    self.current[phase] += seconds


def instrument(learner, clock, jax, nnx):
  """Wraps Tunix's methods so each phase is timed where Tunix runs it."""
  cluster = learner.rl_cluster
  original_generate = cluster.generate
  original_advantage = learner._generate_and_compute_advantage  # pylint: disable=protected-access
  original_update = cluster.update_actor
  original_global_step = learner._run_global_step  # pylint: disable=protected-access

  def timed_generate(*args, **kwargs):
    # The sampler copies tokens to host before returning, so this is synced.
    start = time.perf_counter()
    output = original_generate(*args, **kwargs)
    seconds = time.perf_counter() - start
    clock.add('generate', seconds)
    clock.current['reply_tokens'].extend(len(t) for t in output.tokens)
    clock.current['rollout_batches'].append(len(output.tokens))
    timed_generate.last_seconds = seconds
    return output

  def timed_advantage(*args, **kwargs):
    timed_generate.last_seconds = 0.0
    start = time.perf_counter()
    example = jax.block_until_ready(original_advantage(*args, **kwargs))
    clock.add('score',
              time.perf_counter() - start - timed_generate.last_seconds)
    return example

  def timed_update(*args, **kwargs):
    start = time.perf_counter()
    original_update(*args, **kwargs)
    # Tunix lets train steps run ahead asynchronously; wait for the weights.
    jax.block_until_ready(nnx.state(cluster.actor_trainer.model))
    clock.add('update', time.perf_counter() - start)

  def timed_global_step(*args, **kwargs):
    clock.start_iteration()
    start = time.perf_counter()
    original_global_step(*args, **kwargs)
    clock.add('total', time.perf_counter() - start)
    print(f'iteration {len(clock.iterations) - 1}: ' + ', '.join(
        f'{phase} {clock.current[phase]:.2f}s'
        for phase in ('generate', 'score', 'update', 'total')), flush=True)

  cluster.generate = timed_generate
  learner._generate_and_compute_advantage = timed_advantage  # pylint: disable=protected-access
  cluster.update_actor = timed_update
  learner._run_global_step = timed_global_step  # pylint: disable=protected-access


def main():
  args = parse_args()
  (jax, optax, nnx, llama3, rl_cluster_lib, grpo_learner,
   base_rollout) = import_tunix()
  import numpy as np  # pylint: disable=import-outside-toplevel
  from importlib import metadata  # pylint: disable=import-outside-toplevel

  if args.prompts_per_iteration % args.minibatches:
    fail(f'--minibatches {args.minibatches} must divide '
         f'--prompts_per_iteration {args.prompts_per_iteration}')
  rng = np.random.default_rng(args.seed)
  prompts = load_prompts(args, rng)
  tokenizer = IdTokenizer(args.vocab_size)
  longest_prompt = max(len(p) for p in prompts)
  max_prompt_length = (args.max_prompt_length
                       or 1 << (longest_prompt - 1).bit_length())
  if max_prompt_length < longest_prompt:
    fail(f'--max_prompt_length {max_prompt_length} is shorter than the '
         f'longest prompt ({longest_prompt} ids)')

  # One CPU device; Tunix still wants a mesh with its fsdp/tp axis names.
  # Auto axes: Tunix's models index embeddings without explicit-sharding hints.
  mesh = jax.make_mesh((1, 1), ('fsdp', 'tp'), devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  policy = build_model(args, jax, nnx, llama3)
  reference = nnx.clone(policy)  # frozen copy with the same weights

  # Tunix counts batch sizes in prompts (before the G generations).
  minibatch_prompts = args.prompts_per_iteration // args.minibatches
  if args.minibatching == 'per_minibatch_rollout':
    batch_sizes = dict(mini_batch_size=minibatch_prompts,
                       train_micro_batch_size=minibatch_prompts)
    optimizer_steps_per_iteration = args.minibatches * args.epochs
  else:
    batch_sizes = dict(mini_batch_size=args.prompts_per_iteration,
                       train_micro_batch_size=minibatch_prompts,
                       rollout_micro_batch_size=args.prompts_per_iteration,
                       compute_logps_micro_batch_size=args.prompts_per_iteration)
    optimizer_steps_per_iteration = args.epochs
  total_iterations = 1 + args.iterations
  training_config = rl_cluster_lib.RLTrainingConfig(
      actor_optimizer=optax.adamw(args.learning_rate),
      eval_every_n_steps=10**9,
      max_steps=total_iterations * optimizer_steps_per_iteration,
      **batch_sizes,
  )
  rollout_config = base_rollout.RolloutConfig(
      max_tokens_to_generate=args.max_new_tokens,
      max_prompt_length=max_prompt_length,
      kv_cache_size=max_prompt_length + args.max_new_tokens,
      temperature=args.temperature,
      top_p=1.0,  # plain categorical sampling over the whole vocabulary
      top_k=None,
      eos_tokens=[tokenizer.eos_id()],
  )
  cluster_config = rl_cluster_lib.ClusterConfig(
      role_to_mesh={role: mesh for role in (rl_cluster_lib.Role.ACTOR,
                                            rl_cluster_lib.Role.REFERENCE,
                                            rl_cluster_lib.Role.ROLLOUT)},
      rollout_engine='vanilla',
      offload_to_cpu=False,
      training_config=training_config,
      rollout_config=rollout_config,
  )
  cluster = rl_cluster_lib.RLCluster(actor=policy, reference=reference,
                                     tokenizer=tokenizer,
                                     cluster_config=cluster_config)
  grpo_config = grpo_learner.GRPOConfig(
      num_generations=args.generations,
      num_iterations=args.epochs,
      beta=args.beta,
      epsilon=args.epsilon,
  )

  def reward_by_length(prompts, completions, **unused_kwargs):
    """A cheap host-side reward: the completion's length in ids, mod 3."""
    del prompts
    return [float(len(completion.split()) % 3) for completion in completions]

  learner = grpo_learner.GRPOLearner(rl_cluster=cluster,
                                     algo_config=grpo_config,
                                     reward_fns=reward_by_length)
  clock = PhaseClock()
  instrument(learner, clock, jax, nnx)

  prompt_strings = [tokenizer.decode(p) for p in prompts]
  per_iteration = args.prompts_per_iteration

  def batch(iteration):
    # Cycle through the prompt file when it holds more than one batch.
    start = (iteration * per_iteration) % len(prompt_strings)
    chosen = [prompt_strings[(start + i) % len(prompt_strings)]
              for i in range(per_iteration)]
    return {'prompts': chosen}

  print(f'tunix GRPO: {args.n_layers} layers, d_model {args.d_model}, vocab '
        f'{args.vocab_size}, {per_iteration} prompts x {args.generations} '
        f'generations, {args.max_new_tokens} new tokens, prompts padded to '
        f'{max_prompt_length}, {args.minibatches} minibatches '
        f'({args.minibatching}), 1 warm-up + {args.iterations} timed '
        'iterations', flush=True)
  learner.train([batch(i) for i in range(total_iterations)])

  timed = clock.iterations[1:]
  if len(timed) != args.iterations:
    fail(f'Tunix ran {len(clock.iterations)} iterations, expected '
         f'{total_iterations}')
  means = {phase: float(np.mean([it[phase] for it in timed]))
           for phase in ('generate', 'score', 'update', 'total')}
  mean_reply_tokens = float(np.mean(
      [n for it in timed for n in it['reply_tokens']]))
  versions = ', '.join(f'{name} {metadata.version(package)}' for name, package in
                       (('tunix', 'google-tunix'), ('jax', 'jax'),
                        ('flax', 'flax')))
  about = (
      f'{versions}, {jax.device_count()} {jax.devices()[0].platform.upper()} '
      f'device, XLA CPU thread pool over os.cpu_count()={os.cpu_count()} '
      f"cores (XLA_FLAGS={os.environ.get('XLA_FLAGS', 'unset')}), "
      f"tied embeddings {'no' if args.untied_embeddings else 'yes'}, "
      f'float32, rope_theta {args.rope_theta:g} ignored by tunix llama3 '
      '(its apply_rope uses 1e6), '
      f'minibatching {args.minibatching} ({optimizer_steps_per_iteration} '
      'optimizer steps/iteration), no old-policy logps when epochs == 1, '
      f'prompts left-padded to {max_prompt_length}')
  # Tunix's own count, to confirm how its batch sizes mapped to steps.
  optimizer_steps = cluster.actor_trainer.train_steps
  print(f'optimizer steps taken: {optimizer_steps} over {total_iterations} '
        f'iterations ({optimizer_steps / total_iterations:g} per iteration); '
        f"rollouts sampled per generate call: {timed[0]['rollout_batches']}")
  print(f'mean of {args.iterations} timed iterations: ' + ', '.join(
      f'{phase} {means[phase]:.2f}s' for phase in means)
        + f'; mean reply {mean_reply_tokens:.1f} tokens')
  print(json.dumps({**means, 'iterations': args.iterations,
                    'mean_reply_tokens': mean_reply_tokens, 'about': about}))


if __name__ == '__main__':
  main()
