"""UniBCT, EXclass, arc → ArcFace, 512-d."""
from configs.scenarios import Experiment

run = Experiment("EXclass", "arc_to_arc_f512")
config = run.new_model()
config.old_embedding = run.feature("feature")
config.old_prototype = run.feature("avg_feature")
