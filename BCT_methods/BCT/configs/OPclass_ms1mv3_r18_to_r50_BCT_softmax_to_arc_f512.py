"""BCT, OPclass, softmax → ArcFace, 512-d."""
from configs.scenarios import Experiment

run = Experiment("OPclass", "softmax_to_arc_f512")
config = run.new_model()
config.old_prototype = run.feature("avg_feature")
