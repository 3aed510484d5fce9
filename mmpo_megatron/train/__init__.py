"""Training: the step on megatron's schedules, reference log-probs, checkpoints, logging, the loop."""
