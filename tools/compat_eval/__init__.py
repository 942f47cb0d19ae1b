"""Compatibility of model generations on your own face data (compat_eval.py)."""
