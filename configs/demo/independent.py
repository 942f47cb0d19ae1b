"""The demo's independent new model (full profile); tools/run_demo.py trains it."""
from configs.demo.common import new_model

config = new_model("independent")
