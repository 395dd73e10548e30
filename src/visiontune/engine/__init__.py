"""The one training loop and its mechanics: optimiser, schedule, precision, checkpoints, stops."""
