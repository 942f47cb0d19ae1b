"""The demo's old model (full profile); tools/run_demo.py trains it."""
from configs.demo.common import old_model

config = old_model()
