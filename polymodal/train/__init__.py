"""Training: the Trainer loop, checkpoints, schedules and distributed helpers."""
