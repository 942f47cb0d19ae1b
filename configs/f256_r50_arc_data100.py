"""Independent new model (no compatibility constraint): r50, ArcFace, 256-d, MS1MV3 data100."""
from configs.scenarios import independent_model

config = independent_model(256)
