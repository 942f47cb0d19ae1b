"""weakened L2, EXdata, softmax → ArcFace, 512-d."""
from configs.scenarios import Experiment

run = Experiment("EXdata", "softmax_to_arc_f512")
config = run.new_model()
config.old_embedding = run.feature("feature")
config.threshold = 0.2
