"""Command-line tools on a trained run: sample, chat, score."""
