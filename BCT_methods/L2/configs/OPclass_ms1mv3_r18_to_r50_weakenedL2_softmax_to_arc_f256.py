"""weakened L2, OPclass, softmax → ArcFace, 256-d."""
from configs.scenarios import Experiment

run = Experiment("OPclass", "softmax_to_arc_f256", "weakenedL2")
config = run.new_model()
config.old_embedding = run.feature("feature")
config.threshold = 0.2
