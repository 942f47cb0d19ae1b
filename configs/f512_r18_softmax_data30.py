"""Old model: r18, softmax, 512-d, MS1MV3 data30.

    python -m torch.distributed.launch --nproc_per_node=8 train_old_softmax.py configs/f512_r18_softmax_data30.py
"""
from configs.scenarios import old_model

config = old_model("data30", "softmax", 512)
