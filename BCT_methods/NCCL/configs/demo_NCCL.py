"""The demo's new model trained with NCCL, published keys (full profile); tools/run_demo.py trains it."""
from configs.demo.common import FEATURES, new_model

config = new_model("NCCL")
config.old_embedding = FEATURES + "_feature.npy"
config.queue_size = 64   # the published 0.23 % of the training set, at least one batch
