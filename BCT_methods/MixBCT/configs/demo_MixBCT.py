"""The demo's new model trained with MixBCT, published keys (full profile); tools/run_demo.py trains it."""
from configs.demo.common import FEATURES, new_model

config = new_model("MixBCT")
config.old_embedding = FEATURES + "_feature.npy"
config.credible_old_feature = FEATURES + "_credible_ratio_90_feature.npy"
