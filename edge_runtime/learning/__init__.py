"""The edge model and its learning steps, transport-free: models, local training,
distillation, the optimizer, datasets, partitions, batches and CPU speed settings."""
