"""MixBCT, OPclass, arc → ArcFace, 512-d."""
from configs.scenarios import Experiment

run = Experiment("OPclass", "arc_to_arc_f512", "MixBCT")
config = run.new_model()
config.credible_old_feature = run.feature("credible_ratio_90")
config.old_embedding = run.feature("feature")
