"""Old model: r18, softmax, 512-d, MS1MV3 data30."""
from configs.scenarios import old_model

config = old_model("data30", "softmax", 512)
