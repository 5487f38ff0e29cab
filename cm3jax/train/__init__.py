"""Training: mesh and sharding rules, optimizer, train state, step, checkpoints, loop."""
