"""jaxgpt: the four stages of training a GPT assistant, in JAX."""
