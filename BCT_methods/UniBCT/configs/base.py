"""UniBCT keys (merged over configs/base.py for every config in this folder); published defaults."""
from easydict import EasyDict as edict

config = edict()
config.old_prototype = None          # <SD>_avg_feature.npy: initial prototypes (step 3)
config.old_embedding = None          # <SD>_feature.npy: old features propagated at the refine epochs
config.loss_weight = 1.0             # influence-loss weight once the first refine epoch is reached (0 before)
config.lr_schedule = "step"          # published: lr × 0.1 at epochs 20, 26 and 32
config.lr_steps = (20, 26, 32)
config.refine_epochs = (10, 20)      # epochs (from 0) at whose start the prototypes are refined
config.refine_lambda = 0.9           # λ of Π = (1 − λ)(I − λA)⁻¹
config.refine_tau = 0.05             # τ of the new-feature affinities S = n̂(f)·n̂(f)ᵀ / τ
# published behaviour by default (docs/methods.md, "Differences from the published code"):
config.refine_softmax = "column"     # "column": prototype = plain class mean (published); "row": real propagation
config.refine_normalize = False      # False: un-normalised prototypes, logits ‖μ‖·cos (published); True: unit prototypes
config.warmup_epoch = -1            # published: with the poly schedule no warm-up and lr × (T/(T+1 epoch))² throughout; no effect on the step schedule
