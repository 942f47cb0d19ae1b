"""L2, EXclass, softmax → ArcFace, 512-d."""
from configs.scenarios import Experiment

run = Experiment("EXclass", "softmax_to_arc_f512")
config = run.new_model()
config.old_embedding = run.feature("feature")
