"""Train layer: combiner models, losses, the training loop, metrics and checkpoints."""
