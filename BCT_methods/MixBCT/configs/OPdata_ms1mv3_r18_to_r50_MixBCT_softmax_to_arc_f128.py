"""MixBCT, OPdata, softmax → ArcFace, 128-d."""
from configs.scenarios import Experiment

run = Experiment("OPdata", "softmax_to_arc_f128")
config = run.new_model()
config.credible_old_feature = run.feature("credible_ratio_90")
config.old_embedding = run.feature("feature")
