"""L2, OPclass, softmax → ArcFace, 128-d."""
from configs.scenarios import Experiment

run = Experiment("OPclass", "softmax_to_arc_f128", "L2")
config = run.new_model()
config.old_embedding = run.feature("feature")
