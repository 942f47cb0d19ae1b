"""Old model: r18, softmax, 128-d, MS1MV3 data30."""
from configs.scenarios import old_model

config = old_model("data30", "softmax", 128)
