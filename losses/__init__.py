"""Margin losses on cosine logits and the model-parallel Partial FC classifier."""
from losses.margin import ArcFace, CombinedMarginLoss, CosFace
from losses.partial_fc import AllGatherRows, LinearSoftmaxHead, PartialFC, arcface_classifier, softmax_classifier
from utils.distributed import all_gather_rows

__all__ = ["AllGatherRows", "ArcFace", "CombinedMarginLoss", "CosFace", "LinearSoftmaxHead", "PartialFC", "all_gather_rows",
           "arcface_classifier", "softmax_classifier"]
