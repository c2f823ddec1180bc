"""Speed measurement: synthetic checkpoints at the real geometry and the benchmark runner."""
