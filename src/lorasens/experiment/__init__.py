"""Experiments: one run's lifecycle (`lorasens train` and SensitivityCallback in a user's script), sweeps,
comparisons of finished runs and placement validation."""
