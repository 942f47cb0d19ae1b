"""Old model: r18, ArcFace, 512-d, MS1MV3 class30.

    python -m torch.distributed.launch --nproc_per_node=8 train_old_arc.py configs/f512_r18_arc_class30.py
"""
from configs.scenarios import old_model

config = old_model("class30", "arc", 512)
