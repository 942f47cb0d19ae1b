"""The demo's new model trained with AdvBCT, published keys (full profile); tools/run_demo.py trains it."""
from configs.demo.common import FEATURES, new_model

config = new_model("AdvBCT")
config.old_embedding = FEATURES + "_feature.npy"
