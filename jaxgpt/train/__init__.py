"""The training machinery every stage shares: step, loop, optimizer, checkpoints, metrics."""
