"""Margin losses on cosine logits and the model-parallel Partial FC classifier."""
from losses.margin import ArcFace, CombinedMarginLoss, CosFace
from losses.partial_fc import PartialFC

__all__ = ["ArcFace", "CombinedMarginLoss", "CosFace", "PartialFC"]
