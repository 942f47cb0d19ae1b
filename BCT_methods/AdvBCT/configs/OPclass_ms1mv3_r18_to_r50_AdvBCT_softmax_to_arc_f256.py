"""AdvBCT, OPclass, softmax → ArcFace, 256-d."""
from configs.scenarios import Experiment

run = Experiment("OPclass", "softmax_to_arc_f256")
config = run.new_model()
config.old_embedding = run.feature("feature")
