"""Backward-compatible training methods: one folder per method (train.py, losses.py, configs/)."""
