"""The demo's new model trained with BCT, published keys (full profile); tools/run_demo.py trains it."""
from configs.demo.common import FEATURES, new_model

config = new_model("BCT")
config.old_prototype = FEATURES + "_avg_feature.npy"
