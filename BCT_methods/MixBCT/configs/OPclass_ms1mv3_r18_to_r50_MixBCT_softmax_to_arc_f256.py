"""MixBCT, OPclass, softmax → ArcFace, 256-d."""
from configs.scenarios import Experiment

run = Experiment("OPclass", "softmax_to_arc_f256", "MixBCT")
config = run.new_model()
config.credible_old_feature = run.feature("credible_ratio_90")
config.old_embedding = run.feature("feature")
