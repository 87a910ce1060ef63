"""The training loop and what it needs: schedules, clipping, checkpoints, logs."""
