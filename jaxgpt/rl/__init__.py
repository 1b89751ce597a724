"""Reinforcement learning from human feedback: the PPO math (algo) used by the ppo stage."""
