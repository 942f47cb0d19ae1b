"""Old model: r18, softmax, 128-d, MS1MV3 class30."""
from configs.scenarios import old_model

config = old_model("class30", "softmax", 128)
