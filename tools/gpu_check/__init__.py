"""The CUDA readiness check (gpu_check.py) and its parts."""
