"""Demo old model: small r18-style network (8-channel stem, 32 px), softmax, trained on the old split (CPU)."""
from easydict import EasyDict as edict

from configs.demo import settings

config = settings.old_model(edict(), "old_softmax")
