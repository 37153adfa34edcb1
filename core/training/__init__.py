"""Training helpers of the torch zone: per-example losses, metrics, resume checkpoints."""
