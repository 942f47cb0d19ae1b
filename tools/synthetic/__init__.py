"""Synthetic face data in the real formats: ``faces`` (the renderer) and ``make_synthetic`` (the CLI)."""
