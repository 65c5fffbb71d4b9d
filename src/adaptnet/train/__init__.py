"""Running it: training loop, callbacks, loggers, checkpoints, data, config."""

from adaptnet.train.checkpoint import CheckpointError, CheckpointManager, load, restore_optimizer, save

__all__ = ["CheckpointError", "CheckpointManager", "load", "restore_optimizer", "save"]
