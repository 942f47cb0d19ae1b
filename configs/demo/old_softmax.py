"""Demo old model: small r18-style network, softmax, trained on the old split (CPU)."""
from easydict import EasyDict as edict

from configs.demo import settings

config = settings.common(edict(), settings.OLD_NETWORK, settings.OLD_SPLIT, "old_softmax")
