"""Old model: r18, softmax, 128-d, MS1MV3 class30.

    python -m torch.distributed.launch --nproc_per_node=8 train_old_softmax.py configs/f128_r18_softmax_class30.py
"""
from configs.scenarios import old_model

config = old_model("class30", "softmax", 128)
