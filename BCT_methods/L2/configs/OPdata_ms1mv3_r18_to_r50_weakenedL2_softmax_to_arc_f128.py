"""weakened L2, OPdata, softmax → ArcFace, 128-d."""
from configs.scenarios import Experiment

run = Experiment("OPdata", "softmax_to_arc_f128")
config = run.new_model()
config.old_embedding = run.feature("feature")
config.threshold = 0.2
