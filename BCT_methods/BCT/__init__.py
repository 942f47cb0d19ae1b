"""BCT: see losses.py (loss terms and the training hook) and docs/methods.md."""
