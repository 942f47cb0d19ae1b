"""Shared machinery: config, distributed setup, data, I/O, the training loop."""
