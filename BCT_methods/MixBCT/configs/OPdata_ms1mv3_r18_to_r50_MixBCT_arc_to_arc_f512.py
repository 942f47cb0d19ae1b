"""MixBCT, OPdata, arc → ArcFace, 512-d."""
from configs.scenarios import Experiment

run = Experiment("OPdata", "arc_to_arc_f512")
config = run.new_model()
config.credible_old_feature = run.feature("credible_ratio_90")
config.old_embedding = run.feature("feature")
