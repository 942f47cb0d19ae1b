"""The demo's new model trained with UniBCT, published keys (full profile); tools/run_demo.py trains it."""
from configs.demo.common import FEATURES, new_model

config = new_model("UniBCT")
config.old_prototype = FEATURES + "_avg_feature.npy"
config.old_embedding = FEATURES + "_feature.npy"
config.refine_epochs = (2, 3)   # the published epochs 10, 20 of 35, scaled to 6
config.lr_steps = (3, 4, 5)   # the published 20, 26, 32 of 35, scaled to 6
