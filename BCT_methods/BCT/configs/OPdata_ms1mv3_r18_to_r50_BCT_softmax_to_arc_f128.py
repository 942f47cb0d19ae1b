"""BCT, OPdata, softmax → ArcFace, 128-d."""
from configs.scenarios import Experiment

run = Experiment("OPdata", "softmax_to_arc_f128")
config = run.new_model()
config.old_prototype = run.feature("avg_feature")
