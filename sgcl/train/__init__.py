"""The pretraining engine: typed config, optimisers and schedules, checkpoints, metrics, trainer."""
