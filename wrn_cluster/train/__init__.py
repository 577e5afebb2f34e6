"""Training: the per-worker loops, their checkpoint state, optimizer and schedule."""
