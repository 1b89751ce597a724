"""Decoding, token choice, loading a stage for inference, reward-model scoring."""
